"""End to end: both entry scripts under horovodrun and mpirun."""

import json

import pytest

from tests.helpers import (
    FRAMEWORKS,
    assert_ok,
    checkpoint_path,
    checkpoint_weights,
    completed,
    final_accuracy,
    optimizer_arrays,
    relative_difference,
    run_training,
)

METRIC_KEYS = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_sec",
               "images_per_sec_per_rank", "world_size", "mode", "framework"}
OTHER = {"torch": "tf", "tf": "torch"}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_two_ranks_learn_digits_and_the_other_framework_agrees(tmp_path, framework):
    metrics_file = tmp_path / "metrics.jsonl"
    result = assert_ok(run_training(["--epochs", 10, "--metrics-file", metrics_file, "--checkpoint-dir",
                                     tmp_path / "run", "--run-dir", tmp_path / "rd"], np_=2, launcher="horovodrun",
                                    framework=framework))
    accuracy = final_accuracy(result)
    assert accuracy >= 0.95
    epoch_line = next(line for line in result.stdout.splitlines() if "img/s" in line)
    assert "/rank x 2" in epoch_line  # throughput per rank and in total
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert [record["epoch"] for record in records] == list(range(1, 11))
    assert METRIC_KEYS <= set(records[-1])
    assert (records[-1]["world_size"], records[-1]["mode"]) == (2, "data")
    assert records[-1]["framework"] == framework
    # command.sh repeats the launch as typed: horovodrun's line, not the mpirun line it became.
    *_, comment, _, command = (tmp_path / "rd" / "command.sh").read_text().splitlines()
    assert comment.endswith("launched by horovodrun") and command.startswith("horovodrun -np 2 "), command
    assert " -x " not in command and command.count("main.py") == 1, command

    # The trained model, evaluated by the other framework, scores the same.
    evaluated = assert_ok(run_training(["--epochs", 0, "--init-from", checkpoint_path(tmp_path / "run", 10)],
                                       framework=OTHER[framework]))
    assert abs(final_accuracy(evaluated) - accuracy) <= 0.001


def test_dropout_is_on_and_the_same_in_both_frameworks(tmp_path):
    """--dropout 0.5 on the seed CNN, three steps in one process: PyTorch and TensorFlow end at
    the same weights (the masks are hashed from the samples, not drawn from either framework's
    random stream), apart from the same run without dropout (the masks are really applied)."""
    runs = {}
    for name, framework, rate in (("torch", "torch", 0.5), ("tf", "tf", 0.5), ("none", "torch", 0)):
        directory = tmp_path / name
        assert_ok(run_training(["--epochs", 1, "--steps-per-epoch", 3, "--lr", 0.1, "--dropout", rate,
                                "--checkpoint-dir", directory], framework=framework))
        runs[name] = checkpoint_weights(checkpoint_path(directory, 1))
    for key, value in runs["torch"].items():
        assert relative_difference(runs["tf"][key], value) <= 1e-5, key
    assert relative_difference(runs["none"]["6.kernel"], runs["torch"]["6.kernel"]) > 1e-3  # 100x the bound above


@pytest.mark.parametrize("framework", ["torch"])  # TensorFlow resumes in test_stop_resume and the moves
def test_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path, framework):
    args = ["--model", "resnet", "--steps-per-epoch", 6, "--batch-size", 32]
    assert_ok(run_training([*args, "--epochs", 3, "--checkpoint-dir", tmp_path / "straight"], np_=2,
                           framework=framework))
    assert_ok(run_training([*args, "--epochs", 2, "--checkpoint-dir", tmp_path / "split"], np_=2,
                           framework=framework))
    resumed = assert_ok(run_training([*args, "--epochs", 3, "--checkpoint-dir", tmp_path / "split", "--resume"],
                                     np_=2, framework=framework))
    summary = completed(resumed)
    assert summary["resumed"] == {"path": str(checkpoint_path(tmp_path / "split", 2)), "epochs_done": 2,
                                  "steps_into_next": 0}
    assert summary["epochs_done"] == 3

    architecture = {"model": "resnet8", "input_shape": [1, 8, 8], "num_classes": 10}
    straight_path = checkpoint_path(tmp_path / "straight", 3)
    split_path = checkpoint_path(tmp_path / "split", 3)
    straight = checkpoint_weights(straight_path, architecture)
    split = checkpoint_weights(split_path, architecture)
    for name, value in straight.items():  # includes BatchNorm running statistics
        assert relative_difference(split[name], value) <= 1e-6, name
    straight_state = optimizer_arrays(straight_path, architecture)
    split_state = optimizer_arrays(split_path, architecture)
    assert straight_state.keys() == split_state.keys() and straight_state  # the momentum buffers
    for name, value in straight_state.items():
        assert relative_difference(split_state[name], value) <= 1e-6, name
