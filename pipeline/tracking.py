"""The MLflow boundary: the only module that imports mlflow.

Stages return values; the CLI hands them to the functions here (or passes the training
callback below). Point MLFLOW_TRACKING_URI elsewhere, e.g. at a temporary sqlite file in
tests or at a remote server, and every stage follows.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import posixpath
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_RUN_NOTE
from sqlalchemy.exc import SQLAlchemyError

from pipeline import signals
from pipeline.callbacks import TrainCallback, TrialObserver
from pipeline.config import DEFAULT_EXPERIMENT, EXPERIMENT_ENV, HEARTBEAT_INTERVAL_S, STALE_AFTER_S, project_root
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.train import TrainResult
    from pipeline.tune import StudyResult

CHECKPOINT_ARTIFACT = "checkpoint/model.pt"
# The latest training state, replaced at every checkpoint (the artifact store publishes it
# atomically); the checkpoint_step tag is set only once it is complete.
TRAINING_STATE_ARTIFACT = "checkpoint/training_state.pt"
CHECKPOINT_STEP_TAG, CHECKPOINT_EPOCH_TAG = "checkpoint_step", "checkpoint_epoch"
# Who works on a run, and when it last showed signs of life (unix seconds): see staleness().
HEARTBEAT_TAG, PID_TAG, HOSTNAME_TAG = "heartbeat", "pid", "hostname"
# Stage tags of `pipeline tune`'s runs: the study's parent run and each trial's. Both record a
# model name, but neither holds a trained model.
STUDY_STAGE, TRIAL_STAGE = "tune", "tune-trial"
MODEL_NAME = "model"  # the name of the torch model logged with mlflow.pytorch.log_model
MODEL_URI_TAG = "model_uri"  # where log_torch_model put it, so a reused train stage can say
TORCH_URI_TAG = "pytorch_model_uri"  # run tag: the torch LoggedModel's models:/<model_id>
STAGES_TAG = "stages"  # run tag: the stages done on the run so far, in order ("train, evaluate, export-onnx")
REGISTERED_TAG = "registered_as"  # run tag: "fashion-cnn v3", set by `pipeline register`

# The UI's own tag and value for "this experiment trains models" (mlflow 3.17 has no Python
# constant for it). Note: 3.17's UI picks the page an experiment opens on from its GenAI /
# Model training switch (stored per browser), not from this tag; the link ui_links makes sets
# the switch for that page.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
EXPERIMENT_DESCRIPTION = (
    "Fashion-MNIST classifiers (the DNN and CNN of chapter 5) trained by fashion-pipeline: one run per "
    "`make run` or `pipeline train`, with its evaluation, ONNX export and parity check logged into it. "
    "Runs named `compare ...` hold `pipeline compare`'s table and chart. Registered models: "
    "`pipeline register` and `pipeline promote` (aliases candidate and champion)."
)
# The runs table's columns, saved the way the UI's Share button saves a view (an experiment tag)
# and opened by the link `pipeline ui-url` prints: otherwise the table shows no metric at all.
RUNS_VIEW_KEY = "fashion-pipeline-runs"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
RUNS_VIEW = {
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
    "selectedColumns": [
        "attributes.`Dataset`",
        "attributes.`Models`",
        "params.`model`",
        "params.`epochs`",
        "metrics.`test_accuracy`",
        "metrics.`test_macro_f1`",
        "metrics.`onnx_test_accuracy`",
        "metrics.`wall_time_s`",
        "tags.`parity`",
        "tags.`stages`",
    ],
}
# MLflow samples every 10 s by default and drops the samples of a run that ends before the
# first 10 s are up: a smoke run would record nothing.
SYSTEM_METRICS_INTERVAL_S = 1.0


def store_dir() -> Path:
    return project_root() / "mlruns"


def default_tracking_uri() -> str:
    # MLflow 3.17 retired the plain file store, so the project store is a sqlite database
    # inside mlruns/, with artifacts beside it.
    return f"sqlite:///{store_dir() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def experiment_name(experiment: str | None = None) -> str:
    """The experiment a command means: --experiment, else $MLFLOW_EXPERIMENT_NAME, else the default."""
    return experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


# MLflow retries a failed HTTP request 7 times with growing back-off (minutes in all) and waits
# 120 s for each answer: made for rate-limited cloud services. For a CLI whose team server is
# down that is minutes of silence, so a server URI gets these unless the user set them.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # with back-off 1: retries at once, then after ~2 s
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",  # seconds of silence per request, not a cap on uploads
}


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def prepare_server(uri: str) -> None:
    """For a tracking server: retry settings for a CLI, then one cheap request, so a wrong port or a
    missing login fails here in seconds with one line, not in minutes with a traceback.
    """
    if not is_server(uri):
        return
    import requests

    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if user else None
    try:
        answer = requests.get(
            f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
            params={"max_results": 1},
            auth=auth,
            timeout=min(float(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]), 10.0),
        )
    except requests.RequestException as exc:
        raise PipelineError(
            f"cannot reach the MLflow tracking server at {uri} ({_reason(exc)}); is it running (`make server`)? "
            "Or unset MLFLOW_TRACKING_URI for the local store"
        ) from None
    if answer.status_code == 401:
        refused = " refused the login given" if auth else " asks for a login"
        raise PipelineError(
            f"the MLflow tracking server at {uri}{refused}: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )


def _server_failure(exc: BaseException) -> BaseException | None:
    """The requests error behind an MLflow error, if it came from not reaching the server at all.

    That covers refused and reset connections, timeouts and 5xx answers left after the
    retries; an HTTP error the server chose to send (404, 401, ...) is not one.
    """
    import requests

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, requests.RequestException):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for needle, reason in (
        ("Connection refused", "connection refused"),
        ("RemoteDisconnected", "connection closed"),
        ("Connection aborted", "connection closed"),
        ("Connection reset", "connection reset"),
        ("timed out", "timed out"),
        ("too many 5", "it answers with server errors"),
    ):
        if needle in text:
            return reason
    return text.splitlines()[0][:200] if text else type(exc).__name__


def server_lost(run_id: str, failure: BaseException, marked: bool) -> PipelineError:
    state = (
        "it is marked FAILED"
        if marked
        else "it stays RUNNING there, as the server could not be told; once the server is back, "
        "`pipeline runs --stale --mark-failed` closes it"
    )
    return PipelineError(
        f"lost the MLflow tracking server at {tracking_uri()} during run {run_id} ({_reason(failure)}); {state}"
    )


_opened: set[tuple[str, bool]] = set()  # (uri, write) checked by open_store in this process
SQLITE_HEADER = b"SQLite format 3\x00"


def connect(write: bool = True) -> str:
    """Point mlflow at the store, checked and initialised once (see open_store); no experiment is created.

    `write=False` is for commands that only read runs, which a read-only store still serves.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if (uri, write) not in _opened:
        prepare_server(uri)  # a server first: sane retries, and nothing listening fails in seconds
        open_store(uri, write)
        _opened.add((uri, write))
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for other stores and in-memory databases)."""
    path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def open_store(uri: str, write: bool = True) -> None:
    """Fail in seconds, with one line naming MLFLOW_TRACKING_URI, on a store that can't be used.

    Left to MLflow, an unwritable sqlite folder costs ~100 s of engine retries and then a
    traceback, and an unknown scheme a traceback. A fresh sqlite store is initialised here under
    an exclusive lock on a file beside the database: MLflow migrates an empty database from
    every process that opens it, and concurrent first runs would race (`duplicate column name`).
    """

    def fail(why: str) -> PipelineError:
        fix = "Set MLFLOW_TRACKING_URI to a store you can write"
        if os.environ.get("MLFLOW_TRACKING_URI"):
            fix += f", or unset it for the project store {default_tracking_uri()}"
        return PipelineError(f"cannot use the tracking store {uri}: {why}. {fix}")

    path = sqlite_path(uri)
    if path is None:
        _open_with_mlflow(uri, fail)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except FileNotFoundError as exc:
        if exc.filename != str(path):
            raise fail(f"{exc.filename}: {exc.strerror}") from None
        header = b""  # a new store
    except OSError as exc:
        raise fail(f"{exc.filename or path}: {exc.strerror or exc}") from None
    if header and header != SQLITE_HEADER:
        raise fail(f"{path} is not a sqlite database")
    if not write and header:
        _open_with_mlflow(uri, fail)
        return
    # sqlite writes its journal beside the database, so the folder must be writable too.
    for target in (path.parent, path):
        if target.exists() and not os.access(target, os.W_OK):
            raise fail(f"{target} is not writable")
    try:
        with open(path.parent / f"{path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            _open_with_mlflow(uri, fail)
    except OSError as exc:
        raise fail(f"{exc.filename or path.parent}: {exc.strerror or exc}") from None


def _open_with_mlflow(uri: str, fail: Callable[[str], PipelineError]) -> None:
    """Open the tracking store (which creates and migrates a fresh database) with one cheap query."""
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except (mlflow.exceptions.MlflowException, SQLAlchemyError) as exc:
        raise fail(str(exc).strip().splitlines()[0].split(" See https://")[0].rstrip(".")) from None


def configure(experiment: str | None = None) -> str:
    """Point mlflow at the project store (or MLFLOW_TRACKING_URI) and pick the experiment."""
    uri = connect()
    if os.environ.get("MLFLOW_RUN_ID"):  # inside `mlflow run`: its run already has an experiment
        return uri
    name = experiment_name(experiment)
    if mlflow.get_experiment_by_name(name) is None:
        location = None
        if path := sqlite_path(uri):
            # Beside the database, whatever directory the command was started from.
            location = (path.parent / "artifacts" / name).resolve().as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException as exc:
            # Another process created it since we looked: theirs is the one we use.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    mlflow.set_experiment(name)
    return uri


def mark_experiment(experiment_id: str) -> None:
    """Tag the experiment as model training, with a description and the runs view (see RUNS_VIEW).

    The kind and description are set only where missing, so a description edited in the UI stays.
    """
    client = mlflow.MlflowClient()
    tags = client.get_experiment(experiment_id).tags
    wanted = {
        EXPERIMENT_KIND_TAG: tags.get(EXPERIMENT_KIND_TAG) or EXPERIMENT_KIND,
        MLFLOW_RUN_NOTE: tags.get(MLFLOW_RUN_NOTE) or EXPERIMENT_DESCRIPTION,
        RUNS_VIEW_TAG: json.dumps(RUNS_VIEW),
    }
    for key, value in wanted.items():
        if tags.get(key) != value:
            try:
                client.set_experiment_tag(experiment_id, key, value)
            except mlflow.exceptions.MlflowException:
                # Processes that start at once on a new experiment race to add the same tag, and a
                # SQL store refuses the second insert (a duplicate key); theirs is as good as ours.
                if key not in client.get_experiment(experiment_id).tags:
                    raise


def ui_links(experiment: str | None, base_url: str) -> tuple[str | None, str]:
    """The UI's page of the experiment's runs (in the pipeline's view; None if there is no such
    experiment yet) and of the Model Registry. Marks an existing experiment as mark_experiment does."""
    models = f"{base_url}/#/models"
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None, models  # no store yet: don't create an empty one just to look
    connect()
    found = mlflow.get_experiment_by_name(experiment_name(experiment))
    if found is None:
        return None, models
    mark_experiment(found.experiment_id)
    # workflowType: the Model training side of the UI's switch, whatever this browser last chose.
    query = f"viewStateShareKey={RUNS_VIEW_KEY}&workflowType=machine_learning"
    return f"{base_url}/#/experiments/{found.experiment_id}/runs?{query}", models


@contextmanager
def run(
    run_id: str | None = None,
    run_name: str | None = None,
    experiment: str | None = None,
    tags: dict[str, str] | None = None,
    system_metrics: bool | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start or resume a run; it ends FINISHED, FAILED (error) or KILLED (Ctrl-C, SIGTERM), never RUNNING.

    While it is open, a heartbeat tag is refreshed with the pid and host, so a run left RUNNING
    by a process that died without cleaning up (kill -9, a crash, a lost machine) is found stale.
    system_metrics: sample CPU, memory (and GPU) use into the run while it is open; None leaves
    it to $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.
    """
    configure(experiment)
    if run_id:
        # start_run refuses to resume a run outside the active experiment, so follow the run.
        mlflow.set_experiment(experiment_id=get_run(run_id).info.experiment_id)
    if system_metrics:
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", str(SYSTEM_METRICS_INTERVAL_S))
    active = mlflow.start_run(
        run_id=run_id,
        run_name=run_name,
        tags={**(tags or {}), **_liveness_tags()},
        log_system_metrics=system_metrics,
    )
    mark_experiment(active.info.experiment_id)
    with _ended_by_outcome(active):
        yield active


