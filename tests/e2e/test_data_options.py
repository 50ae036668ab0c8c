"""Data-mode options, each trained end to end and held to what it must change:
--fp16-allreduce rounds the summed gradients (and nothing else), --adasum
combines them differently from a sum yet still learns, --batch-size-per-rank
scales the LR with the ranks after the documented warmup."""

import json

import numpy as np
import pytest

from common.model import networks, weights
from tests.helpers import (
    DIGITS_CNN,
    FRAMEWORKS,
    assert_ok,
    checkpoint_path,
    checkpoint_weights,
    final_accuracy,
    relative_difference,
    run_training,
)

STEPS = ["--epochs", 1, "--steps-per-epoch", 3, "--lr", 0.1]


def weight_changes(tmp_path, name, framework, *extra):
    """How far 3 steps on 2 ranks moved each weight from the seed's initial value."""
    directory = tmp_path / name
    assert_ok(run_training([*STEPS, *extra, "--checkpoint-dir", directory], np_=2, framework=framework))
    shape = tuple(DIGITS_CNN["input_shape"])
    initial = weights.initial_weights(networks.model_specs("cnn", shape, 10), shape, seed=0)
    return {key: value - initial[key] for key, value in checkpoint_weights(checkpoint_path(directory, 1)).items()}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_fp16_allreduce_rounds_the_sum_and_adasum_replaces_it_yet_learns(tmp_path, framework):
    exact = weight_changes(tmp_path, "fp32", framework)
    rounded = weight_changes(tmp_path, "fp16", framework, "--fp16-allreduce")
    for key, change in exact.items():
        assert relative_difference(rounded[key], change) <= 1e-2, key  # fp16 keeps ~3 decimal digits
    assert any(not np.array_equal(rounded[key], change) for key in exact), "fp16 compression changed nothing"

    adasum = weight_changes(tmp_path, "adasum", framework, "--adasum")
    assert max(relative_difference(adasum[key], change) for key, change in exact.items()) > 1e-2
    learned = assert_ok(run_training(["--epochs", 8, "--adasum"], np_=2, framework=framework))
    assert final_accuracy(learned) >= 0.9


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_batch_size_per_rank_scales_the_lr_after_warmup(tmp_path, framework):
    metrics_file = tmp_path / "metrics.jsonl"
    assert_ok(run_training(["--batch-size-per-rank", 16, "--lr", 0.05, "--warmup-epochs", 2, "--epochs", 3,
                            "--steps-per-epoch", 4, "--metrics-file", metrics_file], np_=2, framework=framework))
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert [record["global_batch_size"] for record in records] == [32, 32, 32]
    # From --lr towards 2 x --lr over 2 epochs of 4 steps; the LR at each epoch's last step:
    assert [record["lr"] for record in records] == pytest.approx([0.05 + 0.05 * 4 / 8, 0.1, 0.1])
