"""Which tracking store and experiment a command uses, checked before anything is logged.

The project store is MLflow's own default, `sqlite:///mlflow.db` at the project root with
artifacts in mlruns/, and the project's experiment is that store's default one (id 0, renamed
from MLflow's `Default`): so `mlflow run .` with no experiment, `mlflow ui`, `make` and
`pipeline` started from the root with nothing exported all meet in one place.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from sqlalchemy.exc import SQLAlchemyError

from pipeline.config import DEFAULT_EXPERIMENT, EXPERIMENT_ENV, artifact_root, project_store
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")

# The UI's own tag and value for "this experiment trains models" (MLflow has no Python constant
# for it). The UI picks the page an experiment opens on from its GenAI / Model training switch
# (stored per browser) as well: the link ui_links makes sets the switch for that page.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
EXPERIMENT_DESCRIPTION = (
    "Fashion-MNIST classifiers (the DNN and CNN of chapter 5) trained by fashion-pipeline: one run per "
    "`make run` or `pipeline train`, with its evaluation, ONNX export and parity check logged into it. "
    "Runs named `compare ...` hold `pipeline compare`'s table and chart. Registered models: "
    "`pipeline register` and `pipeline promote` (aliases candidate and champion)."
)
MLFLOW_DEFAULT_EXPERIMENT = ("0", "Default")  # the id and name MLflow gives a new store's first experiment
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
LEGACY_STORE = Path("mlruns") / "mlflow.db"  # where the project store was, relative to the root


def default_tracking_uri() -> str:
    return f"sqlite:///{project_store()}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def experiment_name(experiment: str | None = None) -> str:
    """The experiment a command means: --experiment, else $MLFLOW_EXPERIMENT_NAME, else the default."""
    return experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


def adopt_legacy_store() -> Path | None:
    """Move a project store from its old place (mlruns/mlflow.db) to MLflow's default one, once.

    Artifact locations inside the database are absolute, so the runs keep their files. Returns
    the old path when it moved something.
    """
    new = project_store()
    old = new.parent / LEGACY_STORE
    if new.exists() or not old.is_file():
        return None
    os.rename(old, new)  # atomic, on one file system
    # Its Optuna studies go with it (training.default_optuna_storage names them after the database).
    studies = old.parent / "optuna.db"
    if studies.is_file() and not (new.parent / f"{new.stem}-optuna.db").exists():
        os.rename(studies, new.parent / f"{new.stem}-optuna.db")
    log.warning("moved the project's tracking store from %s to %s (MLflow's own default)", old, new)
    return old


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
            f"cannot reach the MLflow tracking server at {uri} ({reason(exc)}); is it running (`make server`)? "
            "Or unset MLFLOW_TRACKING_URI for the local store"
        ) from None
    if answer.status_code == 401:
        refused = " refused the login given" if auth else " asks for a login"
        raise PipelineError(
            f"the MLflow tracking server at {uri}{refused}: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )


def server_failure(exc: BaseException) -> BaseException | None:
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


def reason(exc: BaseException) -> str:
    text = str(exc)
    for needle, why in (
        ("Connection refused", "connection refused"),
        ("RemoteDisconnected", "connection closed"),
        ("Connection aborted", "connection closed"),
        ("Connection reset", "connection reset"),
        ("timed out", "timed out"),
        ("too many 5", "it answers with server errors"),
    ):
        if needle in text:
            return why
    return text.splitlines()[0][:200] if text else type(exc).__name__


def server_lost(run_id: str, failure: BaseException, marked: bool) -> PipelineError:
    state = (
        "it is marked FAILED"
        if marked
        else "it stays RUNNING there, as the server could not be told; once the server is back, "
        "`pipeline runs --stale --mark-failed` closes it"
    )
    return PipelineError(
        f"lost the MLflow tracking server at {tracking_uri()} during run {run_id} ({reason(failure)}); {state}"
    )


_opened: set[tuple[str, bool]] = set()  # (uri, write) checked by open_store in this process
SQLITE_HEADER = b"SQLite format 3\x00"


def connect(write: bool = True) -> str:
    """Point mlflow at the store, checked and initialised once (see open_store); no experiment is created.

    `write=False` is for commands that only read runs, which a read-only store still serves.
    """
    uri = tracking_uri()
    if uri == default_tracking_uri():
        adopt_legacy_store()
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
            _open_with_mlflow(uri, fail, artifact_root(path.resolve()))
    except OSError as exc:
        raise fail(f"{exc.filename or path.parent}: {exc.strerror or exc}") from None


def _open_with_mlflow(uri: str, fail: Callable[[str], PipelineError], artifacts: Path | None = None) -> None:
    """Open the tracking store (which creates and migrates a fresh database) with one cheap query.

    artifacts: for a sqlite store, where a fresh database's default experiment keeps its files;
    MLflow would put them under ./mlruns of whatever directory the command started in.
    """
    try:
        if artifacts is not None:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            SqlAlchemyStore(uri, artifacts.as_uri()).search_experiments(max_results=1)
        else:
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except (mlflow.exceptions.MlflowException, SQLAlchemyError) as exc:
        raise fail(str(exc).strip().splitlines()[0].split(" See https://")[0].rstrip(".")) from None
    except ModuleNotFoundError as exc:  # the database driver SQLAlchemy picks for the URI's scheme
        hint = ""
        if uri.startswith("postgresql://"):
            fixed = uri.replace("postgresql://", "postgresql+psycopg2://", 1)
            hint = f" (the driver installed here is psycopg2: {fixed})"
        raise fail(f"its database driver {exc.name} is not installed{hint}") from None


def _artifact_location(uri: str, name: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its files: under the store's mlruns/, whatever
    the directory the command started in and whatever the name holds (an experiment name is never a path)."""
    path = sqlite_path(uri)
    if path is None:
        return None  # a server decides
    folder = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".-")[:64] or "experiment"
    if folder != name:  # two names that clean to the same folder keep apart
        folder += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return (artifact_root(path.resolve()) / folder).as_uri()