def claim_study_run(study_name: str, run_name: str, experiment: str | None = None) -> str:
    """The id of a study's one parent run: the one it has in the experiment, else a new one.

    Workers that start a study at the same moment can each find none and create one. Each then
    looks again and keeps the oldest; a newer one is deleted by the worker that made it, so every
    worker's trials nest under the same run. Works on any store (sqlite, a tracking server),
    as Optuna's storage has no compare-and-set to elect it with.
    """
    if run_id := os.environ.get("MLFLOW_RUN_ID"):
        return run_id  # inside `mlflow run -e tune`: its run is the study's
    configure(experiment)
    client = mlflow.MlflowClient()
    experiment_id = mlflow.get_experiment_by_name(experiment_name(experiment)).experiment_id

    def oldest() -> str | None:
        # The study's name is matched here, not in the filter string, where a quote in it would break the query.
        studies = client.search_runs([experiment_id], f"tags.stage = '{STUDY_STAGE}'", max_results=1000)
        runs = [r for r in studies if r.data.tags.get("study") == study_name]
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if runs else None

    if (found := oldest()) is not None:
        return found
    mine = client.create_run(experiment_id, run_name=run_name, tags={"stage": STUDY_STAGE, "study": study_name})
    mark_experiment(experiment_id)
    chosen = oldest()
    if chosen != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    return chosen


