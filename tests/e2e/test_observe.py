"""What a run shows: TensorBoard events with the same tags in both frameworks and modes,
curves overlaid from metrics files, evaluation-only runs recorded."""

import json

import numpy as np
import pytest
from PIL import Image

from common import plot
from common.tensorboard import CONFIG_TAG, EPOCH_TAGS, STEP_LOSS_TAG
from tests.helpers import assert_ok, checkpoint_path, run_training


def read_events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return accumulator


def test_torch_ranks_and_a_tf_pipeline_log_the_same_tags_and_their_curves_overlay(tmp_path):
    runs = {"torch": (["--checkpoint-dir", tmp_path / "ckpt"], 2, "torch"),
            "tf": (["--mode", "model", "--pp", 2, "--microbatches", 2], 2, "tf")}
    tags = {}
    for name, (layout, np_, framework) in runs.items():
        assert_ok(run_training(["--epochs", 2, "--steps-per-epoch", 6, "--batch-size", 32, *layout,
                                "--tensorboard", tmp_path / f"tb-{name}", "--log-every", 3,
                                "--metrics-file", tmp_path / f"{name}.jsonl"], np_=np_, framework=framework))
        events = read_events(tmp_path / f"tb-{name}")
        records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        tags[name] = set(events.Tags()["scalars"])
        for key, tag in EPOCH_TAGS.items():
            logged = [(event.step, event.value) for event in events.Scalars(tag)]
            assert logged == [(record["epoch"], pytest.approx(record[key], rel=1e-6)) for record in records], tag
        step_losses = events.Scalars(STEP_LOSS_TAG)
        assert [event.step for event in step_losses] == [3, 6, 9, 12]
        assert all(0 < event.value < 5 for event in step_losses)
        assert CONFIG_TAG in " ".join(events.Tags()["tensors"])  # the configuration as text
    assert tags["torch"] == tags["tf"] == {*EPOCH_TAGS.values(), STEP_LOSS_TAG}

    # The same 12 steps on the same batches: the curves coincide, one line each.
    drawn = plot.plot_runs([str(tmp_path / "torch.jsonl"), str(tmp_path / "tf.jsonl")], str(tmp_path / "c.png"))
    assert set(drawn.values()) == {2}
    with Image.open(tmp_path / "c.png") as image:
        image.verify()
    torch_loss = [json.loads(line)["train_loss"] for line in (tmp_path / "torch.jsonl").read_text().splitlines()]
    tf_loss = [json.loads(line)["train_loss"] for line in (tmp_path / "tf.jsonl").read_text().splitlines()]
    assert np.allclose(torch_loss, tf_loss, rtol=1e-4)

    # Evaluating the checkpoint is recorded like an epoch, in the file and in TensorBoard.
    result = assert_ok(run_training(["--epochs", 0, "--init-from", checkpoint_path(tmp_path / "ckpt", 2),
                                     "--metrics-file", tmp_path / "eval.jsonl", "--tensorboard", tmp_path / "tb-eval"],
                                    framework="tf"))
    record = json.loads((tmp_path / "eval.jsonl").read_text())
    assert record["evaluation_only"] and record["epoch"] == 0
    assert f"final test accuracy: {record['test_accuracy']:.4f}" in result.stdout
    logged = read_events(tmp_path / "tb-eval").Scalars("test/accuracy")
    assert [(event.step, event.value) for event in logged] == [(0, pytest.approx(record["test_accuracy"]))]
