"""The GPU section: training throughput on one CUDA device, fp32 vs mixed precision.

    python benchmarks/gpu.py [--quick]      # prints BENCH_RESULT {json}; benchmarks/run.py --gpu calls it

The zoo's networks as train_torch/model.py builds them from common/models.py
(ResNet-50 and ResNet-18 at 224x224 with the ImageNet stem, ResNet-18 at 32x32
with the CIFAR stem, the seed CNN), on synthetic images, channels-last, in
fp32, bf16 autocast and fp16 autocast with a GradScaler (what --amp does). One
device only: multi-GPU Horovod needs the NCCL build (make install GPU=1),
which this project's CI machine cannot build or run.
"""

import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def zoo_model(name, shape, classes):
    from common import models
    from train_torch.model import build_model

    return build_model(models.model_specs(name, shape, classes), shape, seed=0)


def throughput(model, shape, batch, classes, precision, windows, steps):
    device = torch.device("cuda")
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    x = torch.randn(batch, *shape, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    dtype = PRECISIONS[precision]

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

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
    cases = [("ResNet-50, 224x224", "resnet50", (3, 224, 224), 256, 1000),
             ("ResNet-18, 224x224", "resnet18", (3, 224, 224), 256, 1000),
             ("ResNet-18 (CIFAR stem), 32x32", "resnet18", (3, 32, 32), 1024, 10),
             ("seed CNN, 32x32", "cnn", (3, 32, 32), 1024, 10)]
    results = []
    for name, model, shape, batch, classes in cases[:1] if quick else cases:
        for precision in ("fp32", "bf16") if quick else PRECISIONS:
            torch.manual_seed(0)
            measured = throughput(zoo_model(model, shape, classes), shape, batch, classes, precision,
                                  windows, steps)
            results.append({"name": name, "precision": precision, "batch": batch, **measured})
            print(f"{name} {precision}: {measured['median']:,.0f} img/s", file=sys.stderr)
    print("BENCH_RESULT " + json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "cases": results}))


if __name__ == "__main__":
    main()
