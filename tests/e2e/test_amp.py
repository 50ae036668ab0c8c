"""--amp: mixed precision trains as well as float32, and fp16's overflows are the loss scaler's job."""

import pytest

from tests.helpers import (
    FRAMEWORKS,
    assert_ok,
    checkpoint_path,
    checkpoint_weights,
    final_accuracy,
    relative_difference,
    run_training,
)

RESNET8 = {"model": "resnet8", "input_shape": [1, 8, 8], "num_classes": 10}
EMULATED = "warning: --amp bf16 is emulated on this CPU"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bf16_trains_to_within_one_percent_of_float32(framework, monkeypatch):
    """Played as a CPU without native bf16 (CNN_PARALLEL_CPU_FLAGS), the bf16 run says so in
    one line at start-up and trains on; on one with AVX512_BF16 nothing is said."""
    monkeypatch.setenv("CNN_PARALLEL_CPU_FLAGS", "sse4_2 avx2 fma")
    runs = {amp: run_training(["--epochs", 4, "--amp", amp], framework=framework) for amp in ("off", "bf16")}
    accuracy = {amp: final_accuracy(result) for amp, result in runs.items()}
    assert accuracy["off"] > 0.8, accuracy  # it learned: the comparison means something
    assert accuracy["bf16"] >= accuracy["off"] - 0.01, accuracy
    logs = {amp: result.stdout for amp, result in runs.items()}
    assert [line for line in logs["bf16"].splitlines() if EMULATED in line] and EMULATED not in logs["off"]
    monkeypatch.setenv("CNN_PARALLEL_CPU_FLAGS", "sse4_2 avx2 fma avx512f avx512_bf16")
    native = assert_ok(run_training(["--epochs", 1, "--steps-per-epoch", 1, "--amp", "bf16"], framework=framework))
    assert "emulated" not in native.stdout


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_fp16_overflow_is_skipped_by_the_loss_scaler_and_its_scale_resumes(tmp_path, framework):
    """A loss scale of 1e9 overflows fp16's gradients (max 65504) for the first steps:
    each such step is skipped and the scale halved until the gradients fit, and the
    run trains on. Without the scaler's check those inf/NaN gradients would reach the
    weights, the loss would turn NaN and the NaN guard would stop the run."""
    import json

    def checkpoint_meta(directory, epoch):
        return json.loads((checkpoint_path(directory, epoch) / "meta.json").read_text())

    args = ["--model", "resnet8", "--steps-per-epoch", 12, "--batch-size", 32, "--amp", "fp16", "--loss-scale", 1e9]
    result = assert_ok(run_training([*args, "--epochs", 2, "--checkpoint-dir", tmp_path / "straight"],
                                    framework=framework))
    skipped = [line for line in result.stdout.splitlines() if "step skipped" in line]
    assert 5 <= len(skipped) < 24, result.stdout  # ~1e9 -> below 65504 takes about 14 halvings
    assert "NaN" not in result.stdout + result.stderr
    assert final_accuracy(result) > 0.3

    # Stopped after epoch 1 and resumed: the checkpoint kept the scale the halvings reached, so
    # the second epoch neither starts over at 1e9 (and skips its first steps again) nor differs.
    assert_ok(run_training([*args, "--epochs", 1, "--checkpoint-dir", tmp_path / "split"], framework=framework))
    resumed = assert_ok(run_training([*args, "--epochs", 2, "--checkpoint-dir", tmp_path / "split", "--resume"],
                                     framework=framework))
    assert checkpoint_meta(tmp_path / "split", 1)["loss_scale"]["scale"] < 1e9
    straight, split = (checkpoint_weights(checkpoint_path(tmp_path / run, 2), RESNET8) for run in ("straight", "split"))
    for key, value in straight.items():
        assert relative_difference(split[key], value) <= 1e-6, (key, resumed.stdout)
