"""--sync-bn: BatchNorm over the global batch makes N ranks compute what one process computes.

ResNet-8 (BatchNorm in every layer) on a 64-sample global batch, three momentum
steps: one process with plain BatchNorm is the reference; 3 ranks (22/21/21,
uneven) in data mode and a 2x2 hybrid (each stage's 2 replicas, 32 samples each,
in one micro-batch) with --sync-bn must match it in every weight and running
statistic. The same batch on 2 ranks WITHOUT --sync-bn (PyTorch), normalised by
each rank's own half, lands measurably elsewhere: the proof that the synchronisation
(forward sums and their gradients' allreduce) is what closes the gap.
"""

import json

import pytest

from common.model.weights import is_batch_norm_statistic
from tests.helpers import FRAMEWORKS, assert_ok, checkpoint_path, checkpoint_weights, relative_difference, run_training

TOLERANCE = 2e-5
RESNET8 = {"model": "resnet8", "input_shape": [1, 8, 8], "num_classes": 10}
ARGS = ["--model", "resnet8", "--epochs", 1, "--steps-per-epoch", 3, "--batch-size", 64, "--lr", 0.1,
        "--momentum", 0.9, "--dropout", 0.25]
SYNCED = {"data np3": (3, ["--sync-bn"]), "hybrid pp2 x dp2": (4, ["--sync-bn", "--mode", "hybrid", "--pp", 2])}


def train(tmp_path, framework, name, np_, extra=()):
    directory, metrics_file = tmp_path / name, tmp_path / f"{name}.jsonl"
    assert_ok(run_training([*ARGS, *extra, "--checkpoint-dir", directory, "--metrics-file", metrics_file],
                           np_=np_, framework=framework))
    return checkpoint_weights(checkpoint_path(directory, 1), RESNET8), json.loads(metrics_file.read_text())


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_sync_bn_ranks_equal_one_process_and_unsynced_ranks_do_not(tmp_path, framework):
    single, single_metrics = train(tmp_path, framework, "single", None)
    runs = {name: train(tmp_path, framework, name.replace(" ", "-"), np_, extra)
            for name, (np_, extra) in SYNCED.items() if framework == "torch" or name == "data np3"}

    statistics = [key for key in single if is_batch_norm_statistic(key)]
    assert len(statistics) == 2 * 9  # stem + 3 blocks x 2 + 2 projections, mean and var each
    for name, (weights, metrics) in runs.items():
        for key, value in single.items():
            assert relative_difference(weights[key], value) <= TOLERANCE, (name, key)
        assert metrics["train_loss"] == pytest.approx(single_metrics["train_loss"], rel=1e-5), name
        assert metrics["test_loss"] == pytest.approx(single_metrics["test_loss"], rel=1e-4), name
    if framework == "torch":  # the control (the synchronisation is the trainer's, alike in both)
        # Per-rank statistics: the running means/variances and the trained weights drift apart.
        unsynced, _ = train(tmp_path, framework, "unsynced", 2)
        drift = max(relative_difference(unsynced[key], single[key]) for key in statistics)
        assert drift > 100 * TOLERANCE, drift
