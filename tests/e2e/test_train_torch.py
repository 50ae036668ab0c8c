"""End to end: the PyTorch entry script under horovodrun and mpirun."""

import json

import torch

from tests.helpers import assert_ok, final_accuracy, relative_difference, run_training

METRIC_KEYS = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_sec",
               "images_per_sec_per_rank", "world_size", "mode", "framework"}


def test_two_ranks_learn_digits_with_horovodrun(tmp_path):
    metrics_file = tmp_path / "metrics.jsonl"
    result = assert_ok(run_training(["--epochs", 10, "--metrics-file", metrics_file], np_=2,
                                    launcher="horovodrun"))
    assert final_accuracy(result.stdout) >= 0.95
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert [record["epoch"] for record in records] == list(range(1, 11))
    assert METRIC_KEYS <= set(records[-1])
    assert (records[-1]["world_size"], records[-1]["mode"], records[-1]["framework"]) == (2, "data", "pytorch")
    assert records[-1]["test_accuracy"] >= 0.95


def test_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path):
    args = ["--model", "resnet", "--steps-per-epoch", 6, "--batch-size", 32]
    assert_ok(run_training([*args, "--epochs", 3, "--checkpoint-dir", tmp_path / "straight"], np_=2))
    assert_ok(run_training([*args, "--epochs", 2, "--checkpoint-dir", tmp_path / "split"], np_=2))
    resumed = assert_ok(run_training([*args, "--epochs", 3, "--checkpoint-dir", tmp_path / "split",
                                      "--resume"], np_=2))
    assert "resumed from" in resumed.stdout and "ckpt-epoch0002.pt" in resumed.stdout
    assert "epoch 1/3" not in resumed.stdout and "epoch 3/3" in resumed.stdout

    straight = torch.load(tmp_path / "straight" / "ckpt-epoch0003.pt", weights_only=False)
    split = torch.load(tmp_path / "split" / "ckpt-epoch0003.pt", weights_only=False)
    for name, value in straight["model"].items():  # includes BatchNorm running statistics
        assert relative_difference(split["model"][name], value) <= 1e-6, name
    for key, value in straight["optimizer"]["state"].items():
        assert relative_difference(split["optimizer"]["state"][key]["momentum_buffer"],
                                   value["momentum_buffer"]) <= 1e-6


def test_synthetic_reports_throughput_per_rank_and_total():
    result = assert_ok(run_training(["--dataset", "synthetic", "--synthetic-samples", 512, "--epochs", 1],
                                    np_=2, launcher="horovodrun"))
    line = next(line for line in result.stdout.splitlines() if "img/s" in line)
    assert "/rank x 2" in line
