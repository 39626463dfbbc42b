"""The faster recipe (cnn_plus) against the chapter CNN's default 5-epoch training, in the same run.

Full mode trains both completely, one pair per seed, alternating, so a slow spell of the shared
machine hits both: accuracy is the mean over seeds, time the median. Quick mode trains a few
steps of each on the same number of images and extrapolates the training time of both full
recipes from their throughput; it measures no accuracy.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.bench.config import CHAPTER_BATCH, BenchConfig
from pipeline.config import TrainConfig, train_config
from pipeline.train import train

RECIPE_MODEL = "cnn_plus"
BASELINE_MODEL = "cnn"  # with the chapter's recipe: TrainConfig's defaults
TARGET_ACCURACY_PCT = 93.0


def full_training(data_dir: Path, model: str, seed: int) -> dict[str, float]:
    """One complete training with the model's recipe (tracking off); wall time includes its evaluations."""
    m = train(train_config(model, seed=seed, data_dir=data_dir)).metrics
    return {
        "seed": seed,
        "test_accuracy": m["test_accuracy"],
        "wall_time_s": m["wall_time_s"],
        "steps_per_s": m["steps"] / m["train_time_s"],
        "train_images_per_s": m["train_images_per_s"],
    }


def summary(runs: list[dict[str, float]], config: TrainConfig) -> dict[str, Any]:
    accuracies = [run["test_accuracy"] for run in runs]
    return {
        "recipe": describe(config),
        "epochs": config.epochs,
        "runs": runs,
        "test_accuracy_mean": statistics.fmean(accuracies),
        "test_accuracy_sd": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "wall_time_s_median": statistics.median(run["wall_time_s"] for run in runs),
        "steps_per_s": statistics.median(run["steps_per_s"] for run in runs),
        "train_images_per_s": statistics.median(run["train_images_per_s"] for run in runs),
    }


def describe(config: TrainConfig) -> str:
    """'AdamW lr 0.004 onecycle, wd 0.05, ls 0.1, crop 2 + flip, batch 256' in a table cell."""
    parts = [f"{config.optimizer} lr {config.lr:g} {config.schedule}"]
    if config.weight_decay:
        parts.append(f"wd {config.weight_decay:g}")
    if config.label_smoothing:
        parts.append(f"ls {config.label_smoothing:g}")
    augment = [f"crop {config.crop_pad}"] * bool(config.crop_pad) + ["flip"] * config.hflip
    if augment:
        parts.append(" + ".join(augment))
    parts.append(f"batch {config.batch_size}")
    return ", ".join(parts)


def bench_recipe(cfg: BenchConfig, progress: Callable[[str], Any] = lambda message: None) -> dict[str, Any]:
    configs = {name: train_config(name, data_dir=cfg.data_dir) for name in (BASELINE_MODEL, RECIPE_MODEL)}
    if not cfg.recipe_seeds:
        return extrapolated(cfg, configs)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    for seed in range(cfg.recipe_seeds):
        for name in configs:
            progress(f"{name}, seed {seed}: a full training")
            runs[name].append(full_training(cfg.data_dir, name, seed))
    out = {name: summary(runs[name], configs[name]) for name in configs}
    return {
        "measured": True,
        "seeds": cfg.recipe_seeds,
        **out,
        "time_ratio": out[RECIPE_MODEL]["wall_time_s_median"] / out[BASELINE_MODEL]["wall_time_s_median"],
    }


def extrapolated(cfg: BenchConfig, configs: dict[str, TrainConfig]) -> dict[str, Any]:
    """Quick mode: each model's full training time from a few steps' throughput (evaluations left out)."""
    images = cfg.train_steps * CHAPTER_BATCH
    out: dict[str, Any] = {"measured": False, "seeds": 0}
    for name, config in configs.items():
        steps = -(-images // config.batch_size)
        # No test evaluation: no accuracy is reported, and the throughput leaves evaluations out.
        m = train(train_config(name, data_dir=cfg.data_dir, max_steps=steps, test_eval="never")).metrics
        train_images = 60_000 * config.epochs
        out[name] = {
            "recipe": describe(config),
            "epochs": config.epochs,
            "train_images_per_s": m["train_images_per_s"],
            "steps_per_s": m["train_images_per_s"] / config.batch_size,
            "wall_time_s_median": train_images / m["train_images_per_s"],
            "test_accuracy_mean": None,
        }
    out["time_ratio"] = out[RECIPE_MODEL]["wall_time_s_median"] / out[BASELINE_MODEL]["wall_time_s_median"]
    return out
