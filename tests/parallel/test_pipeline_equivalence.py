"""Model parallel and hybrid compute what one process computes.

Each case runs the real entry script for two SGD-with-momentum steps under
mpirun and compares every weight of the saved (whole-model) checkpoint with a
single-process run. The seed CNN has no BatchNorm, so micro-batching must not
change the maths at all. For the ResNet, each micro-batch is normalised with
its own statistics, so the reference is data mode cutting the same
micro-batches with --accumulation-steps. A gradient that is not passed back
(zeros instead) leaves the earlier stages' weights off by far more than the
tolerance; one never sent at all blocks the job until the test's time limit.
"""

import pytest

from tests.helpers import FRAMEWORKS, assert_ok, checkpoint_path, checkpoint_weights, relative_difference, run_training

TOLERANCE = 1e-5
# 50 samples do not divide evenly: 4 micro-batches are 13/13/12/12 (one process with
# --accumulation-steps 4 cuts the same), 2 replicas x 2 micro-batches 13/12 each (as
# data mode on 2 ranks with --accumulation-steps 2).
# Dropout before the classifier: a micro-batch's masks must be its samples' (seed, epoch,
# index) masks on whichever stage and replica holds the layer.
STEPS = ["--epochs", 1, "--steps-per-epoch", 2, "--lr", 0.1, "--momentum", 0.9, "--batch-size", 50,
         "--dropout", 0.25]
RESNET = {"model": "resnet8", "input_shape": [1, 8, 8], "num_classes": 10}
# Each schedule with one and several micro-batches and both depths in PyTorch (the
# schedules themselves are checked for every (schedule, stage, M) by simulation in
# tests/unit/test_schedule.py); TensorFlow runs the same common/ pipeline code with
# pp 2 here, and pp 3 with GPipe in the BatchNorm test below. Interleaved: 2 ranks
# holding 2 pieces each, so every micro-batch crosses between the ranks three times.
# GPipe with 4 micro-batches on 2 stages, and TF hybrid, run across two hosts:
# tests/e2e/test_multi_node.py::test_mpirun_hostfile_pipelines_equal_one_process.
# Where PyTorch hands MPI its tensors (--p2p-memory): as arrays of their own memory
# (auto on a CPU), copied through buffers of their own (host: what a GPU does with
# page-locked memory) or the tensors themselves (device: what a CUDA-aware MPI takes).
# ZB-H1 on 3 stages: the middle and last stages each hold back weight gradients.
PIPELINES = [("torch", "gpipe", 1, 3, "auto"), ("torch", "1f1b", 2, 3, "host"),
             ("torch", "interleaved", 4, 2, "device"), ("tf", "1f1b", 4, 2, "auto"),
             ("tf", "interleaved", 4, 2, "host"), ("torch", "zb", 4, 3, "auto"), ("tf", "zb", 4, 3, "auto")]


def weights_after(tmp_path, framework, name, extra, np_=None, architecture=None):
    directory = tmp_path / f"{framework}-{name}"
    assert_ok(run_training([*STEPS, "--checkpoint-dir", directory, *extra], np_=np_, framework=framework,
                           timeout=180))
    return checkpoint_weights(checkpoint_path(directory, 1), architecture)


def assert_same_weights(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert relative_difference(actual[key], value) <= TOLERANCE, key


@pytest.fixture(scope="module")
def single_process_cnn(tmp_path_factory):
    """The reference weights, per framework, computed once."""
    directory = tmp_path_factory.mktemp("reference")
    return {framework: weights_after(directory, framework, "single", []) for framework in FRAMEWORKS}


@pytest.mark.parametrize("framework,schedule,microbatches,pp,p2p_memory", PIPELINES)
def test_pipeline_equals_single_process(tmp_path, single_process_cnn, framework, schedule, microbatches, pp,
                                        p2p_memory):
    pipelined = weights_after(tmp_path, framework, "pipeline", ["--mode", "model", "--pp", pp, "--microbatches",
                                                                microbatches, "--schedule", schedule,
                                                                "--p2p-memory", p2p_memory], np_=pp)
    assert_same_weights(pipelined, single_process_cnn[framework])


def test_interleaved_hybrid_equals_single_process(tmp_path, single_process_cnn):
    """Two replicas of a 2-stage pipeline whose ranks hold two pieces each: both pieces of a
    rank allreduce over its stage's replicas. (Hybrid 1F1B: the BatchNorm test below.)"""
    framework = "torch"
    hybrid = weights_after(tmp_path, framework, "hybrid", ["--mode", "hybrid", "--pp", 2, "--dp", 2,
                                                           "--microbatches", 2, "--schedule", "interleaved"], np_=4)
    assert_same_weights(hybrid, single_process_cnn[framework])


@pytest.mark.parametrize("framework,pp,schedule", [("torch", 2, "1f1b"), ("tf", 3, "gpipe"), ("torch", 3, "zb"),
                                                    ("tf", 2, "zb")])
def test_batchnorm_pipeline_equals_data_mode_with_the_same_microbatches(tmp_path, framework, pp, schedule):
    reference = weights_after(tmp_path, framework, "data", ["--model", "resnet", "--accumulation-steps", 4],
                              architecture=RESNET)
    pipelined = weights_after(tmp_path, framework, "pipeline", ["--model", "resnet", "--mode", "model", "--pp", pp,
                                                                "--microbatches", 4, "--schedule", schedule],
                              np_=pp, architecture=RESNET)
    assert any(key.endswith("bn.mean") for key in reference)
    assert_same_weights(pipelined, reference)  # running statistics included


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_batchnorm_hybrid_equals_data_parallel_with_the_same_microbatches(tmp_path, framework):
    reference = weights_after(tmp_path, framework, "data", ["--model", "resnet", "--accumulation-steps", 2],
                              np_=2, architecture=RESNET)
    hybrid = weights_after(tmp_path, framework, "hybrid", ["--model", "resnet", "--mode", "hybrid", "--pp", 2,
                                                           "--dp", 2, "--microbatches", 2], np_=4,
                           architecture=RESNET)
    assert_same_weights(hybrid, reference)


# --recompute: the same steps, each layer's forward run again at the backward with BatchNorm's
# running statistics left alone; in data mode, and in a pipeline (where a TensorFlow stage
# before the last also recomputes the whole stage). The BatchNorm ResNet makes a second
# statistics update at the recomputation show: the running means would move twice.
@pytest.mark.parametrize("framework,layout", [(framework, layout) for framework in FRAMEWORKS
                                              for layout in ("data", "model")])
def test_recompute_computes_what_keeping_the_activations_does(tmp_path, framework, layout):
    flags, np_ = (["--mode", "model", "--pp", 2, "--microbatches", 2], 2) if layout == "model" else ([], None)
    kept = weights_after(tmp_path, framework, "kept", ["--model", "resnet", *flags], np_=np_, architecture=RESNET)
    again = weights_after(tmp_path, framework, "recomputed", ["--model", "resnet", *flags, "--recompute"], np_=np_,
                          architecture=RESNET)
    assert_same_weights(again, kept)  # running statistics included
