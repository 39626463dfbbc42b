"""The MLflow boundary: the only module that imports mlflow.

Stages return values; the CLI hands them to the functions here (or passes the training
callback below). Point MLFLOW_TRACKING_URI elsewhere, e.g. at a temporary sqlite file in
tests or at a remote server, and every stage follows.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from collections.abc import Iterable, Iterator
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


def connect() -> str:
    """Point mlflow at the store only, for commands that read runs (no experiment is created)."""
    uri = tracking_uri()
    prepare_server(uri)
    mlflow.set_tracking_uri(uri)
    return uri


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
    state = "it is marked FAILED" if marked else "it stays RUNNING there, as the server could not be told"
    return PipelineError(
        f"lost the MLflow tracking server at {tracking_uri()} during run {run_id} ({_reason(failure)}); {state}"
    )


def configure(experiment: str | None = None) -> str:
    """Point mlflow at the project store (or MLFLOW_TRACKING_URI) and pick the experiment."""
    uri = tracking_uri()
    if uri == default_tracking_uri():
        store_dir().mkdir(parents=True, exist_ok=True)
    connect()
    if os.environ.get("MLFLOW_RUN_ID"):  # inside `mlflow run`: its run already has an experiment
        return uri
    name = experiment_name(experiment)
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
        # start_run refuses to resume a run outside the active experiment, so follow the run.
        mlflow.set_experiment(experiment_id=get_run(run_id).info.experiment_id)
    active = mlflow.start_run(run_id=run_id, run_name=run_name, tags=tags)
    try:
        yield active
    except BaseException as exc:
        status = RunStatus.KILLED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED
        lost = _server_failure(exc)
        try:
            mlflow.end_run(RunStatus.to_string(status))
        except mlflow.exceptions.MlflowException as end_exc:
            if lost is None and _server_failure(end_exc) is None:
                raise
            raise server_lost(active.info.run_id, lost or end_exc, marked=False) from None
        if lost is not None:
            raise server_lost(active.info.run_id, lost, marked=True) from None
        raise
    else:
        try:
            mlflow.end_run()
        except mlflow.exceptions.MlflowException as exc:
            if _server_failure(exc) is None:
                raise
            raise server_lost(active.info.run_id, exc, marked=False) from None


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


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Numbers from numpy and torch as plain floats, which every store backend accepts."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_torch_model(model: Any, example: Any, class_names: list[str]) -> str:
    """Log the model with mlflow.pytorch (signature + example) and a plain checkpoint.

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
        signature=infer_signature(example, logits),
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(CHECKPOINT_ARTIFACT).name
        save_checkpoint(model, path, class_names)
        mlflow.log_artifact(str(path), str(Path(CHECKPOINT_ARTIFACT).parent))
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
    connect()
    try:
        with quiet_downloads():
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        raise PipelineError(
            f"cannot fetch model {model_uri!r} from the tracking store {tracking_uri()}: {str(exc).splitlines()[0]}"
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
    import warnings

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


def log_evaluation(metrics: dict[str, float], step: int, per_class: Any, table_file: str, folder: Path) -> None:
    """An evaluation into the active run: metrics at `step`, the per-class table, and `folder`'s files."""
    log_metrics(metrics, step=step)
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
    connect()
    if mlflow.get_experiment_by_name(experiment_name(experiment)) is None:
        return None
    found = mlflow.search_runs(
        experiment_names=[experiment_name(experiment)],
        filter_string=f"params.model = '{model_name}' AND attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return None if found.empty else str(found.iloc[0]["run_id"])


def search_runs(experiment: str | None = None, run_ids: Iterable[str] = ()) -> Any:
    """mlflow.search_runs as pandas: the given runs (any experiment), else all of `experiment`."""
    connect()
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
        mlflow.log_dict(result.params["class_names"], "class_names.json")
        mlflow.log_dict(result.history, "history.json")


# ----------------------------------------------------------------- ONNX export helpers

ONNX_MODEL_NAMES = {"fp32": "onnx_model", "int8": "onnx_model_int8"}  # LoggedModel names in a run
ONNX_URI_TAGS = {"fp32": "onnx_model_uri", "int8": "onnx_int8_model_uri"}  # run tags: where they went


def log_onnx_model(path: Path, variant: str, input_example: Any, output_example: Any) -> str:
    """Log an .onnx file with mlflow.onnx (CPU provider, signature, example) as one file; returns its URI.

    The run is tagged with the URI, so `check-parity` and the predictor find the model from the run id.
    """
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    info = mlflow.onnx.log_model(
        onnx.load_model(str(path)),
        name=ONNX_MODEL_NAMES[variant],
        signature=infer_signature(input_example, output_example),
        input_example=input_example,
        onnx_execution_providers=["CPUExecutionProvider"],
        save_as_external_data=False,
        # Given, not inferred: inference would load the model in a subprocess for nothing.
        pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
    )
    mlflow.set_tag(ONNX_URI_TAGS[variant], info.model_uri)
    return info.model_uri


def log_check(result: Any, artifact_file: str, tag: str) -> None:
    """A parity or int8 check into the active run: its metrics, its full report, and a passed/failed tag."""
    log_metrics(result.metrics())
    mlflow.log_dict(result.to_dict(), artifact_file)
    mlflow.set_tag(tag, "passed" if result.passed else "failed")


def log_report(params: dict[str, Any], metrics: dict[str, float], files: Iterable[Path]) -> None:
    """A benchmark's settings, headline figures and report files into the active run."""
    log_params(params)
    log_metrics(metrics)
    for path in files:
        mlflow.log_artifact(str(path))


def run_onnx_model_uri(run_id: str, variant: str = "fp32") -> str:
    """The URI of the ONNX model `export-onnx` logged to the run (see log_onnx_model)."""
    model_uri = get_run(run_id).data.tags.get(ONNX_URI_TAGS[variant])
    if not model_uri:
        raise PipelineError(
            f"run {run_id} has no logged {variant} ONNX model; run `pipeline export-onnx --run-id {run_id}` "
            "first, or pass --onnx PATH"
        )
    return model_uri
