"""Run lifetime and lookup: start or resume a run that always ends with the right status, find runs,
and keep a run's description in step with what its stages logged."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import mlflow
from mlflow.entities import RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from pipeline import signals
from pipeline.errors import PipelineError
from pipeline.tracking.heartbeat import Heartbeat, liveness_tags
from pipeline.tracking.names import REGISTERED_TAG, STAGE_TAG, STAGES_TAG, STUDY_STAGE, TRIAL_STAGE
from pipeline.tracking.records import ActiveRun, RunRecord, record_of
from pipeline.tracking.store import (
    configure,
    connect,
    experiment_name,
    mark_experiment,
    reason,
    server_failure,
    server_lost,
    tracking_uri,
)

# MLflow samples every 10 s by default and drops the samples of a run that ends before the
# first 10 s are up: a smoke run would record nothing.
SYSTEM_METRICS_INTERVAL_S = 1.0
RUN_ID_ENV = "MLFLOW_RUN_ID"  # set by `mlflow run` for the run it created


@contextmanager
def run(
    run_id: str | None = None,
    run_name: str | None = None,
    experiment: str | None = None,
    tags: dict[str, str] | None = None,
    system_metrics: bool | None = None,
) -> Iterator[ActiveRun]:
    """Start or resume a run; it ends FINISHED, FAILED (error) or KILLED (Ctrl-C, SIGTERM), never RUNNING.

    While it is open, a heartbeat tag is refreshed with the pid and host, so a run left RUNNING
    by a process that died without cleaning up (kill -9, a crash, a lost machine) is found stale.
    system_metrics: sample CPU, memory (and GPU) use into the run while it is open; None leaves
    it to $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.
    """
    configure(experiment)
    # A locked SQLite database is retried or reported as one line; MLflow's own report is a traceback.
    logging.getLogger("mlflow.store.db.utils").addFilter(not_a_lock_retried)
    if run_id:
        # start_run refuses to resume a run outside the active experiment, so follow the run.
        mlflow.set_experiment(experiment_id=get_run(run_id).experiment_id)
    if system_metrics:
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", str(SYSTEM_METRICS_INTERVAL_S))
    inherited = os.environ.get(RUN_ID_ENV)
    all_tags = {**(tags or {}), **liveness_tags()}
    try:
        active = mlflow.start_run(
            run_id=run_id,
            run_name=run_name,
            # A run that exists may be resumed by several processes at once (tuning workers sharing a
            # study's parent run): their tags are set apart, tolerating each other (set_tags_shared).
            tags=None if run_id else all_tags,
            log_system_metrics=system_metrics,
        )
        if run_id:
            set_tags_shared(run_id, all_tags)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "PERMISSION_DENIED":
            raise
        raise not_permitted(experiment_name(experiment) if not run_id else f"of run {run_id}") from None
    mark_experiment(active.info.experiment_id)
    # `mlflow run`'s run is open now, consumed as start_run consumes it when given no run id: runs
    # nested in it must be new runs, and start_run would resume $MLFLOW_RUN_ID for each of them
    # (a tuning study's first trial took over its parent).
    if inherited == active.info.run_id:
        os.environ.pop(RUN_ID_ENV, None)
    with _ended_by_outcome(active):
        yield ActiveRun(active.info.run_id, active.info.experiment_id)


T = TypeVar("T")

# How a SQL store's duplicate-key refusal reads, directly (sqlalchemy's text in an MlflowException)
# or relayed by a tracking server: PostgreSQL, MySQL and SQLite word it differently.
_DUPLICATE_KEY = ("IntegrityError", "UniqueViolation", "duplicate key", "Duplicate entry", "UNIQUE constraint")


def retried_if_raced(write: Callable[[], T]) -> T:
    """Run a write another process may make to the same run at the same moment, once more if it lost.

    A SQL store inserts a param, tag or latest metric it does not find; two processes that both find
    none race, and the second insert fails on the duplicate key. The row is there now: the second
    try finds it (a param: skipped; a tag or metric: updated).
    """
    try:
        return write()
    except mlflow.exceptions.MlflowException as exc:
        if not any(marker in str(exc) for marker in _DUPLICATE_KEY):
            raise
    return write()


def set_tags_shared(run_id: str, tags: Mapping[str, str]) -> None:
    """Set tags on a run other processes may be tagging at the same moment."""
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        retried_if_raced(lambda key=key, value=value: client.set_tag(run_id, key, value))


def not_permitted(experiment: str) -> PipelineError:
    """A team server with logins (`make server AUTH=1`) refused this user the experiment."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "this user")
    return PipelineError(
        f"the tracking server at {tracking_uri()} does not let {user} log runs into experiment {experiment!r} "
        "(another user's): ask its owner or an admin for EDIT permission on it, or pass --experiment with a "
        "name of your own"
    )


