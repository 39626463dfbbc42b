"""The data a run read, as MLflow dataset inputs: the UI's Datasets section, with the files' digests."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

from pipeline.tracking.runs import retried_if_raced

DATASET_CONTEXTS = {"train": "training", "test": "testing"}  # MLflow's names for what a split was used for


@dataclass(frozen=True)
class DataSplit:
    """A split as the data module knows it, for logging as an MLflow dataset input."""

    split: str  # train | test
    folder: Path  # where its IDX files are
    digests: dict[str, str]  # file name -> SHA-256 of its decompressed content
    rows: int


def mlflow_dataset(split: DataSplit) -> Any:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class SplitDataset(MetaDataset):
        # MetaDataset logs no profile; the UI shows this one in the run's Datasets section.
        def to_dict(self) -> dict[str, str]:
            profile = {"num_rows": split.rows, "images": "28x28 uint8 IDX", "sha256": split.digests}
            return {**super().to_dict(), "profile": json.dumps(profile)}

    # The file digests are the content; MLflow's digest column holds at most 36 characters.
    combined = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(split.digests.items())).encode()).hexdigest()
    with warnings.catch_warnings():
        # A local path matches both of MLflow's local sources (schemes "" and "file"), which are the same class.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(str(Path(split.folder).resolve()))
    return SplitDataset(source=source, name=f"fashion-mnist-{split.split}", digest=combined[:16])


def log_datasets(splits: Iterable[DataSplit]) -> None:
    """The splits as dataset inputs of the active run, with the contexts training / testing.

    A dataset is a row of its experiment, made by the first run that logs it: trainings started at
    once in an experiment race to make it, and the loser's insert fails on the unique key. Made once
    more, its write finds the row and links it.
    """
    for split in splits:
        dataset, context = mlflow_dataset(split), DATASET_CONTEXTS.get(split.split, split.split)
        retried_if_raced(lambda dataset=dataset, context=context: mlflow.log_input(dataset, context=context))
