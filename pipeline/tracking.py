"""The MLflow boundary: the only module that imports mlflow.

Stages return values; the CLI hands them to the functions here (or passes the training
callback below). Point MLFLOW_TRACKING_URI elsewhere, e.g. at a temporary sqlite file in
tests or at a remote server, and every stage follows.
"""

from __future__ import annotations

import fcntl
import json
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import RunStatus
from sqlalchemy.exc import SQLAlchemyError

from pipeline.callbacks import TrainCallback, TrialObserver
from pipeline.config import DEFAULT_EXPERIMENT, EXPERIMENT_ENV, project_root
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.train import TrainResult
    from pipeline.tune import StudyResult

CHECKPOINT_ARTIFACT = "checkpoint/model.pt"
# Stage tags of `pipeline tune`'s runs: the study's parent run and each trial's. Both record a
# model name, but neither holds a trained model.
STUDY_STAGE, TRIAL_STAGE = "tune", "tune-trial"
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


_opened: set[tuple[str, bool]] = set()  # (uri, write) checked by open_store in this process
SQLITE_HEADER = b"SQLite format 3\x00"


def connect(write: bool = True) -> str:
    """Point mlflow at the store, checked and initialised once (see open_store); no experiment is created.

    `write=False` is for commands that only read runs, which a read-only store still serves.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if (uri, write) not in _opened:
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
    with _ended_by_outcome():
        yield active


@contextmanager
def child_run(run_name: str, tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A run nested in the active one (a tuning trial's, a retrained model's); ends as `run` does."""
    active = mlflow.start_run(run_name=run_name, nested=True, tags=tags)
    with _ended_by_outcome():
        yield active


@contextmanager
def _ended_by_outcome() -> Iterator[None]:
    """End the active run FINISHED, FAILED (error) or KILLED (Ctrl-C), never RUNNING."""
    try:
        yield
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run()


def get_run(run_id: str) -> Any:
    """The run with this id, or a PipelineError that says where to find run ids."""
    try:
        return mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
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
    connect(write=False)
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
    """Streams a training run into the active MLflow run."""

    def on_train_start(self, params: dict[str, Any]) -> None:
        log_params(params)

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        log_metrics(metrics, step=step)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        log_metrics({**metrics, "epoch": epoch}, step=step)

    def on_train_end(self, result: TrainResult) -> None:
        log_metrics(
            # Evaluation metrics were logged at their epoch's step already.
            {k: v for k, v in result.metrics.items() if not k.startswith(("test_", "val_"))},
            step=result.metrics["steps"],
        )
        mlflow.log_dict(result.params["class_names"], "class_names.json")
        mlflow.log_dict(result.history, "history.json")


# ----------------------------------------------------------------- hyperparameter search (pipeline tune)

# How a trial's state ends its run: a pruned trial ran as asked until the pruner stopped it.
TRIAL_RUN_STATUS = {"complete": "FINISHED", "pruned": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


def default_optuna_storage() -> str:
    """Optuna's sqlite database beside the tracking store's (the project's mlruns/ by default)."""
    path = sqlite_path(tracking_uri())
    folder = path.parent if path else store_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


class MlflowTrialObserver(TrialObserver):
    """One run per trial, nested in the active (study) run: its params, per-epoch metrics and state."""

    def trial_started(self, number: int, params: dict[str, Any]) -> list[TrainCallback]:
        mlflow.start_run(run_name=f"trial-{number}", nested=True, tags={"stage": TRIAL_STAGE, "trial": str(number)})
        return [MlflowTrainCallback()]

    def trial_finished(self, number: int, state: str, value: float | None, metrics: dict[str, float]) -> None:
        mlflow.set_tag("trial_state", state)
        mlflow.end_run(TRIAL_RUN_STATUS[state])


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
