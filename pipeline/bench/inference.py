"""Inference measured: torch eager against the real Predictor on fp32 and int8 exports, and onnxruntime's levers.

Every onnxruntime figure is the Predictor's own array path (`predict_arrays`), from uint8
images to logits, so the table times what `pipeline predict` runs, not a copy of it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from pipeline.bench.config import BenchConfig
from pipeline.bench.timing import latency_stats, medians
from pipeline.data import load_split
from pipeline.evaluate import compute_logits, images_to_tensor
from pipeline.predict import Predictor


def predictor_call(predictor: Predictor) -> Callable[[np.ndarray], np.ndarray]:
    # One session run per call, whatever the batch: the batch size is what is being measured.
    return lambda images: predictor.predict_arrays(images, batch_size=len(images))


def inference_models(
    model: torch.nn.Module, class_names: list[str], workdir: Path, data_dir: Path
) -> tuple[dict[str, Path], dict[str, float]]:
    """Export fp32 and int8 ONNX files of `model` and measure the test accuracy of all three."""
    from pipeline.export import calibration_sample, export_onnx, quantize_int8

    fp32 = export_onnx(model, workdir / "bench.onnx", class_names, model.registry_name, "bench")
    train_images = load_split(data_dir, "train").images
    int8 = quantize_int8(fp32, workdir / "bench.int8.onnx", calibration_sample(train_images))
    test = load_split(data_dir, "test")
    accuracy = {
        "torch eager": float(
            (compute_logits(model, images_to_tensor(test.images)).argmax(1).numpy() == test.labels).mean()
        )
    }
    paths = {"onnxruntime fp32": fp32, "onnxruntime int8": int8}
    for label, path in paths.items():
        accuracy[label] = float((Predictor(path).predict_arrays(test.images).argmax(1) == test.labels).mean())
    return paths, accuracy


def bench_inference(cfg: BenchConfig, model: torch.nn.Module, onnx_paths: dict[str, Path]) -> dict[str, Any]:
    images = load_split(cfg.data_dir, "test").images
    model = model.eval()

    def torch_eager(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(images_to_tensor(batch)).numpy()

    runners = {"torch eager": torch_eager}
    for label, path in onnx_paths.items():
        runners[label] = predictor_call(Predictor(path))

    budget = cfg.timing_budget(3.0)
    results: dict[str, Any] = {}
    for batch in cfg.inference_batches:
        row = {label: latency_stats(call, images, batch, budget) for label, call in runners.items()}
        eager = row["torch eager"]["images_per_s"]
        for label in runners:
            row[label]["vs_torch_eager"] = row[label]["images_per_s"] / eager
        if "onnxruntime fp32" in row and "onnxruntime int8" in row:
            row["onnxruntime int8"]["vs_fp32"] = (
                row["onnxruntime int8"]["images_per_s"] / row["onnxruntime fp32"]["images_per_s"]
            )
        results[str(batch)] = row
    return results


def bench_onnxruntime_levers(
    cfg: BenchConfig,
    model: torch.nn.Module,
    class_names: list[str],
    workdir: Path,
    batch: int = 256,
    folded: Path | None = None,
) -> list[dict[str, Any]]:
    """Export-time folding and onnxruntime session options, at one batch size, from uint8 arrays.

    `folded`: the default (folded) export of `model` if there is one already; else it is exported here.
    """
    from pipeline.export import export_onnx

    images = load_split(cfg.data_dir, "test").images
    plain = export_onnx(model, workdir / "plain.onnx", class_names, model.registry_name, "bench", fold=False)
    if folded is None:
        folded = export_onnx(model, workdir / "folded.onnx", class_names, model.registry_name, "bench", fold=True)
    level = ort.GraphOptimizationLevel
    variants = [
        ("not folded, all graph optimisations, 2 threads", plain, level.ORT_ENABLE_ALL, 0),
        ("folded (default), all graph optimisations, 2 threads", folded, level.ORT_ENABLE_ALL, 0),
        ("folded, basic graph optimisations only", folded, level.ORT_ENABLE_BASIC, 0),
        ("folded, graph optimisations off", folded, level.ORT_DISABLE_ALL, 0),
        ("folded, 1 intra-op thread", folded, level.ORT_ENABLE_ALL, 1),
    ]
    budget = cfg.timing_budget(2.0)
    runners = {
        label: predictor_call(Predictor(path, threads=threads, graph_optimization=optimisation))
        for label, path, optimisation, threads in variants
    }
    measured: dict[str, list[dict[str, float]]] = {label: [] for label in runners}
    for _ in range(cfg.rounds):
        for label, run in runners.items():
            measured[label].append(latency_stats(run, images, batch, budget))
    rows = [{"variant": label, **medians(runs)} for label, runs in measured.items()]
    for row in rows:
        row["vs_first"] = row["images_per_s"] / rows[0]["images_per_s"]
    return rows
