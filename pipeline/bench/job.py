"""The whole benchmark in one call, and the real 5-epoch job timed end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.config import BenchConfig, config_dict
from pipeline.bench.inference import bench_inference, bench_onnxruntime_levers, inference_models
from pipeline.bench.machine import bench_memory, gemm_limits, machine
from pipeline.bench.photos import bench_photos
from pipeline.bench.recipe import bench_recipe
from pipeline.bench.report import headline, verdicts
from pipeline.bench.training import (
    bench_compile,
    bench_data_feeding,
    bench_levers,
    bench_tracking_overhead,
    bench_training,
)


def time_full_job(model_name: str = "cnn") -> dict[str, Any]:
    """The default 5-epoch `mlflow run` (train + evaluate + export + parity), timed end to end
    as a user runs it, in a temporary tracking store."""
    from pipeline.config import project_root

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": uri,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            env.pop(key, None)
        # Artifacts beside the temporary store, not in the project's mlruns/.
        subprocess.run(
            [sys.executable, "-c", "from pipeline import tracking; tracking.configure('bench-job')"],
            env=env,
            check=True,
        )
        started = time.perf_counter()
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "mlflow",
                "run",
                str(project_root()),
                "--env-manager",
                "local",
                "--experiment-name",
                "bench-job",
                "-P",
                f"model={model_name}",
            ],
            env=env,
            capture_output=True,
            text=True,
            cwd=project_root(),
        )
        seconds = time.perf_counter() - started
        if completed.returncode != 0:
            raise RuntimeError(f"mlflow run failed:\n{completed.stderr[-2000:]}")
        probe = (
            "import json; from pipeline import tracking; r = tracking.search_runs('bench-job')[0];"
            "print(json.dumps({k: r.metrics.get(k) for k in ('test_accuracy', 'wall_time_s',"
            " 'onnx_test_accuracy', 'parity_max_abs_diff')}))"
        )
        found = json.loads(
            subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
    return {"seconds": seconds, **found}


def run_benchmarks(
    cfg: BenchConfig,
    model: torch.nn.Module | None,
    class_names: list[str],
    workdir: Path,
    progress=lambda message: None,
) -> dict[str, Any]:
    """Every measurement; inference on `model`, or with None on the CNN the training measurement trained."""
    results: dict[str, Any] = {"date": date.today().isoformat(), "machine": machine(), "config": config_dict(cfg)}
    progress("the machine's own limit: GEMM throughput")
    results["limits"] = gemm_limits(min(cfg.timing_budget(1.0), 1.0))
    progress("training: the chapter's loop vs ours")
    results["training"], trained_cnn = bench_training(cfg)
    model = trained_cnn if model is None else model
    progress("training levers")
    results["levers"] = bench_levers(cfg)
    if not cfg.quick:  # a compile in an empty cache alone takes longer than the quick bench's training
        progress("torch.compile against eager, compile time included")
        results["compile"] = bench_compile(cfg)
    progress("data feeding: DataLoader vs tensor slicing")
    results["data_feeding"] = bench_data_feeding(cfg)
    progress("MLflow overhead")
    results["tracking"] = bench_tracking_overhead(cfg)
    progress("inference: torch eager vs onnxruntime fp32 / int8")
    paths, accuracy = inference_models(model, class_names, workdir, cfg.data_dir)
    results["inference_accuracy"] = accuracy
    results["inference"] = bench_inference(cfg, model, paths)
    progress("photos: predict on PNG photos, --preprocess none vs auto")
    results["photos"] = bench_photos(cfg, paths["onnxruntime fp32"])
    progress("onnxruntime levers: folding, session options")
    results["onnxruntime_levers"] = bench_onnxruntime_levers(
        cfg, model, class_names, workdir, folded=paths["onnxruntime fp32"]
    )
    progress("peak memory")
    results["memory"] = bench_memory(cfg, paths["onnxruntime fp32"])
    progress("the faster recipe (cnn_plus) vs the chapter CNN's 5-epoch training")
    results["recipe"] = bench_recipe(cfg, progress=lambda message: progress(f"  {message}"))
    if cfg.full_job:
        progress("the default 5-epoch job, end to end (mlflow run)")
        results["full_job"] = time_full_job()
    results["headline"] = headline(results)
    results["verdicts"] = verdicts(results["headline"])
    return results
