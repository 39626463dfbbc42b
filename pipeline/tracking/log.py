"""Logging into the active run: params, metrics (linked to a model where they are about one), tables,
evaluations, checks, reports and comparisons."""

from __future__ import annotations

import json
import posixpath
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from pipeline.tracking.datasets import DataSplit, mlflow_dataset
from pipeline.tracking.names import STAGES_TAG, TORCH_URI_TAG, model_id_of
from pipeline.tracking.runs import active_run_id, get_run, retried_if_raced, run


def log_params(params: dict[str, Any]) -> None:
    """Log params into the active run, leaving alone those it already has.

    `mlflow run` logs the entry point's parameters as typed on its command line (`lr=1e-3`,
    `max_steps=0`); MLflow refuses to change a param, and those are the same settings.
    """
    run_id = active_run_id()

    def log_new() -> None:
        existing = get_run(run_id).params
        new = {k: v for k, v in params.items() if k not in existing}
        flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in new.items()}
        if flat:
            mlflow.log_params(flat)

    retried_if_raced(log_new)  # a tuning study's workers log the same params into its shared parent run


def log_metrics(
    metrics: dict[str, float], step: int | None = None, model_id: str | None = None, dataset: DataSplit | None = None
) -> None:
    """Numbers from numpy and torch as plain floats, which every store backend accepts.

    model_id: the LoggedModel the metrics are about (the Models tab shows them with it);
    without one they are the run's only. dataset: the split they were measured on.
    """
    if model_id is None and dataset is None:
        # Through the client, which links nothing: mlflow.log_metrics would link these to every
        # model logged at `step` (e.g. figures of an ONNX file that is not logged, to the one that is).
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
        run_id = active_run_id()
        retried_if_raced(lambda: mlflow.MlflowClient().log_batch(run_id, metrics=rows))
        return
    mlflow.log_metrics(
        {k: float(v) for k, v in metrics.items()},
        step=step,
        model_id=model_id,
        dataset=mlflow_dataset(dataset) if dataset is not None else None,
    )


def log_files(files: Iterable[Path], folder: str | None = None) -> None:
    for path in files:
        mlflow.log_artifact(str(path), folder)


def log_table(table: Any, artifact_file: str) -> None:
    """A DataFrame as an MLflow table (a .json artifact the UI renders as a table).

    Logging it again replaces the table: mlflow.log_table would append the rows to the old
    ones, so re-evaluating a run would double its per-class table in the UI.
    """
    folder = posixpath.dirname(artifact_file) or None
    if artifact_file in {f.path for f in mlflow.MlflowClient().list_artifacts(active_run_id(), folder)}:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / posixpath.basename(artifact_file)
            table.to_json(path, orient="split", index=False, date_format="iso")  # log_table's own format
            mlflow.log_artifact(str(path), folder)
        return
    with warnings.catch_warnings():
        # MLflow probes text columns with a select_dtypes call that pandas 3 deprecates.
        warnings.filterwarnings("ignore", message="For backward compatibility, 'str' dtypes")
        mlflow.log_table(data=table, artifact_file=artifact_file)


def log_evaluation(
    metrics: dict[str, float], step: int, per_class: Any, table_file: str, folder: Path, test: DataSplit | None = None
) -> None:
    """An evaluation into the active run: metrics at `step`, the per-class table, and `folder`'s files.

    The metrics belong to the run's torch model (the one evaluated) and to the test split.
    """
    torch_uri = get_run(active_run_id()).tags.get(TORCH_URI_TAG)
    log_metrics(metrics, step=step, model_id=model_id_of(torch_uri) if torch_uri else None, dataset=test)
    log_table(per_class, table_file)
    mlflow.log_artifacts(str(folder))


def log_check(result: Any, artifact_file: str, tag: str, model_uri: str | None = None, step: int = 0) -> None:
    """A parity or int8 check into the active run: its metrics, its full report, and a passed/failed tag.

    model_uri: the logged ONNX model that was checked; its metrics go to it, not to the torch model.
    """
    log_metrics(result.metrics(), step=step, model_id=model_id_of(model_uri) if model_uri else None)
    mlflow.log_dict(result.to_dict(), artifact_file)
    mlflow.set_tag(tag, "passed" if result.passed else "failed")


def log_report(params: dict[str, Any], metrics: dict[str, float], files: Iterable[Path]) -> None:
    """A benchmark's settings, headline figures and report files into the active run."""
    log_params(params)
    log_metrics(metrics)
    log_files(files)


def log_comparison(
    experiment_id: str,
    run_name: str,
    description: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    table: Any,
    files: Iterable[Path],
) -> str:
    """A comparison as a run of its own in `experiment_id`: the verdict as its description, the table, the chart."""
    experiment = mlflow.MlflowClient().get_experiment(experiment_id).name
    tags = {STAGES_TAG: "compare", MLFLOW_RUN_NOTE: description}
    with run(run_name=run_name, experiment=experiment, tags=tags) as active:
        log_params(params)
        log_metrics(metrics)
        log_table(table, "compare_table.json")
        log_files(files)
    return active.run_id
