"""End to end: model-parallel and hybrid training from the entry script."""

import re

import pytest

from tests.helpers import (
    assert_ok,
    checkpoint_path,
    checkpoint_weights,
    completed,
    final_accuracy,
    relative_difference,
    run_training,
)

OTHER = {"torch": "tf", "tf": "torch"}


# Hybrid runs are left to tests/parallel (hybrid = one process, both frameworks) and the zoo's
# PyTorch hybrids, to keep the suite's time in check.
@pytest.mark.parametrize("framework,layout,np_", [
    ("torch", ["--mode", "model", "--pp", 2, "--microbatches", 4], 2),
    ("tf", ["--mode", "model", "--pp", 2, "--microbatches", 4], 2),
])
def test_pipelines_learn_digits_and_data_mode_of_the_other_framework_agrees(tmp_path, framework, layout, np_):
    result = assert_ok(run_training(["--epochs", 10, "--checkpoint-dir", tmp_path, *layout], np_=np_,
                                    framework=framework))
    accuracy = final_accuracy(result)
    assert accuracy >= 0.95
    pieces = result.summary["layer_ranges"]  # two stages that cover the model in order
    assert len(pieces) == 2 and pieces[0][0] == 0 and pieces[0][1] == pieces[1][0] and pieces[0][1] > 0
    # The whole-model checkpoint a pipeline writes evaluates the same in data mode, other framework.
    evaluated = assert_ok(run_training(["--epochs", 0, "--init-from", checkpoint_path(tmp_path, 10)],
                                       framework=OTHER[framework]))
    assert abs(final_accuracy(evaluated) - accuracy) <= 0.001


STEPS = ["--steps-per-epoch", 4, "--batch-size", 32]
LAYOUTS = {"data": ([], None), "pp1": (["--mode", "model", "--pp", 1], None),
           "pp2": (["--mode", "model", "--pp", 2, "--microbatches", 2], 2),
           "pp3": (["--mode", "model", "--pp", 3, "--microbatches", 4, "--schedule", "gpipe"], 3)}


def test_a_pipeline_checkpoint_resumes_as_a_one_stage_pipeline(tmp_path):
    """Two epochs as a 2-stage pipeline and the third resumed as a 1-stage one end where
    three uninterrupted single-process epochs end (the seed CNN has no BatchNorm, so every
    layout computes the same steps). Moves between data, pp 2, pp 3 and ps in both
    frameworks are tests/e2e/test_checkpoint_moves.py's."""
    assert_ok(run_training([*STEPS, "--epochs", 3, "--checkpoint-dir", tmp_path / "straight"]))
    (first_args, first_np), (then_args, then_np) = LAYOUTS["pp2"], LAYOUTS["pp1"]
    assert_ok(run_training([*STEPS, *first_args, "--epochs", 2, "--checkpoint-dir", tmp_path / "moved"],
                           np_=first_np))
    resumed = assert_ok(run_training([*STEPS, *then_args, "--epochs", 3, "--checkpoint-dir", tmp_path / "moved",
                                      "--resume"], np_=then_np))
    summary = completed(resumed)
    assert summary["resumed"]["epochs_done"] == 2 and summary["epochs_done"] == 3 and summary["pp"] == 1
    straight = checkpoint_weights(checkpoint_path(tmp_path / "straight", 3))
    moved = checkpoint_weights(checkpoint_path(tmp_path / "moved", 3))
    for key, value in straight.items():
        assert relative_difference(moved[key], value) <= 1e-5, key


IMPOSSIBLE = [
    (["--mode", "model", "--pp", 8], None, "--pp 8 is more stages than the model's 7 layers"),
    (["--mode", "hybrid", "--pp", 2], 3, "multiple of 2 ranks but 3 were launched"),
    (["--mode", "model", "--pp", 2], 3, "needs exactly 2 ranks, got 3"),
    (["--mode", "model", "--pp", 2, "--microbatches", 4, "--batch-size", 3], 2,
     "global batch 3 is smaller than 1 replica.* x 4 micro-batches"),
    (["--mode", "model", "--pp", 2, "--split", 9], 2, "--split '9' is out of range"),
    (["--mode", "model"], None, "--mode model needs --pp K"),
    (["--mode", "model", "--pp", 2, "--accumulation-steps", 2], 2, "is for --mode data"),
]


# Every check runs in common/ before any framework import, so TensorFlow's entry script
# takes two of them (one launched as several ranks) and PyTorch's all.
@pytest.mark.parametrize("framework,args,np_,pattern",
                         [("torch", *case) for case in IMPOSSIBLE] + [("tf", *IMPOSSIBLE[0]), ("tf", *IMPOSSIBLE[1])])
def test_impossible_layouts_end_every_rank_with_one_line(framework, args, np_, pattern):
    result = run_training(["--epochs", 1, *args], np_=np_, framework=framework, timeout=60)
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), result.stderr