@contextmanager
def child_run(run_name: str, tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A run nested in the active one (a tuning trial's, a retrained model's); ends as `run` does."""
    active = mlflow.start_run(run_name=run_name, nested=True, tags={**(tags or {}), **_liveness_tags()})
    with _ended_by_outcome(active):
        yield active


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
        lost = None if terminated else _server_failure(exc)
        untold = _end_run(heartbeat, status)
        if lost is not None or untold is not None:
            raise server_lost(active.info.run_id, lost or untold, marked=untold is None) from None
        raise
    else:
        if (untold := _end_run(heartbeat, RunStatus.FINISHED)) is not None:
            raise server_lost(active.info.run_id, untold, marked=False) from None


def _end_run(heartbeat: Heartbeat, status: int) -> BaseException | None:
    """End the active run with `status`; the server failure if the server could not be told (else None)."""
    heartbeat.stop()
    try:
        mlflow.end_run(RunStatus.to_string(status))
    except mlflow.exceptions.MlflowException as exc:
        if (failure := _server_failure(exc)) is None:
            raise
        return failure
    return None


def _liveness_tags() -> dict[str, str]:
    return {HEARTBEAT_TAG: f"{time.time():.0f}", PID_TAG: str(os.getpid()), HOSTNAME_TAG: socket.gethostname()}


class Heartbeat:
    """Refreshes a run's heartbeat tag from a daemon thread until stopped."""

    def __init__(self, run_id: str, interval: float = HEARTBEAT_INTERVAL_S):
        self.run_id, self.interval = run_id, interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        client = mlflow.MlflowClient()
        while not self.stopped.wait(self.interval):
            try:
                client.set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception:  # a store busy for a moment must not break the stage; the next beat retries
                pass

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)


