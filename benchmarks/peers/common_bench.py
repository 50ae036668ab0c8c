"""What the peer benchmarks share: the same model, data and timing as our entry scripts.

Each peer prints one line ``BENCH_RESULT {json}`` on its first rank: the
images/sec of every timed window (the first ``warmup`` windows are dropped by
benchmarks/run.py).
"""

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from common.model import networks  # noqa: E402


def parse(extra=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--model", default="cnn", help="a common/model/networks.py network")
    parser.add_argument("--shape", default="3,32,32")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    for name, kwargs in (extra or {}).items():
        parser.add_argument(name, **kwargs)
    args = parser.parse_args()
    args.image_shape = tuple(int(part) for part in args.shape.split(","))
    args.specs = networks.model_specs(args.model, args.image_shape, 10)
    return args


def torchvision_datasets_and_transforms():
    """torchvision's datasets and transforms modules, also beside CPU PyTorch: the torchvision
    wheel the registries serve is built for CUDA PyTorch, its C++ ops do not load beside CPU
    PyTorch, and registering their Python fakes then fails. The datasets and PIL transforms
    need none of them."""
    import torch.library

    register_fake = torch.library.register_fake
    torch.library.register_fake = lambda *a, **k: (lambda function: function)
    try:
        from torchvision import datasets, transforms
    finally:
        torch.library.register_fake = register_fake
    return datasets, transforms


def synthetic_batch(batch, image_shape, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, *image_shape)).astype(np.float32),
            rng.integers(0, 10, batch).astype(np.int64))


def timed_windows(step, windows, steps, images_per_step):
    """Run ``step()`` in ``windows`` windows of ``steps``; images/sec of each."""
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * images_per_step / (time.perf_counter() - start))
    return rates


def report(rates, **extra):
    print("BENCH_RESULT " + json.dumps({"images_per_sec": rates, **extra}), flush=True)