@contextmanager
def child_run(run_name: str, tags: dict[str, str] | None = None) -> Iterator[ActiveRun]:
    """A run nested in the active one (a tuning trial's, a retrained model's); ends as `run` does."""
    active = mlflow.start_run(run_name=run_name, nested=True, tags={**(tags or {}), **liveness_tags()})
    with _ended_by_outcome(active):
        yield ActiveRun(active.info.run_id, active.info.experiment_id)


@contextmanager
def _ended_by_outcome(active: mlflow.ActiveRun) -> Iterator[None]:
    """End the active run FINISHED, FAILED (error) or KILLED (Ctrl-C, SIGTERM), never RUNNING; its
    heartbeat is refreshed until then."""
    heartbeat = Heartbeat(active.info.run_id)
    try:
        yield
    except BaseException as exc:
        # KeyboardInterrupt: Ctrl-C, and SIGTERM (signals.Terminated, or whatever a library made of it)
        terminated = signals.received()
        status = RunStatus.KILLED if isinstance(exc, KeyboardInterrupt) or terminated else RunStatus.FAILED
        lost = None if terminated else server_failure(exc)
        untold = end_active_run(heartbeat, status)
        if lost is not None or untold is not None:
            raise server_lost(active.info.run_id, lost or untold, marked=untold is None) from None
        raise
    else:
        if (untold := end_active_run(heartbeat, RunStatus.FINISHED)) is not None:
            raise server_lost(active.info.run_id, untold, marked=False) from None


# SQLite's refusal of a write that met another connection's: at once, not after its busy timeout,
# when both read before writing (neither can wait for the other).
_LOCKED = ("database is locked", "database table is locked")
LOCKED_RETRIES = 5


def end_active_run(heartbeat: Heartbeat, status: int) -> BaseException | None:
    """End the active run with `status`; the server failure if the server could not be told (else None).

    mlflow.end_run marks the run ended before it stops the run's system-metrics thread, whose last
    batch can meet that write on a SQLite store: the write is refused as locked, and end_run has
    already let go of the run. The mark is then made again, a few times, after a short wait.
    """
    heartbeat.stop()
    run_id = mlflow.active_run().info.run_id
    try:
        mlflow.end_run(RunStatus.to_string(status))
    except mlflow.exceptions.MlflowException as exc:
        if (failure := server_failure(exc)) is not None:
            return failure
        if not locked(exc):
            raise
        client = mlflow.MlflowClient()
        for attempt in range(1, LOCKED_RETRIES + 1):
            time.sleep(0.1 * attempt)
            try:
                client.set_terminated(run_id, RunStatus.to_string(status))
                break
            except mlflow.exceptions.MlflowException as again:
                if attempt == LOCKED_RETRIES or not locked(again):
                    raise
    return None


def locked(exc: BaseException) -> bool:
    """Whether a store refused a write because SQLite's database was locked by another connection."""
    return any(marker in str(exc) for marker in _LOCKED)


def not_a_lock_retried(record: logging.LogRecord) -> bool:
    """A log filter for MLflow's SQL store: False for its report of a locked SQLite database, a
    refusal the pipeline retries (end_active_run) or reports itself as one line."""
    return not (record.exc_info and locked(record.exc_info[1]))


def active_run_id() -> str:
    return mlflow.active_run().info.run_id