def get_run(run_id: str) -> Any:
    """The run with this id, or a PipelineError that says where to find run ids."""
    try:
        return mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        if (failure := _server_failure(exc)) is not None:
            raise PipelineError(
                f"cannot reach the MLflow tracking server at {tracking_uri()} ({_reason(failure)})"
            ) from None
        raise PipelineError(
            f"no run {run_id!r} in the tracking store {tracking_uri()}; list runs with `make ui` or `pipeline compare`"
        ) from None


def log_params(params: dict[str, Any]) -> None:
    """Log params into the active run, leaving alone those it already has.

    `mlflow run` logs the entry point's parameters as typed on its command line (`lr=1e-3`,
    `max_steps=0`); MLflow refuses to change a param, and those are the same settings.
    """
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params.items() if k not in existing}
    if flat:
        mlflow.log_params(flat)


def log_metrics(
    metrics: dict[str, float], step: int | None = None, model_id: str | None = None, dataset: Any = None
) -> None:
    """Numbers from numpy and torch as plain floats, which every store backend accepts.

    model_id: the LoggedModel the metrics are about (the Models tab shows them with it);
    without one they are the run's only.
    """
    if model_id is None and dataset is None:
        # Through the client, which links nothing: mlflow.log_metrics would link these to every
        # model logged at `step` (e.g. figures of an ONNX file that is not logged, to the one that is).
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
        mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=rows)
        return
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, model_id=model_id, dataset=dataset)


def model_id_of(model_uri: str) -> str:
    """models:/<model_id> -> <model_id>, the form LoggedModels are logged and tagged in."""
    return model_uri.removeprefix("models:/")


def run_model_uri(run_id: str, tag: str) -> str | None:
    """The models:/<model_id> URI a stage tagged the run with (TORCH_URI_TAG, ONNX_URI_TAGS[...]), if any."""
    return get_run(run_id).data.tags.get(tag)


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


# ----------------------------------------------------------------- datasets

DATASET_CONTEXTS = {"train": "training", "test": "testing"}  # MLflow's names for what a split was used for


@dataclass(frozen=True)
class DataSplit:
    """A split as the data module knows it, for logging as an MLflow dataset input."""

    split: str  # train | test
    folder: Path  # where its IDX files are
    digests: dict[str, str]  # file name -> SHA-256 of its decompressed content
    rows: int


def _dataset(split: DataSplit) -> Any:
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
    return SplitDataset(
        source=source,
        name=f"fashion-mnist-{split.split}",
        digest=combined[:16],
    )


def log_datasets(splits: Iterable[DataSplit]) -> None:
    """The splits as dataset inputs of the active run, with the contexts training / testing."""
    for split in splits:
        mlflow.log_input(_dataset(split), context=DATASET_CONTEXTS.get(split.split, split.split))


def log_torch_model(model: Any, example: Any, class_names: list[str], step: int = 0) -> str:
    """Log the model with mlflow.pytorch (signature + example) and a plain checkpoint.

    step: training's last step. MLflow links the run's metrics at the model's step to the
    model, so these are the final training metrics (see fresh_step for the ONNX models), and
    system metrics sampled at that step too, in a run that lasts more seconds than it has steps.

    The checkpoint (state_dict + registry name) is what later stages load: it rebuilds the
    real nn.Module, which can switch between train and eval mode, unlike the torch.export
    program that mlflow.pytorch saves by default.
    """
    import torch
    from mlflow.models import infer_signature

    from pipeline.checkpoint import save_checkpoint

    # Standard layout for the saved program: channels_last is a training-speed choice, and
    # torch.export's archive warns about (and mis-groups) its strided weights.
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        model,
        name=MODEL_NAME,
        step=step,
        signature=infer_signature(example, logits),
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    mlflow.set_tag(TORCH_URI_TAG, info.model_uri)  # later stages link their metrics to it
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(CHECKPOINT_ARTIFACT).name
        save_checkpoint(model, path, class_names)
        mlflow.log_artifact(str(path), str(Path(CHECKPOINT_ARTIFACT).parent))
    mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
    return info.model_uri


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


