"""The MLflow boundary: the only module that imports mlflow.

Stages return values; the CLI hands them to the functions here (or passes the training
callback below). Point MLFLOW_TRACKING_URI elsewhere, e.g. at a temporary sqlite file in
tests or at a remote server, and every stage follows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_RUN_NOTE

from pipeline.callbacks import TrainCallback
from pipeline.config import DEFAULT_EXPERIMENT, EXPERIMENT_ENV, project_root
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.train import TrainResult

CHECKPOINT_ARTIFACT = "checkpoint/model.pt"
MODEL_NAME = "model"  # the name of the torch model logged with mlflow.pytorch.log_model
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


def connect() -> str:
    """Point mlflow at the store only, for commands that read runs (no experiment is created)."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def configure(experiment: str | None = None) -> str:
    """Point mlflow at the project store (or MLFLOW_TRACKING_URI) and pick the experiment."""
    uri = tracking_uri()
    if uri == default_tracking_uri():
        store_dir().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
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
            client.set_experiment_tag(experiment_id, key, value)


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
    """Start or resume a run; it ends FINISHED, FAILED (error) or KILLED (Ctrl-C), never RUNNING.

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
    active = mlflow.start_run(run_id=run_id, run_name=run_name, tags=tags, log_system_metrics=system_metrics)
    mark_experiment(active.info.experiment_id)
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

    connect()
    registry.check_model_uri(model_uri)  # an unknown name, version or alias gets a hint, not MLflow's error
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
        # `mlflow run` tags the commit itself; `pipeline train` started by hand has only the param.
        commit = str(params.get("git_commit", "")).removesuffix("-dirty")
        run_id = mlflow.active_run().info.run_id
        if len(commit) == 40 and MLFLOW_GIT_COMMIT not in mlflow.get_run(run_id).data.tags:
            mlflow.set_tag(MLFLOW_GIT_COMMIT, commit)

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
