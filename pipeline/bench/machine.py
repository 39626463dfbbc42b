"""The machine a benchmark ran on, and the peak memory of our commands on it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline import allocator, hardware
from pipeline.bench.config import BenchConfig
from pipeline.bench.flops import gemm_gflops, ort_gemm_gflops


def machine() -> dict[str, Any]:
    features = hardware.cpu_features()
    return {
        "cpu": features.model,
        "cpu_features": features.to_dict(),
        "isa_limit": os.environ.get(hardware.MAX_ISA_ENV),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Every CLI command sets it: the chapter's loop, measured in the same process, has it too.
        "freed_memory_kept": allocator.freed_memory_kept(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def gemm_limits(seconds: float = 1.0) -> dict[str, float | None]:
    """GFLOP/s of a large matmul in fp32, and in bf16 where the CPU has it natively (else None:
    an emulated bf16 ceiling would only flatter the fraction of it that training reaches).

    The fp32 limit is the better of torch's and onnxruntime's: the machine's ceiling, not one
    library's (the report shows both). Under --max-cpu-isa avx2 it is torch's alone, since
    onnxruntime is not capped; onnxruntime's inference is then held to its own figure.
    """
    native = hardware.cpu_features().native_bf16
    torch_fp32, ort_fp32 = gemm_gflops(torch.float32, seconds=seconds), ort_gemm_gflops(seconds=seconds)
    capped = os.environ.get(hardware.MAX_ISA_ENV, "").lower() == "avx2"
    return {
        "fp32_gemm_gflops": torch_fp32 if capped else max(torch_fp32, ort_fp32),
        "fp32_torch_mm_gflops": torch_fp32,
        "fp32_onnxruntime_matmul_gflops": ort_fp32,
        "bf16_gemm_gflops": gemm_gflops(torch.bfloat16, seconds=seconds) if native else None,
    }


def peak_rss_mib(command: list[str], env: dict[str, str] | None = None) -> float:
    """Peak resident memory of a command, measured by a fresh wrapper process."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *command], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    if out[1] != "0":
        raise RuntimeError(f"{' '.join(command)} exited {out[1]} while measuring memory")
    return int(out[0]) / 1024  # ru_maxrss is in KiB on Linux


def bench_memory(cfg: BenchConfig, onnx_path: Path | None) -> dict[str, float]:
    pipeline_cmd = [sys.executable, "-m", "pipeline.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        env.pop("MLFLOW_RUN_ID", None)
        out = {
            "train_stage_mib": peak_rss_mib(
                [
                    *pipeline_cmd,
                    "train",
                    "--model",
                    "cnn",
                    "--max-steps",
                    str(cfg.train_steps // 2),
                    "--data-dir",
                    str(cfg.data_dir),
                ],
                env,
            )
        }
        if onnx_path is not None:
            test_idx = cfg.data_dir / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
            out["predict_10k_mib"] = peak_rss_mib(
                [*pipeline_cmd, "predict", "--model", str(onnx_path), "--output", f"{tmp}/p.csv", str(test_idx)], env
            )
    return out
