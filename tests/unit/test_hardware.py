"""The CPU's relevant features from its flags, and the one line --amp gets where its
precision would be emulated (common/launch/hardware.py)."""

import pytest

from common.launch.hardware import CpuFeatures, cpu_features, emulated_precision_notice

AVX2_EPYC = "fpu sse4_2 avx avx2 fma bmi2"
AVX512_EPYC = AVX2_EPYC + " avx512f avx512bw avx512vl avx512_bf16"
SAPPHIRE_RAPIDS = AVX512_EPYC + " avx512_fp16 amx_bf16 amx_tile amx_int8"


def test_features_are_read_from_the_flags():
    assert CpuFeatures.from_flags(AVX2_EPYC).names() == ["AVX2"]
    assert CpuFeatures.from_flags(AVX512_EPYC).names() == ["AVX2", "AVX-512", "AVX512_BF16"]
    assert CpuFeatures.from_flags(SAPPHIRE_RAPIDS).names() == ["AVX2", "AVX-512", "AVX512_BF16", "AMX", "AVX512_FP16"]
    assert CpuFeatures.from_flags("").describe().startswith("none of")


@pytest.mark.parametrize("flags,amp,warned", [
    (AVX2_EPYC, "bf16", True), (AVX512_EPYC, "bf16", False), (SAPPHIRE_RAPIDS, "bf16", False),
    (AVX2_EPYC, "fp16", True), (AVX512_EPYC, "fp16", True), (SAPPHIRE_RAPIDS, "fp16", False),
    (AVX2_EPYC, "off", False)])
def test_emulated_precision_gets_one_line_saying_what_to_do(flags, amp, warned):
    notice = emulated_precision_notice(amp, on_gpu=False, features=CpuFeatures.from_flags(flags))
    assert (notice is not None) == warned
    if warned:
        assert notice.startswith(f"warning: --amp {amp} is emulated on this CPU") and "--amp off" in notice
        assert "\n" not in notice


def test_a_gpu_needs_no_notice():
    assert emulated_precision_notice("bf16", on_gpu=True, features=CpuFeatures.from_flags(AVX2_EPYC)) is None


def test_the_flags_can_be_played(monkeypatch):
    monkeypatch.setenv("CNN_PARALLEL_CPU_FLAGS", AVX2_EPYC)
    assert cpu_features() == CpuFeatures.from_flags(AVX2_EPYC) and not cpu_features().native_bf16
