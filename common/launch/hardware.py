"""What the CPU can do natively, read from its flags: the vector units a figure was
measured with, and whether --amp's low precision runs in hardware or is emulated.

bf16 arithmetic is native with AVX512_BF16 or AMX (Intel Cooper Lake and Sapphire
Rapids on, AMD Zen 4 on); fp16 with AVX512_FP16 or AMX-FP16 (Sapphire Rapids and
Granite Rapids). Elsewhere the frameworks convert every element in software: on an
AVX2-only EPYC ResNet-18 at 32 px trained 21x slower in bf16 than in float32; on an
AVX-512 EPYC with AVX512_BF16 but no AVX512_FP16, bf16 gained 1.3x in both frameworks
and fp16 lost 15x (PyTorch) and 5.6x (TensorFlow).

``CNN_PARALLEL_CPU_FLAGS`` (space-separated flags) stands in for /proc/cpuinfo's, so
a test can play a CPU that this machine is not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

FLAGS_VARIABLE = "CNN_PARALLEL_CPU_FLAGS"


@dataclass(frozen=True)
class CpuFeatures:
    avx2: bool
    avx512: bool
    avx512_bf16: bool
    amx: bool
    avx512_fp16: bool
    amx_fp16: bool

    @classmethod
    def from_flags(cls, flags: str) -> CpuFeatures:
        present = set(flags.split())
        return cls(avx2="avx2" in present, avx512="avx512f" in present, avx512_bf16="avx512_bf16" in present,
                   amx="amx_bf16" in present or "amx_tile" in present, avx512_fp16="avx512_fp16" in present,
                   amx_fp16="amx_fp16" in present)

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx

    @property
    def native_fp16(self) -> bool:
        return self.avx512_fp16 or self.amx_fp16

    def names(self) -> list[str]:
        """The relevant features present, e.g. ['AVX2', 'AVX-512', 'AVX512_BF16']."""
        return [name for name, present in (("AVX2", self.avx2), ("AVX-512", self.avx512),
                                           ("AVX512_BF16", self.avx512_bf16), ("AMX", self.amx),
                                           ("AVX512_FP16", self.avx512_fp16), ("AMX-FP16", self.amx_fp16))
                if present]

    def describe(self) -> str:
        return ", ".join(self.names()) or "none of AVX2, AVX-512, AVX512_BF16, AMX"


def cpu_flags() -> str:
    if FLAGS_VARIABLE in os.environ:
        return os.environ[FLAGS_VARIABLE]
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1] for line in info if line.startswith("flags")), "")
    except OSError:
        return ""


def cpu_features() -> CpuFeatures:
    return CpuFeatures.from_flags(cpu_flags())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        return ""


def emulated_precision_notice(amp: str, on_gpu: bool, features: CpuFeatures | None = None) -> str | None:
    """One line when --amp's precision has no hardware on this CPU (None on a GPU, without
    --amp, or where the CPU has it): the run goes on, slower than float32."""
    if amp == "off" or on_gpu:
        return None
    features = features or cpu_features()
    if amp == "bf16" and not features.native_bf16:
        units, measured = "AVX512_BF16 or AMX", "21x slower than float32 on an AVX2-only EPYC"
    elif amp == "fp16" and not features.native_fp16:
        units, measured = "AVX512_FP16 or AMX-FP16", "5-15x slower than float32 on an AVX-512 EPYC"
    else:
        return None
    return (f"warning: --amp {amp} is emulated on this CPU (it has {features.describe()}; no {units}): "
            f"usually far slower than float32 ({measured}); use --amp off on this CPU, or train on a GPU or a "
            f"CPU with {units}")