def load_run_model(run_id: str) -> tuple[Any, list[str]]:
    """The trained nn.Module of a run (eval mode) and its class names, from its checkpoint."""
    from pipeline.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        return load_checkpoint(download_artifact(run_id, CHECKPOINT_ARTIFACT, Path(tmp)))


def download_onnx_model(model_uri: str, dst: Path) -> Path:
    """The .onnx file of a logged ONNX model (runs:/, models:/<name>@<alias>, models:/<id>), in dst.

    Downloads the files only, never loads the pyfunc: the predictor process stays free of torch.
    """
    from pipeline import registry

    connect(write=False)
    registry.check_model_uri(model_uri)  # an unknown name, version or alias gets a hint, not MLflow's error
    try:
        with quiet_downloads():
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except ImportError as exc:  # s3://, gs://, ...: MLflow needs that store's client library
        raise PipelineError(
            f"cannot fetch model {model_uri!r}: its store needs the {exc.name or 'client'} package, which is not "
            "installed; download the .onnx file and give its path, or use runs:/ or models:/ URIs of this store"
        ) from None
    except Exception as exc:  # MLflow raises MlflowException, OSError or ValueError (http:// URIs) here
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PipelineError(
            f"cannot fetch model {model_uri!r} from the tracking store {tracking_uri()}: {first_line}"
        ) from None
    if local.is_file():
        return local
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        flavors = mlflow.models.Model.load(str(mlmodel)).flavors
        if "onnx" not in flavors:
            raise PipelineError(
                f"model {model_uri!r} is not an ONNX model (flavors: {', '.join(flavors)}); "
                "export it with `pipeline export-onnx` and predict with the logged ONNX model"
            )
        return local / flavors["onnx"]["data"]
    found = sorted(local.rglob("*.onnx"))
    if len(found) != 1:
        raise PipelineError(f"model {model_uri!r}: expected one .onnx file, found {len(found)}")
    return found[0]


# ----------------------------------------------------------------- evaluate / compare helpers


def log_table(table: Any, artifact_file: str) -> None:
    """A DataFrame as an MLflow table (a .json artifact the UI renders as a table).

    Logging it again replaces the table: mlflow.log_table would append the rows to the old
    ones, so re-evaluating a run would double its per-class table in the UI.
    """
    run_id = mlflow.active_run().info.run_id
    folder = posixpath.dirname(artifact_file) or None
    if artifact_file in {f.path for f in mlflow.MlflowClient().list_artifacts(run_id, folder)}:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / posixpath.basename(artifact_file)
            table.to_json(path, orient="split", index=False, date_format="iso")  # log_table's own format
            mlflow.log_artifact(str(path), folder)
        return
    with warnings.catch_warnings():
        # mlflow 3.17 probes text columns with a select_dtypes call that pandas 3 deprecates.
        warnings.filterwarnings("ignore", message="For backward compatibility, 'str' dtypes")
        mlflow.log_table(data=table, artifact_file=artifact_file)


def log_evaluation(
    metrics: dict[str, float], step: int, per_class: Any, table_file: str, folder: Path, test: DataSplit | None = None
) -> None:
    """An evaluation into the active run: metrics at `step`, the per-class table, and `folder`'s files.

    The metrics belong to the run's torch model (the one evaluated) and to the test split.
    """
    torch_uri = run_model_uri(mlflow.active_run().info.run_id, TORCH_URI_TAG)
    log_metrics(
        metrics,
        step=step,
        model_id=model_id_of(torch_uri) if torch_uri else None,
        dataset=_dataset(test) if test else None,
    )
    log_table(per_class, table_file)
    mlflow.log_artifacts(str(folder))


def run_id_for_model(model_uri: str) -> str:
    """The run that logged a model: runs:/<run_id>/..., models:/<model_id> or models:/<name>/<version>."""
    if model_uri.startswith("runs:/"):
        run_id = model_uri.removeprefix("runs:/").split("/")[0]
    else:
        try:
            run_id = mlflow.models.get_model_info(model_uri).run_id
        except (mlflow.exceptions.MlflowException, OSError) as exc:
            raise PipelineError(
                f"no model {model_uri!r} in the tracking store {tracking_uri()} ({exc}); "
                "give runs:/<run_id>/model, models:/<model_id> or models:/<name>/<version>"
            ) from None
        if not run_id:
            raise PipelineError(f"model {model_uri!r} was not logged from a run; evaluate it with --run-id instead")
    get_run(run_id)
    return run_id


def read_csv_artifact(run_id: str, artifact_path: str) -> Any:
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        return pd.read_csv(download_artifact(run_id, artifact_path, Path(tmp)))


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


