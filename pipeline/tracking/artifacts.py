"""A run's files: downloading artifacts quietly, and the checkpoints later stages load."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

from pipeline.errors import PipelineError
from pipeline.tracking.names import CHECKPOINT_ARTIFACT, TRAINING_STATE_ARTIFACT
from pipeline.tracking.runs import get_run


@contextmanager
def quiet_downloads() -> Iterator[None]:
    """No artifact progress bars: for a few small files they only clutter the CLI's stderr."""
    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved


def download_artifact(run_id: str, artifact_path: str, dst: Path | None = None) -> Path:
    get_run(run_id)
    try:
        with quiet_downloads():
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_path, dst_path=str(dst) if dst else None
            )
        return Path(local)
    except (mlflow.exceptions.MlflowException, OSError):
        raise PipelineError(
            f"run {run_id} has no artifact {artifact_path!r}; was it made by `pipeline train`?"
        ) from None


def read_csv_artifact(run_id: str, artifact_path: str) -> Any:
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        return pd.read_csv(download_artifact(run_id, artifact_path, Path(tmp)))


def load_run_model(run_id: str) -> tuple[Any, list[str]]:
    """The trained nn.Module of a run (eval mode) and its class names, from its checkpoint.

    The checkpoint (state_dict + registry name) rebuilds the real nn.Module, which can switch
    between train and eval mode, unlike the torch.export program that mlflow.pytorch saves.
    """
    from pipeline.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        return load_checkpoint(download_artifact(run_id, CHECKPOINT_ARTIFACT, Path(tmp)))


def load_training_state(run_id: str) -> dict[str, Any]:
    from pipeline.checkpoint import load_training_state as load

    with tempfile.TemporaryDirectory() as tmp:
        return load(download_artifact(run_id, TRAINING_STATE_ARTIFACT, Path(tmp)))
