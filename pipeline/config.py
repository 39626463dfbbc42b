"""Defaults that more than one stage needs, defined once.

Stage-specific settings live in dataclasses beside the stage (TrainConfig in train.py,
...); this module holds only what they share: paths, the class names, the input shape.
Nothing heavy is imported here.
"""

from __future__ import annotations

import os
from pathlib import Path

# Fashion-MNIST's labels in id order (the chapter's listing 5-5, in the dataset's own spelling).
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# (channels, height, width) of one image as the models see it: float32 in [0, 1].
INPUT_SHAPE: tuple[int, int, int] = (1, 28, 28)

DATA_DIR_ENV = "PIPELINE_DATA_DIR"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "fashion-mnist"


def project_root() -> Path:
    """The checkout this package was installed from (editable), else the working directory.

    Runs from `pipeline ...`, `make` and `mlflow run .` must all land in one store, so
    paths are anchored to the project, not to wherever the command happened to start.
    """
    candidate = Path(__file__).resolve().parent.parent
    if (candidate / "MLproject").is_file():
        return candidate
    return Path.cwd()


def default_data_dir() -> Path:
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else project_root() / "data"


def slug(name: str) -> str:
    """'Ankle boot' -> 'ankle_boot', 'T-shirt/top' -> 't_shirt_top': safe in metric names."""
    out = "".join(ch.lower() if ch.isalnum() else "_" for ch in name)
    return "_".join(part for part in out.split("_") if part)