def latest_finished_run(model_name: str, experiment: str | None = None) -> str | None:
    """The newest FINISHED run that trained `model_name` in the experiment, if there is one."""
    connect(write=False)
    if mlflow.get_experiment_by_name(experiment_name(experiment)) is None:
        return None
    found = mlflow.search_runs(
        experiment_names=[experiment_name(experiment)],
        filter_string=f"params.model = '{model_name}' AND attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    # Not a tuning study or trial: they name the model but keep no checkpoint. (A filter
    # `tags.stage != ...` would also drop every run without the tag.)
    if "tags.stage" in found:
        found = found[~found["tags.stage"].isin((STUDY_STAGE, TRIAL_STAGE))]
    return None if found.empty else str(found.iloc[0]["run_id"])


def search_runs(experiment: str | None = None, run_ids: Iterable[str] = ()) -> Any:
    """mlflow.search_runs as pandas: the given runs (any experiment), else all of `experiment`."""
    connect(write=False)
    run_ids = list(run_ids)
    if run_ids:
        for run_id in run_ids:
            get_run(run_id)
        quoted = ", ".join(f"'{run_id}'" for run_id in run_ids)
        return mlflow.search_runs(search_all_experiments=True, filter_string=f"attributes.run_id IN ({quoted})")
    name = experiment_name(experiment)
    if mlflow.get_experiment_by_name(name) is None:
        raise PipelineError(f"no experiment {name!r} in the tracking store {tracking_uri()}; pass --experiment")
    return mlflow.search_runs(experiment_names=[name], order_by=["attributes.start_time DESC"])


class MlflowTrainCallback(TrainCallback):
    """Streams a training run into the active MLflow run, checkpoints included."""

    def __init__(self, logged_steps: dict[str, int] | None = None):
        # The last step logged for each metric. A resumed run starts from the store's (see
        # last_logged_steps): what the killed process logged past its checkpoint is not logged twice.
        self.logged_steps = dict(logged_steps or {})

    def _log(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.logged_steps.get(k, -1)}
        if fresh:
            log_metrics(fresh, step=step)
            self.logged_steps.update(dict.fromkeys(fresh, step))

    def on_train_start(self, params: dict[str, Any]) -> None:
        log_params(params)
        # `mlflow run` tags the commit itself; `pipeline train` started by hand has only the param.
        commit = str(params.get("git_commit", "")).removesuffix("-dirty")
        run_id = mlflow.active_run().info.run_id
        if len(commit) == 40 and MLFLOW_GIT_COMMIT not in mlflow.get_run(run_id).data.tags:
            mlflow.set_tag(MLFLOW_GIT_COMMIT, commit)

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self._log(metrics, step)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self._log({**metrics, "epoch": epoch}, step)

    def on_checkpoint(self, epoch: int, step: int, state: dict[str, Any]) -> None:
        from pipeline.checkpoint import save_training_state

        with tempfile.TemporaryDirectory() as tmp:
            path = save_training_state(state, Path(tmp) / posixpath.basename(TRAINING_STATE_ARTIFACT))
            mlflow.log_artifact(str(path), posixpath.dirname(TRAINING_STATE_ARTIFACT))
        mlflow.set_tags({CHECKPOINT_STEP_TAG: str(step), CHECKPOINT_EPOCH_TAG: str(epoch)})

    def on_train_end(self, result: TrainResult) -> None:
        self._log(
            # Evaluation metrics were logged at their epoch's step already.
            {k: v for k, v in result.metrics.items() if not k.startswith(("test_", "val_"))},
            result.metrics["steps"],
        )
        mlflow.log_dict(result.params["class_names"], "class_names.json")
        mlflow.log_dict(result.history, "history.json")


# ----------------------------------------------------------------- resume and stale runs


def last_logged_steps(run_id: str) -> dict[str, int]:
    """The last step of every metric the run has logged."""
    client = mlflow.MlflowClient()
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in get_run(run_id).data.metrics}


def resumable_run(run_id: str) -> Any:
    """A KILLED, FAILED or stale RUNNING run with a training checkpoint; else a PipelineError that says why."""
    connect()
    found = get_run(run_id)
    status = found.info.status
    if status == "FINISHED":
        raise PipelineError(f"run {run_id} is FINISHED: there is nothing to resume")
    if status == "RUNNING":
        why = staleness(found)
        if why is None:
            raise PipelineError(
                f"run {run_id} is still RUNNING ({describe_liveness(found)}); stop it first, "
                "or resume it once `pipeline runs --stale` lists it"
            )
    elif status not in ("KILLED", "FAILED"):
        raise PipelineError(f"run {run_id} is {status}; only KILLED, FAILED or stale RUNNING runs can be resumed")
    if CHECKPOINT_STEP_TAG not in found.data.tags:
        raise PipelineError(
            f"run {run_id} has no training checkpoint to resume from (it stopped before its first "
            "checkpoint, or was not made by `pipeline train`); train it again"
        )
    return found


def load_training_state(run_id: str) -> dict[str, Any]:
    from pipeline.checkpoint import load_training_state as load

    with tempfile.TemporaryDirectory() as tmp:
        return load(download_artifact(run_id, TRAINING_STATE_ARTIFACT, Path(tmp)))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:  # a zombie has exited; only its parent has not collected it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _heartbeat(found: Any) -> float:
    """When the run last showed signs of life (unix seconds): its heartbeat, else its start."""
    try:
        return float(found.data.tags[HEARTBEAT_TAG])
    except (KeyError, ValueError):
        return found.info.start_time / 1000


