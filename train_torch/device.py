"""Where a rank computes: the GPU of its local rank when there is one, else the CPU."""

import torch


def pick_device(local_rank):
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    torch.backends.cudnn.benchmark = True  # the fastest convolution for each shape, found on its first step
    return torch.device("cuda", index)


def to_numpy(tensor):
    return tensor.detach().cpu().numpy()
