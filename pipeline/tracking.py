"""The MLflow boundary: the only module that imports mlflow.

Stages return values; the CLI hands them to the functions here (or passes the training
callback below). Point MLFLOW_TRACKING_URI elsewhere, e.g. at a temporary sqlite file in
tests or at a remote server, and every stage follows.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import RunStatus

from pipeline.callbacks import TrainCallback
from pipeline.config import DEFAULT_EXPERIMENT, EXPERIMENT_ENV, project_root
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.train import TrainResult

CHECKPOINT_ARTIFACT = "checkpoint/model.pt"
MODEL_NAME = "model"  # the name of the torch model logged with mlflow.pytorch.log_model


def store_dir() -> Path:
    return project_root() / "mlruns"


def default_tracking_uri() -> str:
    # MLflow 3.17 retired the plain file store, so the project store is a sqlite database
    # inside mlruns/, with artifacts beside it.
    return f"sqlite:///{store_dir() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def configure(experiment: str | None = None) -> str:
    """Point mlflow at the project store (or MLFLOW_TRACKING_URI) and pick the experiment."""
    uri = tracking_uri()
    if uri == default_tracking_uri():
        store_dir().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if os.environ.get("MLFLOW_RUN_ID"):  # inside `mlflow run`: its run already has an experiment
        return uri
    name = experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
    if mlflow.get_experiment_by_name(name) is None:
        location = None
        if uri.startswith("sqlite:///"):
            # Beside the database, whatever directory the command was started from.
            location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / name).resolve().as_uri()
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)
    return uri


@contextmanager
def run(
    run_id: str | None = None,
    run_name: str | None = None,
    experiment: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start or resume a run; it ends FINISHED, FAILED (error) or KILLED (Ctrl-C), never RUNNING."""
    configure(experiment)
    if run_id:
        ensure_run(run_id)
    active = mlflow.start_run(run_id=run_id, run_name=run_name, tags=tags)
    try:
        yield active
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run()


def ensure_run(run_id: str) -> Any:
    try:
        return mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise PipelineError(
            f"no run {run_id!r} in the tracking store {tracking_uri()}; list runs with `make ui` or `pipeline compare`"
        ) from None


def log_params(params: dict[str, Any]) -> None:
    flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params.items()}
    mlflow.log_params(flat)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_dict(data: Any, artifact_file: str) -> None:
    mlflow.log_dict(data, artifact_file)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path)


def log_torch_model(model: Any, example: Any, class_names: list[str]) -> str:
    """Log the model with mlflow.pytorch (signature + example) and a plain checkpoint.

    The checkpoint (state_dict + registry name) is what later stages load: it rebuilds the
    real nn.Module, which can switch between train and eval mode, unlike the torch.export
    program that mlflow.pytorch saves by default.
    """
    import torch
    from mlflow.models import infer_signature

    from pipeline.models import save_checkpoint

    model = model.to("cpu").eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        model,
        name=MODEL_NAME,
        signature=infer_signature(example, logits),
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(CHECKPOINT_ARTIFACT).name
        save_checkpoint(model, path, class_names)
        mlflow.log_artifact(str(path), str(Path(CHECKPOINT_ARTIFACT).parent))
    return info.model_uri


def download_artifact(run_id: str, artifact_path: str, dst: Path | None = None) -> Path:
    ensure_run(run_id)
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_path, dst_path=str(dst) if dst else None
            )
        )
    except (mlflow.exceptions.MlflowException, OSError):
        raise PipelineError(
            f"run {run_id} has no artifact {artifact_path!r}; was it made by `pipeline train`?"
        ) from None


def load_run_model(run_id: str) -> tuple[Any, list[str]]:
    """The trained nn.Module of a run (eval mode) and its class names, from its checkpoint."""
    from pipeline.models import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        return load_checkpoint(download_artifact(run_id, CHECKPOINT_ARTIFACT, Path(tmp)))


class MlflowTrainCallback(TrainCallback):
    """Streams a training run into the active MLflow run."""

    def on_train_start(self, params: dict[str, Any]) -> None:
        log_params(params)

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        log_metrics(metrics, step=step)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        log_metrics({**metrics, "epoch": epoch}, step=step)

    def on_train_end(self, result: TrainResult) -> None:
        log_metrics(
            {k: v for k, v in result.metrics.items() if k not in ("test_accuracy", "test_loss")},
            step=result.metrics["steps"],
        )
        log_dict(result.params["class_names"], "class_names.json")
        log_dict(result.history, "history.json")
