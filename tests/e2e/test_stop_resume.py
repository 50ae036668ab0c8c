"""Graceful stop: a signal to one rank stops every rank at the same step
boundary with a checkpoint and exit 0; resuming ends where an uninterrupted
run ends."""

import re
import signal

import pytest

from tests.helpers import (
    assert_ok,
    checkpoint_path,
    checkpoint_weights,
    relative_difference,
    run_and_signal_one_rank,
    run_training,
)

# Long enough epochs that the signal lands while training, whatever the machine's load.
ARGS = ["--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--synthetic-samples", 2000,
        "--batch-size", 16, "--epochs", 3]
SYNTHETIC = {"model": "cnn", "input_shape": [1, 8, 8], "num_classes": 10}


@pytest.mark.parametrize("framework,layout,np_,signal_number", [
    ("torch", [], 2, signal.SIGUSR1),
    ("tf", [], 2, signal.SIGTERM),
    ("torch", ["--mode", "model", "--pp", 2, "--microbatches", 2], 2, signal.SIGUSR1),
])
def test_signal_checkpoint_resume_equals_uninterrupted(tmp_path, framework, layout, np_, signal_number):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert_ok(run_training([*ARGS, *layout, "--checkpoint-dir", straight], np_=np_, framework=framework))

    first = assert_ok(run_and_signal_one_rank([*ARGS, *layout, "--checkpoint-dir", stopped], np_, framework,
                                              "epoch 1/3", signal_number))
    assert "stopped by" in first.stdout and "continue with --resume" in first.stdout, first.stdout
    assert "final test accuracy" not in first.stdout
    resumed = assert_ok(run_training([*ARGS, *layout, "--checkpoint-dir", stopped, "--resume"], np_=np_,
                                     framework=framework))
    # It resumes from the mid-epoch checkpoint the stop wrote, not from the end of epoch 1.
    assert re.search(r"resumed from \S+/ckpt-epoch0001-step\d{6} \(\d+ steps into epoch 2\)", resumed.stdout), \
        resumed.stdout
    assert "epoch 3/3" in resumed.stdout and "epoch 1/3" not in resumed.stdout

    expected = checkpoint_weights(checkpoint_path(straight, 3), SYNTHETIC)
    actual = checkpoint_weights(checkpoint_path(stopped, 3), SYNTHETIC)
    for key, value in expected.items():
        assert relative_difference(actual[key], value) <= 1e-6, key
