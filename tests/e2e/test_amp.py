"""--amp: mixed precision trains as well as float32, and fp16's overflows are the loss scaler's job."""

import pytest

from tests.helpers import FRAMEWORKS, assert_ok, final_accuracy, run_training

EMULATED = "warning: --amp bf16 is emulated on this CPU"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bf16_trains_to_within_one_percent_of_float32(framework, monkeypatch):
    """Played as a CPU without native bf16 (CNN_PARALLEL_CPU_FLAGS), the bf16 run says so in
    one line at start-up and trains on; on one with AVX512_BF16 nothing is said."""
    monkeypatch.setenv("CNN_PARALLEL_CPU_FLAGS", "sse4_2 avx2 fma")
    runs = {amp: assert_ok(run_training(["--epochs", 4, "--amp", amp], framework=framework)).stdout
            for amp in ("off", "bf16")}
    accuracy = {amp: final_accuracy(stdout) for amp, stdout in runs.items()}
    assert accuracy["off"] > 0.8, accuracy  # it learned: the comparison means something
    assert accuracy["bf16"] >= accuracy["off"] - 0.01, accuracy
    assert [line for line in runs["bf16"].splitlines() if EMULATED in line] and EMULATED not in runs["off"]
    monkeypatch.setenv("CNN_PARALLEL_CPU_FLAGS", "sse4_2 avx2 fma avx512f avx512_bf16")
    native = assert_ok(run_training(["--epochs", 1, "--steps-per-epoch", 1, "--amp", "bf16"], framework=framework))
    assert "emulated" not in native.stdout


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
