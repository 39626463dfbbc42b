"""What the CPU can do natively, read once from /proc/cpuinfo (torch-free).

Speed choices (`--precision auto`, the bench's "default" rows, whether int8 can win) depend
on instruction sets that differ from machine to machine: AVX2-only EPYCs, EPYCs with
AVX512-BF16, Xeons with AMX. Emulated bf16 is several times slower than fp32, and int8
without VNNI is slower than fp32, so every `auto` resolves from what this CPU reports.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path

from pipeline.errors import PipelineError

CPUINFO = Path("/proc/cpuinfo")
# Set by `pipeline bench --max-cpu-isa avx2` (and inherited by its subprocesses): behave as on
# an AVX2-only CPU, so a machine with AVX-512 can show what one without it would measure.
MAX_ISA_ENV = "PIPELINE_MAX_CPU_ISA"
# What caps torch's own kernels at AVX2; read when torch is imported, so set before that.
# onnxruntime has no such switch: its kernels still use what the CPU has.
TORCH_AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@dataclass(frozen=True)
class CpuFeatures:
    model: str = "unknown"
    avx2: bool = False
    avx512: bool = False  # AVX512F, the foundation the other AVX-512 sets need
    avx512_bf16: bool = False
    avx512_vnni: bool = False
    avx_vnni: bool = False  # the VEX-encoded VNNI of CPUs without AVX-512
    amx_bf16: bool = False
    amx_int8: bool = False

    @property
    def native_bf16(self) -> bool:
        """bfloat16 matmuls and convolutions in hardware (oneDNN uses them), not emulated in fp32."""
        return self.avx512_bf16 or self.amx_bf16

    @property
    def vnni(self) -> bool:
        """int8 dot products in one instruction: what makes an int8 model faster than fp32."""
        return self.avx512_vnni or self.avx_vnni or self.amx_int8

    def summary(self) -> str:
        """e.g. 'AVX2, AVX-512, AVX512-BF16, VNNI; no AMX'."""
        present = [
            name
            for name, on in (
                ("AVX2", self.avx2),
                ("AVX-512", self.avx512),
                ("AVX512-BF16", self.avx512_bf16),
                ("AVX512-VNNI", self.avx512_vnni),
                ("AVX-VNNI", self.avx_vnni),
                ("AMX-BF16", self.amx_bf16),
                ("AMX-INT8", self.amx_int8),
            )
            if on
        ]
        missing = [name for name, on in (("native bf16", self.native_bf16), ("VNNI", self.vnni)) if not on]
        missing += [] if (self.amx_bf16 or self.amx_int8) else ["AMX"]
        return ", ".join(present or ["no AVX2"]) + ("; no " + ", no ".join(missing) if missing else "")

    def limited_to_avx2(self) -> CpuFeatures:
        return replace(
            self,
            model=f"{self.model} limited to AVX2",
            avx512=False,
            avx512_bf16=False,
            avx512_vnni=False,
            avx_vnni=False,
            amx_bf16=False,
            amx_int8=False,
        )

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "native_bf16": self.native_bf16, "vnni": self.vnni, "summary": self.summary()}


def parse_cpuinfo(text: str) -> CpuFeatures:
    """The features of the first CPU listed (all cores of one machine report the same)."""
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return CpuFeatures(
        model=model,
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        avx512_bf16="avx512_bf16" in flags,
        avx512_vnni="avx512_vnni" in flags,
        avx_vnni="avx_vnni" in flags,
        amx_bf16="amx_bf16" in flags,
        amx_int8="amx_int8" in flags,
    )


@cache
def cpu_features() -> CpuFeatures:
    """This machine's CPU (capped at AVX2 under $PIPELINE_MAX_CPU_ISA=avx2); all off where
    /proc/cpuinfo can't be read (not Linux)."""
    try:
        features = parse_cpuinfo(CPUINFO.read_text())
    except OSError:
        return CpuFeatures()
    return features.limited_to_avx2() if os.environ.get(MAX_ISA_ENV, "").lower() == "avx2" else features


def limit_to_avx2() -> None:
    """Make this process (and its children) behave as on an AVX2-only CPU, before torch is imported."""
    import sys

    if "torch" in sys.modules:
        raise PipelineError("--max-cpu-isa must take effect before torch is loaded; run it in a fresh process")
    os.environ[MAX_ISA_ENV] = "avx2"
    os.environ.update(TORCH_AVX2_ENV)
    cpu_features.cache_clear()