def _take_default_experiment(client: mlflow.MlflowClient, name: str) -> bool:
    """Name the store's default experiment `name` if MLflow left it `Default`: `mlflow run` without
    an experiment, and every entry point of MLproject, log there. Only for the project's experiment."""
    if name != DEFAULT_EXPERIMENT:
        return False
    default_id, default_name = MLFLOW_DEFAULT_EXPERIMENT
    try:
        found = client.get_experiment(default_id)
        if found.name != default_name or found.lifecycle_stage != "active":
            return False
        client.rename_experiment(default_id, name)
    except mlflow.exceptions.MlflowException:
        return False  # no default experiment (a server may have none), or no right to rename it
    return True


def _check_active(found, uri: str) -> None:
    if found.lifecycle_stage == "deleted":
        raise PipelineError(
            f"experiment {found.name!r} is deleted in the tracking store {uri}: restore it with "
            f"`mlflow experiments restore --experiment-id {found.experiment_id}`, or pass another --experiment"
        )


def configure(experiment: str | None = None) -> str:
    """Point mlflow at the project store (or MLFLOW_TRACKING_URI) and pick the experiment."""
    uri = connect()
    client = mlflow.MlflowClient()
    name = experiment_name(experiment)
    if run_id := os.environ.get("MLFLOW_RUN_ID"):  # inside `mlflow run`: its run already has an experiment
        _inside_mlflow_run(client, run_id, name)
        return uri
    found = client.get_experiment_by_name(name)
    if found is not None:
        _check_active(found, uri)
    elif not _take_default_experiment(client, name):
        try:
            client.create_experiment(name, artifact_location=_artifact_location(uri, name))
        except mlflow.exceptions.MlflowException as exc:
            # Another process created it since we looked: theirs is the one we use.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    mlflow.set_experiment(name)
    return uri


def _inside_mlflow_run(client: mlflow.MlflowClient, run_id: str, name: str) -> None:
    """`mlflow run` put the run in an experiment already: the project's, once the default one is renamed."""
    experiment_id = client.get_run(run_id).info.experiment_id
    if experiment_id != MLFLOW_DEFAULT_EXPERIMENT[0]:
        return
    if client.get_experiment_by_name(name) is None:
        _take_default_experiment(client, name)
    elif client.get_experiment(experiment_id).name != name:
        log.warning(
            "this run went to experiment %r, not %r: pass `--experiment-name %s` to `mlflow run`",
            client.get_experiment(experiment_id).name,
            name,
            name,
        )


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
            except mlflow.exceptions.MlflowException as exc:
                if exc.error_code == "PERMISSION_DENIED":
                    return  # another user's experiment on a team server: its owner's tags stand
                # Processes that start at once on a new experiment race to add the same tag, and a
                # SQL store refuses the second insert (a duplicate key); theirs is as good as ours.
                if key not in client.get_experiment(experiment_id).tags:
                    raise


def experiment_id(experiment: str | None = None) -> str | None:
    """The id of the experiment a command means, None if the store has none of that name."""
    found = mlflow.MlflowClient().get_experiment_by_name(experiment_name(experiment))
    return None if found is None else found.experiment_id


def ui_links(experiment: str | None, base_url: str) -> tuple[str | None, str]:
    """The UI's page of the experiment's runs (in the pipeline's view; None if there is no such
    experiment yet) and of the Model Registry. Marks an existing experiment as mark_experiment does."""
    models = f"{base_url}/#/models"
    uri = tracking_uri()
    if uri == default_tracking_uri():
        adopt_legacy_store()
    if (path := sqlite_path(uri)) is not None and not path.is_file():
        return None, models  # no store yet: don't create an empty one just to look
    connect()
    client = mlflow.MlflowClient()
    found_id = experiment_id(experiment)
    if found_id is None and _take_default_experiment(client, experiment_name(experiment)):
        found_id = MLFLOW_DEFAULT_EXPERIMENT[0]
    if found_id is None:
        return None, models
    mark_experiment(found_id)
    # workflowType: the Model training side of the UI's switch, whatever this browser last chose.
    query = f"viewStateShareKey={RUNS_VIEW_KEY}&workflowType=machine_learning"
    return f"{base_url}/#/experiments/{found_id}/runs?{query}", models
