"""Where a rank computes: the GPU of its local rank when there is one, else the CPU."""

import torch

from common.observe.memory import ResidentMemory


def pick_device(local_rank):
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    torch.backends.cudnn.benchmark = True  # the fastest convolution for each shape, found on its first step
    return torch.device("cuda", index)


def to_numpy(tensor):
    return tensor.detach().cpu().numpy()


class CudaMemory:
    """What PyTorch's caching allocator has handed out on the rank's GPU (the CUDA
    context and the allocator's spare cache are not counted)."""
    kind = "CUDA allocated"
    on_accelerator = True

    def __init__(self, device):
        self.device = device
        self.baseline = torch.cuda.memory_allocated(device)
        self.device_bytes = torch.cuda.get_device_properties(device).total_memory
        self.devices = torch.cuda.device_count()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


def memory_meter(device):
    """The rank's memory meter (common/observe/memory.py): the GPU's allocator, or the
    process's resident memory once the CPU kernels have first run (their libraries and
    thread pools, about 100 MB, belong to the baseline, not to any model)."""
    if device.type == "cuda":
        return CudaMemory(device)
    warm_up_kernels()
    return ResidentMemory()


def warm_up_kernels():
    """A tiny training step through a convolution, BatchNorm, ReLU, max-pool and a dense layer."""
    images = torch.randn(2, 3, 8, 8, requires_grad=True)
    conv, norm, dense = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Linear(64, 2)
    pooled = torch.nn.functional.max_pool2d(torch.relu(norm(conv(images))), 2)
    torch.nn.functional.cross_entropy(dense(pooled.flatten(1)), torch.tensor([0, 1])).backward()
