"""The GPU section: training throughput on one CUDA device, fp32 vs AMP.

    python benchmarks/gpu.py [--quick]      # prints BENCH_RESULT {json}; benchmarks/run.py --gpu calls it

A ResNet-50-size network (bottleneck blocks 3-4-6-3, 25.6 M parameters,
defined here so no torchvision is needed) on synthetic 224x224 images, and
the project's own seed CNN and ResNet-8 (train_torch/model.py) on 32x32
images, each in fp32 and with bf16 autocast (AMP), channels-last. One
device only: multi-GPU Horovod needs the NCCL build (make install GPU=1),
which this project's CI machine cannot build or run.
"""

import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Bottleneck(nn.Module):
    def __init__(self, channels_in, width, stride):
        super().__init__()
        out = width * 4
        self.conv1, self.bn1 = nn.Conv2d(channels_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        self.shortcut = (nn.Sequential(nn.Conv2d(channels_in, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                         if stride != 1 or channels_in != out else nn.Identity())

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


def resnet50(classes=1000):
    layers, channels = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.MaxPool2d(3, 2, 1)], 64
    for blocks, width, stride in ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)):
        for index in range(blocks):
            layers.append(Bottleneck(channels, width, stride if index == 0 else 1))
            channels = width * 4
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def our_model(name, shape):
    from common import models
    from train_torch.model import build_model

    return build_model(models.model_specs(name, shape, 10), shape, seed=0)


def throughput(model, shape, batch, classes, amp, windows, steps):
    device = torch.device("cuda")
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, *shape, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    rates = []
    for _ in range(windows):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - start))
    timed = rates[1:]
    return {"median": statistics.median(timed), "min": min(timed), "max": max(timed), "windows": rates}


def main():
    if not torch.cuda.is_available():
        print("BENCH_RESULT " + json.dumps({"gpu": None, "reason": "no CUDA device (or a CPU-only torch)"}))
        return
    quick = "--quick" in sys.argv
    windows, steps = (2, 2) if quick else (6, 20)
    torch.backends.cudnn.benchmark = True
    cases = [("ResNet-50, 224x224", lambda: resnet50(), (3, 224, 224), 128, 1000),
             ("seed CNN (ours), 32x32", lambda: our_model("cnn", (3, 32, 32)), (3, 32, 32), 1024, 10),
             ("ResNet-8 (ours), 32x32", lambda: our_model("resnet", (3, 32, 32)), (3, 32, 32), 1024, 10)]
    results = []
    for name, build, shape, batch, classes in cases[:1] if quick else cases:
        for amp in (False, True):
            torch.manual_seed(0)
            measured = throughput(build(), shape, batch, classes, amp, windows, steps)
            results.append({"name": name, "precision": "bf16 autocast" if amp else "fp32", "batch": batch,
                            **measured})
            print(f"{name} {results[-1]['precision']}: {measured['median']:,.0f} img/s", file=sys.stderr)
    print("BENCH_RESULT " + json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "cases": results}))


if __name__ == "__main__":
    main()
