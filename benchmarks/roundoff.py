"""How far round-off alone moves a run: one process trains the elastic test's job (digits CNN,
lr 0.01, 26 epochs), then resumes from an early epoch with every weight perturbed by relative
``--scale`` Gaussian noise (the size of the round-off a different summation order makes), once
per seed, and prints each epoch's distance to the unperturbed run. Seed 0 perturbs nothing: it
shows that the resume itself is exact.

    python benchmarks/roundoff.py --out /tmp/roundoff --seeds 12
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.helpers import (  # noqa: E402
    assert_ok,
    checkpoint_path,
    checkpoint_weights,
    relative_difference,
    run_training,
)

EPOCHS = 26
ARGS = ["--epochs", EPOCHS, "--lr", 0.01, "--threads", 1, "--keep-checkpoints", EPOCHS]
SHARD = "shard-000.safetensors"


def whole_model(directory: str, epoch: int) -> np.ndarray:
    weights = checkpoint_weights(checkpoint_path(directory, epoch))
    return np.concatenate([weights[key].ravel() for key in sorted(weights)])


def perturbed_run(out: str, reference: str, expected: dict[int, np.ndarray], start: int, seed: int,
                  scale: float) -> list[float]:
    from safetensors.numpy import load_file, save_file

    directory = os.path.join(out, f"seed{seed}")
    shutil.rmtree(directory, ignore_errors=True)
    source, target = str(checkpoint_path(reference, start)), str(checkpoint_path(directory, start))
    shutil.copytree(source, target)
    tensors = load_file(os.path.join(source, SHARD))
    noise = np.random.default_rng(seed)
    for key, value in tensors.items():
        if key.startswith("weights/") and seed:
            tensors[key] = (value * (1 + scale * noise.standard_normal(value.shape))).astype(value.dtype)
    save_file(tensors, os.path.join(target, SHARD))
    assert_ok(run_training([*ARGS, "--checkpoint-dir", directory, "--resume"]))
    return [relative_difference(whole_model(directory, epoch), expected[epoch]) for epoch in expected]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--start", type=int, default=3, help="the epoch resumed from, perturbed")
    parser.add_argument("--scale", type=float, default=1e-7)
    args = parser.parse_args()
    reference = os.path.join(args.out, "reference")
    if not os.path.exists(str(checkpoint_path(reference, EPOCHS))):
        shutil.rmtree(reference, ignore_errors=True)
        assert_ok(run_training([*ARGS, "--checkpoint-dir", reference]))
    expected = {epoch: whole_model(reference, epoch) for epoch in range(args.start, EPOCHS + 1)}
    print(f"distance to the unperturbed run, epochs {args.start}..{EPOCHS}")
    for seed in range(args.seeds + 1):
        distances = perturbed_run(args.out, reference, expected, args.start, seed, args.scale)
        print(f"seed {seed:2d}: " + " ".join(f"{value:.1e}" for value in distances), flush=True)


if __name__ == "__main__":
    main()
