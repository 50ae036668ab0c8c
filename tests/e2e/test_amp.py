"""--amp: mixed precision trains as well as float32, and fp16's overflows are the loss scaler's job."""

import pytest

from tests.helpers import FRAMEWORKS, assert_ok, final_accuracy, run_training


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bf16_trains_to_within_one_percent_of_float32(framework):
    accuracy = {amp: final_accuracy(assert_ok(run_training(["--epochs", 4, "--amp", amp],
                                                           framework=framework)).stdout)
                for amp in ("off", "bf16")}
    assert accuracy["off"] > 0.8, accuracy  # it learned: the comparison means something
    assert accuracy["bf16"] >= accuracy["off"] - 0.01, accuracy


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_fp16_overflow_is_skipped_by_the_loss_scaler_not_stopped_by_the_nan_guard(framework):
    """A loss scale of 1e9 overflows fp16's gradients (max 65504) for the first steps:
    each such step is skipped and the scale halved until the gradients fit, and the
    run trains on. Without the scaler's check those inf/NaN gradients would reach the
    weights, the loss would turn NaN and the NaN guard would stop the run."""
    result = assert_ok(run_training(["--model", "resnet8", "--epochs", 2, "--steps-per-epoch", 12,
                                     "--batch-size", 32, "--amp", "fp16", "--loss-scale", 1e9],
                                    framework=framework))
    skipped = [line for line in result.stdout.splitlines() if "step skipped" in line]
    assert 5 <= len(skipped) < 24, result.stdout  # ~1e9 -> below 65504 takes about 14 halvings
    assert "NaN" not in result.stdout + result.stderr
    assert final_accuracy(result.stdout) > 0.3
