"""The GPU section: training throughput on one CUDA device, fp32 vs mixed precision.

    python benchmarks/gpu.py [--quick]                     # every case; prints BENCH_RESULT {json}
    python benchmarks/gpu.py --case resnet50-224 --precision bf16 --windows 4 --steps 15
    python benchmarks/gpu.py --dataloader DIR --case resnet50-224 --precision bf16

The zoo's networks as train_torch/model.py builds them from common/model/networks.py
(ResNet-50 and ResNet-18 at 224x224 with the ImageNet stem, ResNet-18 at 32x32
with the CIFAR stem, the seed CNN), channels-last, in fp32, bf16 autocast and
fp16 autocast with a GradScaler (what --amp does). The bare step trains on one
batch that lives on the device: the ceiling the entry script is held against
(benchmarks/gpu_check.py). --dataloader trains the same step fed by torchvision's
DataLoader (ImageFolder, RandomResizedCrop, RandomHorizontalFlip, ToTensor,
Normalize; a worker per core, page-locked batches) from an image folder: the
input pipeline people use, held against --decode gpu. On a CPU device (no CUDA)
the cases run as a dry run of the code, tiny, and say so.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.run import summary  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# name: (label, model, input shape, batch, classes)
CASES = {"resnet50-224": ("ResNet-50, 224x224", "resnet50", (3, 224, 224), 256, 1000),
         "resnet18-224": ("ResNet-18, 224x224", "resnet18", (3, 224, 224), 256, 1000),
         "resnet18-32": ("ResNet-18 (CIFAR stem), 32x32", "resnet18", (3, 32, 32), 1024, 10),
         "cnn-32": ("seed CNN, 32x32", "cnn", (3, 32, 32), 1024, 10)}


def zoo_model(name, shape, classes):
    from common.model import networks
    from train_torch.model import build_model

    return build_model(networks.model_specs(name, shape, classes), shape, seed=0)


class Step:
    """One training step of the zoo model as the entry script takes it (channels-last,
    autocast, a GradScaler for fp16), on batches handed to it."""

    def __init__(self, model, precision, device):
        self.device, self.dtype = device, PRECISIONS[precision]
        self.model = model.to(device, memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def __call__(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss = F.cross_entropy(self.model(x).float(), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(model, shape, batch, classes, precision, windows, steps, device):
    step = Step(model, precision, device)
    x = torch.randn(batch, *shape, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    rates = []
    for _ in range(windows):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        synchronize(device)
        rates.append(steps * batch / (time.perf_counter() - start))
    return summary(rates)


def dataloader_throughput(folder, model, size, batch, classes, precision, windows, steps, device, workers):
    """The same step fed by torchvision's DataLoader: img/s and the share of time spent waiting for it."""
    from benchmarks.peers.common_bench import torchvision_datasets_and_transforms

    datasets, transforms = torchvision_datasets_and_transforms()
    transform = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    images = datasets.ImageFolder(folder, transform)
    sampler = torch.utils.data.RandomSampler(images, replacement=True, num_samples=batch * steps * windows)
    loader = torch.utils.data.DataLoader(images, batch, sampler=sampler, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                         prefetch_factor=4 if workers else None, drop_last=True)
    step = Step(model, precision, device)
    rates, waits, batches = [], [], iter(loader)
    for _ in range(windows):
        synchronize(device)
        start, waited = time.perf_counter(), 0.0
        for _ in range(steps):
            before = time.perf_counter()
            x, y = next(batches)
            waited += time.perf_counter() - before
            step(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last),
                 y.to(device, non_blocking=True))
        synchronize(device)
        seconds = time.perf_counter() - start
        rates.append(steps * batch / seconds)
        waits.append(waited / seconds)
    return {**summary(rates), "data_wait": statistics.median(waits[1:] or waits), "workers": workers}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one case, two precisions, two short windows")
    parser.add_argument("--case", choices=sorted(CASES), help="this case only")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), help="this precision only")
    parser.add_argument("--batch", type=int, default=0, help="instead of the case's batch")
    parser.add_argument("--windows", type=int, default=6, help="timed windows (the first is the warm-up)")
    parser.add_argument("--steps", type=int, default=20, help="steps per window")
    parser.add_argument("--dataloader", metavar="DIR", help="feed the step from this image folder "
                        "through torchvision's DataLoader instead of one resident batch")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="--dataloader: worker processes")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.case:
        print("BENCH_RESULT " + json.dumps({"gpu": None, "reason": "no CUDA device (or a CPU-only torch)"}))
        return
    windows, steps = (2, 2) if args.quick else (args.windows, args.steps)
    torch.backends.cudnn.benchmark = True
    names = [args.case] if args.case else (["resnet50-224"] if args.quick else list(CASES))
    precisions = [args.precision] if args.precision else (["fp32", "bf16"] if args.quick else list(PRECISIONS))
    results = []
    for name in names:
        label, model, shape, batch, classes = CASES[name]
        batch = args.batch or batch
        for precision in precisions:
            torch.manual_seed(0)
            network = zoo_model(model, shape, classes)
            if args.dataloader:
                measured = dataloader_throughput(args.dataloader, network, shape[1], batch, classes, precision,
                                                 windows, steps, device, args.workers)
            else:
                measured = throughput(network, shape, batch, classes, precision, windows, steps, device)
            results.append({"name": label, "case": name, "precision": precision, "batch": batch, **measured})
            print(f"{label} {precision}: {measured['median']:,.0f} img/s", file=sys.stderr)
    print("BENCH_RESULT " + json.dumps({"gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                                        "torch": torch.__version__, "cases": results}))


if __name__ == "__main__":
    main()