def claim_study_run(study_name: str, run_name: str, experiment: str | None = None) -> str:
    """The id of a study's one parent run: the one it has in the experiment, else a new one.

    Workers that start a study at the same moment can each find none and create one. Each then
    looks again and keeps the oldest; a newer one is deleted by the worker that made it, so every
    worker's trials nest under the same run. Works on any store (sqlite, a tracking server),
    as Optuna's storage has no compare-and-set to elect it with.
    """
    if run_id := os.environ.get(RUN_ID_ENV):
        return run_id  # inside `mlflow run -e tune`: its run is the study's
    configure(experiment)
    client = mlflow.MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment_name(experiment)).experiment_id

    def oldest() -> str | None:
        # The study's name is matched here, not in the filter string, where a quote in it would break the query.
        studies = client.search_runs([experiment_id], f"tags.{STAGE_TAG} = '{STUDY_STAGE}'", max_results=1000)
        runs = [r for r in studies if r.data.tags.get("study") == study_name]
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if runs else None

    if (found := oldest()) is not None:
        return found
    mine = client.create_run(experiment_id, run_name=run_name, tags={STAGE_TAG: STUDY_STAGE, "study": study_name})
    mark_experiment(experiment_id)
    chosen = oldest()
    if chosen != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    return chosen


def get_run(run_id: str) -> RunRecord:
    """The run with this id, or a PipelineError that says where to find run ids."""
    try:
        return record_of(mlflow.get_run(run_id))
    except mlflow.exceptions.MlflowException as exc:
        if (failure := server_failure(exc)) is not None:
            raise PipelineError(
                f"cannot reach the MLflow tracking server at {tracking_uri()} ({reason(failure)})"
            ) from None
        raise PipelineError(
            f"no run {run_id!r} in the tracking store {tracking_uri()}; list runs with `make ui` or `pipeline compare`"
        ) from None


def search_runs(experiment: str | None = None, run_ids: Iterable[str] = ()) -> list[RunRecord]:
    """The given runs (any experiment, in the order given), else all of `experiment`, newest first."""
    connect(write=False)
    run_ids = list(dict.fromkeys(run_ids))
    if run_ids:
        return [get_run(run_id) for run_id in run_ids]
    name = experiment_name(experiment)
    found = mlflow.MlflowClient().get_experiment_by_name(name)
    if found is None:
        raise PipelineError(f"no experiment {name!r} in the tracking store {tracking_uri()}; pass --experiment")
    runs = mlflow.MlflowClient().search_runs(
        [found.experiment_id], order_by=["attributes.start_time DESC"], max_results=10_000
    )
    return [record_of(r) for r in runs]


def latest_finished_run(model_name: str, experiment: str | None = None) -> str | None:
    """The newest FINISHED run that trained `model_name` in the experiment, if there is one."""
    connect(write=False)
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment_name(experiment))
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"params.model = '{model_name}' AND attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    # Not a tuning study or trial: they name the model but keep no checkpoint. (A filter
    # `tags.stage != ...` would also drop every run without the tag.)
    runs = [r for r in runs if r.data.tags.get(STAGE_TAG) not in (STUDY_STAGE, TRIAL_STAGE)]
    return runs[0].info.run_id if runs else None


def metric_history(run_id: str, keys: Iterable[str]) -> Any:
    """Every logged value of `keys` as a DataFrame: key, step, value, timestamp (ms)."""
    import pandas as pd

    client = mlflow.MlflowClient()
    rows = [
        {"key": key, "step": m.step, "value": m.value, "timestamp": m.timestamp}
        for key in keys
        for m in client.get_metric_history(run_id, key)
    ]
    return pd.DataFrame(rows, columns=["key", "step", "value", "timestamp"])


def last_logged_steps(run_id: str) -> dict[str, int]:
    """The last step of every metric the run has logged."""
    client = mlflow.MlflowClient()
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in get_run(run_id).metrics}


