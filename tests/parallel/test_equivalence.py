"""Data parallel: N ranks sharing a global batch B compute what one process computes on B.

Runs the real entry scripts (mpirun -np 2 vs one process) for a few optimizer
steps and compares every weight of the saved checkpoints. Without the
gradient allreduce each rank would step on its half of the batch only, and
the weights would differ by far more than the tolerance (about 1e-3).
"""

import json

import pytest

from common.model import networks, weights
from tests.helpers import (
    DIGITS_CNN,
    FRAMEWORKS,
    assert_ok,
    checkpoint_path,
    checkpoint_weights,
    folder_args,
    folder_cnn,
    relative_difference,
    run_training,
)

TOLERANCE = 1e-6
RESNET8 = {"model": "resnet8", "input_shape": [1, 8, 8], "num_classes": 10}
CASES = {
    # Real images streamed from a folder with random-resized crops and flips, and dropout
    # before the classifier: each sample's crop, flip and mask depend on (seed, epoch,
    # index) only, not on the rank that holds it.
    "augmented-images": ["--momentum", "0", "--batch-size", "30", "--dropout", "0.5"],
}
# Uneven shares (63 over 4 ranks), accumulation and momentum across two hosts:
# tests/e2e/test_multi_node.py::test_horovodrun_on_two_hosts_equals_one_process.


def train_few_steps(tmp_path, framework, case, np_, data_args, architecture):
    directory = tmp_path / f"{framework}-{case}-np{np_}"
    metrics_file = tmp_path / f"{framework}-{case}-np{np_}.jsonl"
    assert_ok(run_training(["--epochs", 1, "--steps-per-epoch", 3, "--lr", 0.1, "--checkpoint-dir",
                            directory, "--metrics-file", metrics_file, *CASES[case], *data_args],
                           np_=np_, framework=framework))
    return (checkpoint_weights(checkpoint_path(directory, 1), architecture),
            json.loads(metrics_file.read_text().splitlines()[-1]))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_two_ranks_equal_one_rank_on_the_global_batch(tmp_path, request, framework, case):
    images = case == "augmented-images"
    data_args = folder_args(request.getfixturevalue("elpv_small")) if images else []
    architecture = folder_cnn() if images else DIGITS_CNN
    single, single_metrics = train_few_steps(tmp_path, framework, case, None, data_args, architecture)
    parallel, parallel_metrics = train_few_steps(tmp_path, framework, case, 2, data_args, architecture)

    shape = tuple(architecture["input_shape"])
    initial = weights.initial_weights(networks.model_specs("cnn", shape, architecture["num_classes"]), shape, seed=0)
    for name, value in single.items():
        assert relative_difference(value, initial[name]) > 1e-3, f"{name} did not train"
        assert relative_difference(parallel[name], value) <= TOLERANCE, name

    assert parallel_metrics["world_size"] == 2 and single_metrics["world_size"] == 1
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert parallel_metrics[key] == pytest.approx(single_metrics[key], rel=1e-5), key


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_parameter_server_step_equals_one_process(tmp_path, framework):
    """--mode ps on 3 ranks (a server and 2 workers sharing a 63-sample batch 32/31)
    ≡ one process, after three momentum-SGD steps with dropout (Horovod data mode ≡ one process is
    test_two_ranks_equal_one_rank_on_the_global_batch's).
    If the server used one worker's gradient instead of the sum, or the workers
    kept their own parameters instead of the server's, the weights would differ
    by about 1e-3."""
    args = ["--epochs", 1, "--steps-per-epoch", 3, "--lr", 0.1, "--momentum", 0.9, "--batch-size", 63,
            "--dropout", 0.25]
    results = {}
    for name, layout, np_ in (("single", [], None), ("ps", ["--mode", "ps"], 3)):
        directory = tmp_path / name
        assert_ok(run_training([*args, *layout, "--checkpoint-dir", directory], np_=np_, framework=framework))
        results[name] = checkpoint_weights(checkpoint_path(directory, 1))
    for name, value in results["single"].items():
        assert relative_difference(results["ps"][name], value) <= TOLERANCE, name


# The averaging is the ps runner's (common/parallel/parameter_server.py), over either framework's stage.
@pytest.mark.parametrize("framework", ["torch"])
def test_parameter_server_averages_batch_norm_statistics_as_data_mode_does(tmp_path, framework):
    """ResNet-8 (BatchNorm without --sync-bn) after three steps: --mode ps on 3 ranks (2 workers)
    ≡ data mode on 2 ranks, running statistics included. Each worker tracks the statistics of
    its own half of every batch; without their mean the server would save worker 1's, which
    differ from the mean by about 1e-2."""
    args = ["--model", "resnet8", "--epochs", 1, "--steps-per-epoch", 3, "--lr", 0.1, "--momentum", 0.9,
            "--batch-size", 64]
    results = {}
    for name, layout, np_ in (("data", [], 2), ("ps", ["--mode", "ps"], 3)):
        directory = tmp_path / name
        assert_ok(run_training([*args, *layout, "--checkpoint-dir", directory], np_=np_, framework=framework))
        results[name] = checkpoint_weights(checkpoint_path(directory, 1), RESNET8)
    assert any(weights.is_batch_norm_statistic(key) for key in results["data"])
    for name, value in results["data"].items():
        assert relative_difference(results["ps"][name], value) <= TOLERANCE, name
