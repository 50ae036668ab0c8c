"""Graceful stop: a signal to one rank stops every rank at the same step
boundary with a checkpoint and exit 0; resuming ends where an uninterrupted
run ends."""

import signal

import pytest

from tests.helpers import (
    assert_ok,
    checkpoint_path,
    checkpoint_weights,
    completed,
    relative_difference,
    resumed_after,
    run_and_signal_one_rank,
    run_training,
)

# Long enough epochs that the signal lands while training, whatever the machine's load; dropout
# on, whose masks a resumed run must draw again as the uninterrupted run drew them.
ARGS = ["--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--synthetic-samples", 2000,
        "--batch-size", 16, "--epochs", 3, "--dropout", 0.25]
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
    stop = first.summary["stop"]
    assert first.summary["outcome"] == "stopped" and first.summary["test_accuracy"] is None, first.stdout
    assert stop["cause"] in (signal.Signals(signal_number).name, "a signal to another rank"), stop
    assert stop["epochs_done"] == 1 and stop["steps_into_next"] > 0, stop  # mid-epoch 2
    assert stop["checkpoint"] == str(checkpoint_path(stopped, 1, stop["steps_into_next"]))
    assert "continue with --resume" in first.stdout, first.stdout  # the log tells the user how to go on
    resumed = assert_ok(run_training([*ARGS, *layout, "--checkpoint-dir", stopped, "--resume"], np_=np_,
                                     framework=framework))
    # It resumes from the mid-epoch checkpoint the stop wrote, not from the end of epoch 1.
    summary = completed(resumed)
    assert summary["resumed"] == resumed_after(stopped, 1, stop["steps_into_next"])
    assert summary["epochs_done"] == 3

    expected = checkpoint_weights(checkpoint_path(straight, 3), SYNTHETIC)
    actual = checkpoint_weights(checkpoint_path(stopped, 3), SYNTHETIC)
    for key, value in expected.items():
        assert relative_difference(actual[key], value) <= 1e-6, key
