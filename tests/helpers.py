"""Helpers that test modules import (conftest.py keeps only fixtures and hooks): the repository's
paths and the small synthetic Fashion-MNIST in the real IDX format."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.data import SPLIT_FILES, raw_dir
from pipeline.idx import write_idx

REPO = Path(__file__).resolve().parent.parent
REAL_DATA_DIR = Path(os.environ.get("PIPELINE_DATA_DIR", REPO / "data"))


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise plus a bright 6x6 block whose position encodes the label: learnable in a few steps."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row, col = 2 + 8 * (label // 4), 2 + 6 * (label % 4)
        images[i, row : row + 6, col : col + 6] = 255
    return images


def write_synthetic_dataset(
    data_dir: Path, n_train: int = 600, n_test: int = 200, seed: int = 0, compress: bool = False
) -> Path:
    rng = np.random.default_rng(seed)
    folder = raw_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        rng.shuffle(labels)
        images_name, labels_name = SPLIT_FILES[split]
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{images_name}{suffix}", synthetic_images(labels, rng))
        write_idx(folder / f"{labels_name}{suffix}", labels)
    return data_dir


def real_data_available() -> bool:
    return all((raw_dir(REAL_DATA_DIR) / name).is_file() for pair in SPLIT_FILES.values() for name in pair)