def fresh_step(run_id: str) -> int:
    """A step none of the run's metrics has yet: ONNX models and their checks are logged there.

    MLflow links every metric the run has at a model's step to that model when it is logged:
    at step 0 (its default) the first system metrics, at training's last step the torch model's
    figures, at an earlier export's step its parity figures. A fresh step holds none of them,
    and it makes the latest check the run's latest value. Called after training, when nothing
    else is logging into the run.
    """
    client = mlflow.MlflowClient()
    steps = (m.step for key in get_run(run_id).metrics for m in client.get_metric_history(run_id, key))
    return max(steps, default=-1) + 1


def mark_failed(run_id: str, why: str) -> None:
    """Close a stale run: FAILED, with an end time and a tag that says why."""
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "closed_as_stale", why)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


# ----------------------------------------------------------------- run description and stages


def run_description(params: Mapping[str, str], metrics: Mapping[str, float], tags: Mapping[str, str]) -> str:
    """The run's description (Markdown, shown atop its page in the UI) from what the stages logged."""
    model = params.get("model", "?").upper()
    epochs = int(metrics.get("epochs_completed", float(params.get("epochs", 0) or 0)))
    head = f"**{model}**, {epochs} epoch{'s' if epochs != 1 else ''}"
    if "steps" in metrics:
        head += f" ({int(metrics['steps']):,} steps of {params.get('batch_size', '?')})"
    if "test_accuracy" in metrics:
        images = f" on {int(params['test_size']):,} test images" if params.get("test_size") else ""
        head += f": test accuracy **{metrics['test_accuracy']:.2%}**{images}"
        if "test_macro_f1" in metrics:
            head += f", macro F1 {metrics['test_macro_f1']:.2%}"
    lines = [head, ""]
    if "test_ece" in metrics:
        line = f"- calibration: ECE {metrics['test_ece']:.2%}"
        if "test_ece_calibrated" in metrics and params.get("temperature"):
            line += f", {metrics['test_ece_calibrated']:.2%} after temperature scaling (T = {params['temperature']})"
        else:
            line += " (no validation split: no temperature fitted)"
        lines.append(line + f", NLL {metrics['test_nll']:.4f}")
    if "test_macro_roc_auc" in metrics:
        lines.append(
            f"- ranking: macro ROC-AUC {metrics['test_macro_roc_auc']:.4f}, "
            f"top-2 accuracy {metrics['test_top2_accuracy']:.2%}"
        )
    parity = tags.get("parity")
    if parity:
        detail = []
        if "parity_max_abs_diff" in metrics:
            detail.append(f"max |logit diff| {metrics['parity_max_abs_diff']:.2g}")
        if "parity_argmax_agreement" in metrics:
            detail.append(f"argmax agreement {metrics['parity_argmax_agreement']:.2%}")
        if "onnx_test_accuracy" in metrics:
            detail.append(f"ONNX accuracy {metrics['onnx_test_accuracy']:.2%}")
        lines.append(f"- ONNX parity: **{parity}**" + (f" ({', '.join(detail)})" if detail else ""))
    else:
        lines.append("- ONNX parity: not checked yet (`pipeline export-onnx --run-id <this run>`)")
    if tags.get("int8_check"):
        lines.append(f"- int8 accuracy check: **{tags['int8_check']}**")
    if tags.get(REGISTERED_TAG):
        lines.append(f"- registered as {tags[REGISTERED_TAG]}")
    if tags.get(STAGES_TAG):
        lines.append(f"- stages done: {tags[STAGES_TAG]}")
    return "\n".join(lines)


def finish_stage(run_id: str, stage: str, tags: Mapping[str, str] | None = None) -> None:
    """Add `stage` to the run's stages tag (and `tags`), and rewrite its description from what it holds now."""
    client = mlflow.MlflowClient()
    data = client.get_run(run_id).data
    done = [s for s in data.tags.get(STAGES_TAG, "").split(", ") if s]
    if stage not in done:
        done.append(stage)
    new_tags = {**(tags or {}), STAGES_TAG: ", ".join(done)}
    new_tags[MLFLOW_RUN_NOTE] = run_description(data.params, data.metrics, {**data.tags, **new_tags})
    for key, value in new_tags.items():
        client.set_tag(run_id, key, value)
