"""End to end: model-parallel and hybrid training from the entry script."""

import re

import pytest

from tests.helpers import assert_ok, checkpoint_weights, final_accuracy, relative_difference, run_training

FRAMEWORK = "torch"


@pytest.mark.parametrize("layout,np_", [
    (["--mode", "model", "--pp", 2, "--microbatches", 4], 2),
    (["--mode", "hybrid", "--pp", 2, "--dp", 2], 4),
])
def test_pipelines_learn_digits(layout, np_):
    result = assert_ok(run_training(["--epochs", 10, *layout], np_=np_, framework=FRAMEWORK))
    assert final_accuracy(result.stdout) >= 0.95
    assert "stage 1: layers" in result.stdout


STEPS = ["--steps-per-epoch", 4, "--batch-size", 32]
LAYOUTS = {"data": ([], None), "pp1": (["--mode", "model", "--pp", 1], None),
           "pp2": (["--mode", "model", "--pp", 2, "--microbatches", 2], 2),
           "pp3": (["--mode", "model", "--pp", 3, "--microbatches", 4, "--schedule", "gpipe"], 3)}


@pytest.mark.parametrize("first,then", [("pp2", "data"), ("pp2", "pp1"), ("data", "pp3"), ("pp3", "pp2")])
def test_checkpoints_resume_in_any_layout(tmp_path, first, then):
    """Two epochs in one layout, the third resumed in another, end where three
    uninterrupted epochs in the first layout end (the seed CNN has no BatchNorm,
    so every layout computes the same steps)."""
    (first_args, first_np), (then_args, then_np) = LAYOUTS[first], LAYOUTS[then]
    assert_ok(run_training([*STEPS, *first_args, "--epochs", 3, "--checkpoint-dir", tmp_path / "straight"],
                           np_=first_np, framework=FRAMEWORK))
    assert_ok(run_training([*STEPS, *first_args, "--epochs", 2, "--checkpoint-dir", tmp_path / "moved"],
                           np_=first_np, framework=FRAMEWORK))
    resumed = assert_ok(run_training([*STEPS, *then_args, "--epochs", 3, "--checkpoint-dir", tmp_path / "moved",
                                      "--resume"], np_=then_np, framework=FRAMEWORK))
    assert "resumed from" in resumed.stdout and "epoch 3/3" in resumed.stdout
    straight = checkpoint_weights(tmp_path / "straight" / "ckpt-epoch0003.pt")
    moved = checkpoint_weights(tmp_path / "moved" / "ckpt-epoch0003.pt")
    for key, value in straight.items():
        assert relative_difference(moved[key], value) <= 1e-5, key


@pytest.mark.parametrize("args,np_,pattern", [
    (["--mode", "model", "--pp", 8], None, "--pp 8 is more stages than the model's 7 layers"),
    (["--mode", "hybrid", "--pp", 2], 3, "multiple of 2 ranks but 3 were launched"),
    (["--mode", "model", "--pp", 2], 3, "needs exactly 2 ranks, got 3"),
    (["--mode", "model", "--pp", 2, "--microbatches", 4, "--batch-size", 30], 2,
     "does not split into 1 replica.* x 4 micro-batches"),
    (["--mode", "model", "--pp", 2, "--split", 9], 2, "--split '9' is out of range"),
    (["--mode", "model"], None, "--mode model needs --pp K"),
    (["--mode", "model", "--pp", 2, "--accumulation-steps", 2], 2, "is for --mode data"),
])
def test_impossible_layouts_end_every_rank_with_one_line(args, np_, pattern):
    result = run_training(["--epochs", 1, *args], np_=np_, framework=FRAMEWORK, timeout=60)
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), result.stderr