def staleness(found: Any, stale_after: float = STALE_AFTER_S, now: float | None = None) -> str | None:
    """Why a RUNNING run is stale (its process is gone, or its heartbeat is too old); None if it looks alive."""
    if found.info.status != "RUNNING":
        return None
    tags = found.data.tags
    pid = tags.get(PID_TAG, "")
    if tags.get(HOSTNAME_TAG) == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
        return f"its process {pid} on this host is gone"
    age = (now or time.time()) - _heartbeat(found)
    if age > stale_after:
        return f"no heartbeat for {age:,.0f} s" if HEARTBEAT_TAG in tags else f"started {age:,.0f} s ago, no heartbeat"
    return None


def describe_liveness(found: Any) -> str:
    tags = found.data.tags
    where = f"pid {tags[PID_TAG]} on {tags[HOSTNAME_TAG]}, " if PID_TAG in tags and HOSTNAME_TAG in tags else ""
    return f"{where}last heartbeat {time.time() - _heartbeat(found):,.0f} s ago"


@dataclass
class RunRow:
    """One run as `pipeline runs` lists it."""

    run_id: str
    experiment: str
    name: str
    status: str
    start_time: float  # unix seconds
    checkpoint_step: int | None
    liveness: str  # for RUNNING runs: pid, host and heartbeat age
    stale: str | None  # why a RUNNING run is stale


def list_runs(experiment: str | None = None, running_only: bool = False, stale_after: float = STALE_AFTER_S) -> list:
    """Runs of `experiment` (default: every experiment in the store), newest first."""
    connect()
    client = mlflow.MlflowClient()
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise PipelineError(f"no experiment {experiment!r} in the tracking store {tracking_uri()}")
        experiments = [found]
    else:
        experiments = client.search_experiments()
    names = {e.experiment_id: e.name for e in experiments}
    if not names:
        return []
    runs = client.search_runs(
        list(names),
        filter_string="attributes.status = 'RUNNING'" if running_only else "",
        order_by=["attributes.start_time DESC"],
        max_results=10_000,
    )
    now = time.time()
    return [
        RunRow(
            run_id=r.info.run_id,
            experiment=names[r.info.experiment_id],
            name=r.info.run_name or "",
            status=r.info.status,
            start_time=r.info.start_time / 1000,
            checkpoint_step=int(r.data.tags[CHECKPOINT_STEP_TAG]) if CHECKPOINT_STEP_TAG in r.data.tags else None,
            liveness=describe_liveness(r) if r.info.status == "RUNNING" else "",
            stale=staleness(r, stale_after, now),
        )
        for r in runs
    ]


def mark_failed(run_id: str, why: str) -> None:
    """Close a stale run: FAILED, with an end time and a tag that says why."""
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "closed_as_stale", why)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


# ----------------------------------------------------------------- stage reuse (`mlflow run . -P reuse=true`)


def source_commit() -> str | None:
    """The git commit of the project's checkout, or None outside one."""
    from mlflow.utils.git_utils import get_git_commit

    return get_git_commit(str(project_root()))


def stage_key(stage: str, settings: dict[str, Any]) -> str | None:
    """A digest of what a stage's outputs depend on: its settings (data digests included) and the git
    commit. None outside a git checkout, where nothing is reused."""
    commit = source_commit()
    if commit is None:
        return None
    blob = json.dumps({"stage": stage, "git_commit": commit, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _stage_tag(stage: str) -> str:
    return f"stage_key.{stage}"


def mark_stage_done(stage: str, key: str | None) -> None:
    """Tag the active run: it holds `stage`'s outputs for `key`, for a later `reuse` to find."""
    if key:
        mlflow.set_tag(_stage_tag(stage), key)


def finished_stage_run(stage: str, key: str | None, run_id: str | None = None) -> Any:
    """A FINISHED run that already did `stage` for `key`: `run_id` itself, or the newest in the active
    experiment when `run_id` is None. None when there is none."""
    if not key:
        return None
    if run_id:
        found = get_run(run_id)
        return found if found.info.status == "FINISHED" and found.data.tags.get(_stage_tag(stage)) == key else None
    hits = mlflow.MlflowClient().search_runs(
        [mlflow.active_run().info.experiment_id],
        filter_string=f"tags.`{_stage_tag(stage)}` = '{key}' AND attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return hits[0] if hits else None


def mark_reused(stage: str, source_run_id: str, job_run_id: str) -> None:
    """Tag the job's run: `stage` was not run again; its outputs are in `source_run_id`."""
    if job_run_id != source_run_id:
        mlflow.MlflowClient().set_tag(job_run_id, f"reused.{stage}", source_run_id)


def model_run(run_id: str) -> str:
    """The run that holds `run_id`'s trained model: a job run whose train stage was reused points to it."""
    return get_run(run_id).data.tags.get("reused.train", run_id)


# ----------------------------------------------------------------- hyperparameter search (pipeline tune)

# How a trial's state ends its run: a pruned trial ran as asked until the pruner stopped it.
TRIAL_RUN_STATUS = {
    "complete": RunStatus.FINISHED,
    "pruned": RunStatus.FINISHED,
    "failed": RunStatus.FAILED,
    "killed": RunStatus.KILLED,
}


def default_optuna_storage() -> str:
    """Optuna's sqlite database beside the tracking store's (the project's mlruns/ by default)."""
    path = sqlite_path(tracking_uri())
    folder = path.parent if path else store_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


class MlflowTrialObserver(TrialObserver):
    """One run per trial, nested in the active (study) run: its params, per-epoch metrics and state."""

    def trial_started(self, number: int, params: dict[str, Any]) -> list[TrainCallback]:
        # Liveness as every run has it (child_run's, which a pair of hooks can't hold open), so a
        # worker killed mid-trial leaves a run `pipeline runs --stale` finds.
        tags = {"stage": TRIAL_STAGE, "trial": str(number), **_liveness_tags()}
        active = mlflow.start_run(run_name=f"trial-{number}", nested=True, tags=tags)
        self.run_id, self.heartbeat = active.info.run_id, Heartbeat(active.info.run_id)
        return [MlflowTrainCallback()]

    def trial_finished(self, number: int, state: str, value: float | None, metrics: dict[str, float]) -> None:
        mlflow.set_tag("trial_state", state)
        if (untold := _end_run(self.heartbeat, TRIAL_RUN_STATUS[state])) is not None:
            raise server_lost(self.run_id, untold, marked=False) from None


def log_study(settings: dict[str, Any], result: StudyResult) -> None:
    """A study into the active (parent) run: its settings, the best trial, the trials table and Optuna's plots.

    A resumed study logs again: the best values are metrics at step = trials so far, so their
    history shows the search improving; the best params are tags and best_params.json, replaced.
    """
    import matplotlib.pyplot as plt

    log_params({k: v for k, v in settings.items() if k != "search_space"})
    mlflow.log_dict(settings.get("search_space", {}), "optuna/search_space.json")
    step = sum(result.counts.values())
    log_metrics(
        {
            "best_val_accuracy": result.best_value,
            "best_trial": result.best_number,
            **{f"trials_{state}": count for state, count in result.counts.items()},
        },
        step=step,
    )
    mlflow.set_tags({f"best.{name}": str(value) for name, value in result.best_params.items()})
    mlflow.log_dict(
        {"trial": result.best_number, "val_accuracy": result.best_value, "params": result.best_params},
        "optuna/best_params.json",
    )
    for name, figure in result.figures.items():
        mlflow.log_figure(figure, f"optuna/{name}.png")
        plt.close(figure)
    log_table(result.trials, "optuna/trials.json")


# ----------------------------------------------------------------- ONNX export helpers

ONNX_MODEL_NAMES = {"fp32": "onnx_model", "int8": "onnx_model_int8"}  # LoggedModel names in a run
ONNX_URI_TAGS = {"fp32": "onnx_model_uri", "int8": "onnx_int8_model_uri"}  # run tags: where they went


def fresh_step(run_id: str) -> int:
    """A step none of the run's metrics has yet: ONNX models and their checks are logged there.

    MLflow links every metric the run has at a model's step to that model when it is logged:
    at step 0 (its default) the first system metrics, at training's last step the torch model's
    figures, at an earlier export's step its parity figures. A fresh step holds none of them,
    and it makes the latest check the run's latest value. Called after training, when nothing
    else is logging into the run.
    """
    client = mlflow.MlflowClient()
    steps = (m.step for key in get_run(run_id).data.metrics for m in client.get_metric_history(run_id, key))
    return max(steps, default=-1) + 1


def log_onnx_model(path: Path, variant: str, input_example: Any, output_example: Any, step: int = 0) -> str:
    """Log an .onnx file with mlflow.onnx (CPU provider, signature, example) as one file; returns its URI.

    The run is tagged with the URI, so `check-parity` and the predictor find the model from the run id.
    """
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    info = mlflow.onnx.log_model(
        onnx.load_model(str(path)),
        name=ONNX_MODEL_NAMES[variant],
        step=step,
        signature=infer_signature(input_example, output_example),
        input_example=input_example,
        onnx_execution_providers=["CPUExecutionProvider"],
        save_as_external_data=False,
        # Given, not inferred: inference would load the model in a subprocess for nothing.
        pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
    )
    mlflow.set_tag(ONNX_URI_TAGS[variant], info.model_uri)
    return info.model_uri


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
    for path in files:
        mlflow.log_artifact(str(path))


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
        for path in files:
            mlflow.log_artifact(str(path))
    return active.info.run_id


def run_onnx_model_uri(run_id: str, variant: str = "fp32") -> str:
    """The URI of the ONNX model `export-onnx` logged to the run (see log_onnx_model)."""
    model_uri = get_run(run_id).data.tags.get(ONNX_URI_TAGS[variant])
    if not model_uri:
        raise PipelineError(
            f"run {run_id} has no logged {variant} ONNX model; run `pipeline export-onnx --run-id {run_id}` "
            "first, or pass --onnx PATH"
        )
    return model_uri
