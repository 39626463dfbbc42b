"""One job per CLI command: load what the stage needs, run the stage, log the result to MLflow.

The route of every command is cli -> jobs -> {tracking, stage} and back: the CLI parses
options and prints what a job returns; the stages (train, evaluate, export, parity, compare,
predict) take arrays and models and return values; `tracking` is the only way to MLflow.
A new command is one function here and one thin Click command in cli.py.

Heavy modules (torch, mlflow, onnxruntime) are imported inside the jobs, so importing this
module costs nothing and `predict` never pulls in torch.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import DOWNLOAD_TIMEOUT_S, TrainConfig
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import numpy as np

    from pipeline.compare import Comparison
    from pipeline.data import DownloadReport
    from pipeline.evaluate import Evaluation
    from pipeline.parity import ParityResult, QuantizedCheckResult
    from pipeline.predict import PredictConfig, PredictSummary
    from pipeline.server import ServerConfig, ServerInfo
    from pipeline.tracking.registry import Promotion, Registration
    from pipeline.tune import StudyResult, TuneConfig


def quiet_known_warnings() -> None:
    """Warnings a user can do nothing about, kept out of every training and evaluation step.

    The chapter's Dropout2d on flat features (kept so the CNN prints as in the book) makes
    torch warn on every forward pass. Set here, by the application, not on import of a library.
    """
    warnings.filterwarnings("ignore", message="dropout2d: Received a 2-D input", category=UserWarning)


# ----------------------------------------------------------------- download


def download_data(data_dir: Path, source: str | None, timeout: float) -> DownloadReport:
    from pipeline import data

    return data.download(data_dir, data.default_sources(source, timeout))


# ----------------------------------------------------------------- train


@dataclass
class InProcessModel:
    """A model trained in this process, as `pipeline run` hands it to its next stages: not reloaded
    from the store, and run over the test set once (by training's last evaluation), not once per stage."""

    model: Any  # torch.nn.Module
    class_names: list[str]
    test_logits: Any  # torch.Tensor (test images, classes) on the CPU; None until some stage computes them
    val_logits: Any = None  # the same on the validation split, from training's last evaluation; None without one

    def __post_init__(self) -> None:
        self.model = self.model.cpu()  # where evaluation, export and parity run

    def logits_for(self, images: np.ndarray, batch_size: int) -> Any:
        """The model's test-set logits, computed on first use."""
        from pipeline.evaluate import compute_logits, images_to_tensor

        if self.test_logits is None or len(self.test_logits) != len(images):
            self.test_logits = compute_logits(self.model, images_to_tensor(images), batch_size)
        return self.test_logits


@dataclass
class TrainJob:
    run_id: str
    model_name: str
    model_uri: str
    metrics: dict[str, float]
    reused: bool = False  # `reuse`: an earlier run had trained the same way; nothing was trained
    resumed_from_step: int | None = None
    job_run_id: str | None = None  # the run this job logged into; not run_id when the training was reused
    in_process: InProcessModel | None = field(default=None, repr=False)  # None when reused

    def __post_init__(self) -> None:
        self.job_run_id = self.job_run_id or self.run_id


def run_name(config: TrainConfig, started: float | None = None) -> str:
    """'cnn-5ep-lr0.001-seed0-1129-1835': what was trained, how long, and when, so runs tell apart in the UI."""
    length = f"{config.max_steps}steps" if config.max_steps else f"{config.epochs}ep"
    when = time.strftime("%m%d-%H%M", time.localtime(started))
    return f"{config.model}-{length}-lr{config.lr:g}-seed{config.seed}-{when}"


def _data_split(name: str, data_dir: Path, digests: dict[str, str], rows: int) -> Any:
    from pipeline import tracking
    from pipeline.data import raw_dir

    return tracking.DataSplit(name, raw_dir(data_dir), digests, rows)


def _trained_splits(params: dict[str, Any], data_dir: Path) -> list[Any]:
    """The train and test splits a training run read, from the digests and sizes it logged as params."""
    from pipeline.data import SPLIT_FILES

    return [
        _data_split(split, data_dir, {f: params[f"sha256_{f}"] for f in SPLIT_FILES[split]}, params[f"{split}_size"])
        for split in ("train", "test")
    ]


# Params that say where or how often, not what is trained: they don't stop a train stage's reuse.
NOT_IN_TRAIN_KEY = ("data_dir", "checkpoint_every")


def train_model(config: TrainConfig, experiment: str | None = None, reuse: bool = False) -> TrainJob | None:
    """Train `config.model` in a new MLflow run: params, metrics per step and epoch, checkpoints, the model.

    With `reuse`, a FINISHED run of the experiment that trained with the same params, data
    digests and git commit stands in for this one (`mlflow run . -P reuse=true`).
    Under torchrun only rank 0 records the run; the other ranks train and return None, without
    loading MLflow (seconds of every rank's start).
    """
    from pipeline.distributed import World
    from pipeline.train import fit, setup

    quiet_known_warnings()
    world = World.from_env()
    if world.distributed and reuse:
        # Rank 0 alone could find a run to reuse, and the others would wait for it forever.
        raise PipelineError("--reuse (or PIPELINE_REUSE) is for one process, not for a torchrun job")
    if not world.is_main:
        fit(setup(config))
        return None
    from pipeline import tracking

    tracking.connect()  # an unusable store fails here, in seconds, before the data is loaded
    # Before the run exists: missing or unknown data, or no CUDA, must not leave an empty FAILED run.
    t = setup(config)
    with tracking.run(run_name=run_name(config), experiment=experiment, system_metrics=config.system_metrics) as active:
        key = _train_key(t)
        if earlier := _reused("train", key, reuse, active.run_id):
            model_uri = earlier.tag(tracking.MODEL_URI_TAG) or f"runs:/{earlier.run_id}/{tracking.TORCH_MODEL_NAME}"
            return TrainJob(
                earlier.run_id, config.model, model_uri, dict(earlier.metrics), reused=True, job_run_id=active.run_id
            )
        job = _fit_and_log(t, tracking.MlflowTrainCallback(), active.run_id)
        tracking.mark_stage_done("train", key)
        tracking.finish_stage(active.run_id, "train")
    return job


def resume_training(run_id: str, data_dir: Path | None = None) -> TrainJob:
    """Continue a KILLED, FAILED or stale RUNNING run from its last checkpoint, in the same run.

    The settings are the run's own; on the same machine the result is exactly the one the run
    would have reached uninterrupted. Metrics it had logged past the checkpoint are not logged twice.
    """
    from pipeline import tracking
    from pipeline.config import train_config_from_params
    from pipeline.distributed import World
    from pipeline.train import restore_state, setup

    quiet_known_warnings()
    if World.from_env().distributed:
        raise PipelineError("--resume continues a run in one process; run it without torchrun")
    found = tracking.resumable_run(run_id)
    params = found.params
    t = setup(train_config_from_params(params, **({"data_dir": data_dir} if data_dir else {})))
    digests = {k.removeprefix("sha256_"): v for k, v in t.params.items() if k.startswith("sha256_")}
    check_same_data(run_id, params, digests, t.config.data_dir)
    state = tracking.load_training_state(run_id)
    restore_state(t, state)
    with tracking.run(run_id=run_id):
        job = _fit_and_log(t, tracking.MlflowTrainCallback(tracking.last_logged_steps(run_id)), run_id)
        tracking.mark_stage_done("train", _train_key(t))
        tracking.finish_stage(run_id, "train")
    job.resumed_from_step = state["step"]
    return job


def check_same_data(run_id: str, params: dict[str, str], digests: dict[str, str], data_dir: Path) -> None:
    """Refuse data other than what the run was trained and tested on, by the digests it logged as
    params: figures of other data would be logged into the run as its own. Runs that logged none pass."""
    changed = [name for name, digest in digests.items() if params.get(f"sha256_{name}", digest) != digest]
    if changed:
        raise PipelineError(
            f"the data in {data_dir} is not what run {run_id} was trained on ({', '.join(changed)} "
            "differ); give --data-dir with that data"
        )


def _train_key(t) -> str | None:
    from pipeline import tracking

    return tracking.stage_key("train", {k: v for k, v in t.params.items() if k not in NOT_IN_TRAIN_KEY})


def _reused(stage: str, key: str | None, reuse: bool, job_run_id: str | None, run_id: str | None = None):
    """With `reuse`, the FINISHED run whose `stage` outputs for `key` stand in for running the stage
    again (`run_id` itself, or the newest in the experiment); the job's run points to it. Else None."""
    from pipeline import tracking

    return tracking.reuse_stage(stage, key, job_run_id, run_id) if reuse else None


def _run_model(run_id: str, in_process: InProcessModel | None, test_images: np.ndarray, batch_size: int):
    """The run's model, class names and test-set logits: from this process's training when it has
    them (logits computed once for every stage), else loaded from the store (logits None)."""
    from pipeline import tracking

    if in_process is None:
        return (*tracking.load_run_model(run_id), None)
    return in_process.model, in_process.class_names, in_process.logits_for(test_images, batch_size)


def _fit_and_log(t, callback, run_id: str) -> TrainJob:
    """Train from wherever `t` stands, then log the model into the active run."""
    from pipeline import tracking
    from pipeline.progress import ProgressBar
    from pipeline.train import fit

    result = fit(t, [callback, ProgressBar()])
    tracking.log_datasets(_trained_splits(result.params, t.config.data_dir))
    model_uri = tracking.log_torch_model(
        result.model, result.example_input, result.params["class_names"], step=int(result.metrics["steps"])
    )
    trained = InProcessModel(result.model, list(result.params["class_names"]), result.test_logits, result.val_logits)
    return TrainJob(run_id, result.params["model"], model_uri, result.metrics, in_process=trained)


def train_distributed(config: TrainConfig, nproc: int, experiment: str | None = None) -> list[str]:
    """`pipeline train` on `nproc` local processes through torchrun; returns the command it ran.

    The ranks print to this terminal (rank 0 its run id); a failed rank fails the whole job.
    """
    import os
    import subprocess

    from pipeline.distributed import World, check_launch, torchrun_command

    if World.from_env().distributed:
        raise PipelineError("--nproc is for starting torchrun; this process already is one of its ranks")
    check_launch(config, nproc)
    command = torchrun_command(config, nproc, experiment)
    env = dict(os.environ)
    # torchrun would set 1 thread per rank (with a warning); share the cores between the ranks instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    returncode = subprocess.run(command, env=env).returncode
    if returncode != 0:
        raise PipelineError(
            f"distributed training failed: torchrun exited with {returncode}; the failing rank's error is above"
        )
    return command


# ----------------------------------------------------------------- runs


@dataclass
class RunsJob:
    runs: list  # tracking.RunRow, newest first
    marked_failed: list[str] = field(default_factory=list)


def list_runs(experiment: str | None, stale: bool, stale_after: float, mark_failed: bool) -> RunsJob:
    """The store's runs; with `stale`, only those left RUNNING by a dead process, closed as FAILED on request."""
    from pipeline import tracking

    rows = tracking.list_runs(experiment, running_only=stale, stale_after=stale_after, write=mark_failed)
    if not stale:
        return RunsJob(rows)
    rows = [row for row in rows if row.stale]
    job = RunsJob(rows)
    if mark_failed:
        for row in rows:
            tracking.mark_failed(row.run_id, row.stale)
            job.marked_failed.append(row.run_id)
    return job


# ----------------------------------------------------------------- tune


@dataclass
class TuneJob:
    result: StudyResult
    parent_run_id: str
    retrained: TrainJob | None = None  # --retrain-best: the best settings on the full training set
    exported: ExportJob | None = None  # ... exported to ONNX with its parity check
    registration: Registration | None = None  # ... registered as the candidate once parity passed


def tune_model(
    config: TuneConfig,
    experiment: str | None = None,
    retrain_best: bool = False,
    progress: Callable[[str], Any] = lambda message: None,
) -> TuneJob:
    """An Optuna study on the validation split, tracked as one parent run with a nested run per trial.

    The parent run's id is kept in the study, so a resumed study and parallel workers log into
    the same parent. With `retrain_best`, the best trial's settings train on all training images
    in one more nested run, whose test accuracy is the only test figure the search produces;
    that model is then exported (parity checked) and registered as the candidate.
    """
    from pipeline import tracking, tune
    from pipeline.train import setup

    quiet_known_warnings()
    tracking.connect()
    tune.check_data(config)  # before the study and its parent run exist: a refusal leaves neither behind
    config.storage = config.storage or tracking.default_optuna_storage()
    study = tune.open_study(config)
    run_name = f"tune {config.study_name}"
    parent_id = study.user_attrs.get(tune.PARENT_RUN_ATTR)
    if parent_id is None:
        parent_id = tracking.claim_study_run(config.study_name, run_name, experiment)
        study.set_user_attr(tune.PARENT_RUN_ATTR, parent_id)
    tags = {tracking.STAGE_TAG: tracking.STUDY_STAGE, "study": config.study_name}
    with tracking.run(run_id=parent_id, run_name=run_name, experiment=experiment, tags=tags) as run:
        progress(f"Study {config.study_name!r} in {tune.safe_url(config.storage)}: {len(study.trials)} trials so far.")
        tune.optimize(study, config, [tracking.MlflowTrialObserver(), tune.ProgressLines(progress)])
        result = tune.summarize(study, config)
        tracking.log_study(tune.study_settings(config), result)
        job = TuneJob(result, run.run_id)
        if retrain_best:
            progress(f"Retraining trial {result.best_number}'s settings on the full training set.")
            trainer = setup(tune.retrain_config(config, result.best_params))
            run_tags = {tracking.STAGE_TAG: "train", "study": config.study_name, "trial": str(result.best_number)}
            with tracking.child_run(f"{config.model} best of {config.study_name}", tags=run_tags) as child:
                job.retrained = _fit_and_log(trainer, tracking.MlflowTrainCallback(), child.run_id)
            tracking.log_metrics({"retrained_test_accuracy": job.retrained.metrics["test_accuracy"]})
    if job.retrained is not None:
        # After the study's run has closed: export and register open the retrained run themselves.
        job.exported = export_run(job.retrained.run_id, None, None, "none", None, config.data_dir)
        if not job.exported.failures:
            job.registration = register_run(job.retrained.run_id)
    return job


# ----------------------------------------------------------------- evaluate


@dataclass
class EvaluateJob:
    run_id: str
    evaluation: Evaluation | None  # None when reused
    artifacts: list[str]  # what was logged besides the metrics, in the order logged
    reused: bool = False


def evaluate_run(
    run_id: str | None,
    model_uri: str | None,
    data_dir: Path,
    batch_size: int,
    reuse: bool = False,
    in_process: InProcessModel | None = None,
    explain: bool = True,
) -> EvaluateJob:
    """Evaluate a run's model (or the run that logged `model_uri`) on the test set, logged into that run.

    Besides the per-class table: ranking metrics, calibration (a temperature fitted on the run's
    validation split, logged as the param `temperature`), and with `explain` the filters, feature
    maps and Grad-CAM figures. A figure that cannot be drawn fails the stage and the run (FAILED)
    before anything is logged.
    With `reuse`, an evaluation the run already has (same batch size, test data and git commit) stands.
    `in_process`: the run's model as this process trained it, used instead of loading it from the store.
    """
    from pipeline import tracking
    from pipeline.data import load_split
    from pipeline.evaluate import (
        CURVE_METRICS,
        PER_CLASS_TABLE,
        check_fits,
        evaluate,
        explain_evaluation,
        write_report,
    )

    quiet_known_warnings()
    tracking.connect()
    job_run = run_id
    run_id = tracking.run_id_for_model(model_uri) if model_uri else tracking.model_run(run_id)
    split = load_split(data_dir, "test")
    params = tracking.get_run(run_id).params
    settings = {"run_id": run_id, "batch_size": batch_size, **split.digests}
    if not explain:
        settings["explain"] = False  # keys of evaluations with explanations stay as they were
    key = tracking.stage_key("evaluate", settings)
    if _reused("evaluate", key, reuse, job_run or run_id, run_id):
        return EvaluateJob(run_id, None, [], reused=True)
    model, class_names, logits = _run_model(run_id, in_process, split.images, batch_size)
    check_fits(model, split.images, split.labels, class_names)  # the most specific refusal first: image size
    check_same_data(run_id, params, split.digests, data_dir)
    # A model's temperature is fitted once: evaluating it again uses the one it holds.
    known = _known_temperature(run_id, params)
    result = evaluate(
        model,
        split.images,
        split.labels,
        class_names,
        batch_size,
        logits=logits,
        validation=None if known else _validation(run_id, params, data_dir),
        val_logits=None if in_process is None else in_process.val_logits,
        temperature=known,
    )
    if explain:
        result.explanations = explain_evaluation(model, split.images, result)
    history = tracking.metric_history(run_id, CURVE_METRICS)
    # Logged at the run's last training step, so these become the run's latest values.
    last_step = int(history["step"].max()) if len(history) else 0
    with tempfile.TemporaryDirectory() as tmp:
        subtitle = f" · {getattr(model, 'registry_name', type(model).__name__)} run {run_id[:8]}"
        test = _data_split("test", data_dir, split.digests, len(split.labels))
        with tracking.run(run_id=run_id):
            # Inside the run, so a figure that cannot be drawn ends it FAILED; nothing is logged before.
            written = write_report(result, split.images, history, Path(tmp), subtitle)
            if result.temperature is not None and known is None:
                tracking.log_temperature(model, class_names, result.temperature, result.validation_images)
            tracking.log_evaluation(result.metrics, last_step, result.per_class, PER_CLASS_TABLE, Path(tmp), test)
            tracking.mark_stage_done("evaluate", key)
        tracking.finish_stage(run_id, "evaluate")
    names = [path.relative_to(tmp).as_posix() for path in written]
    return EvaluateJob(run_id, result, [f"{PER_CLASS_TABLE} (table)", *names])


def _known_temperature(run_id: str, params: dict[str, str]) -> tuple[float, int] | None:
    """(temperature, validation images it was fitted on) when an earlier evaluation fitted one, else None."""
    from pipeline import tracking
    from pipeline.onnx_contract import parse_temperature

    value = params.get(tracking.TEMPERATURE_PARAM)
    if value is None:
        return None
    return parse_temperature(value, f"run {run_id}"), int(params.get("temperature_fit_images") or 0)


def _validation(run_id: str, params: dict[str, str], data_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The run's validation split (the LAST val_size images of the training file), or None without one."""
    from pipeline.data import load_split

    val_size = int(params.get("val_size") or 0)
    if not val_size:
        return None
    train = load_split(data_dir, "train")
    check_same_data(run_id, params, train.digests, data_dir)
    return train.images[-val_size:], train.labels[-val_size:]


# ----------------------------------------------------------------- compare


@dataclass
class CompareJob:
    comparison: Comparison
    written: list[Path]
    run_id: str  # the comparison run that holds the table and chart in MLflow


def compare_runs(experiment: str | None, run_ids: tuple[str, ...], output_dir: Path) -> CompareJob:
    """Evaluated runs side by side; the table and chart go to `output_dir` and to a comparison run in MLflow."""
    from pipeline import tracking
    from pipeline.compare import compare, overall_metrics, runs_frame, select_runs, write_outputs
    from pipeline.config import slug
    from pipeline.evaluate import PER_CLASS_CSV

    selected = select_runs(runs_frame(tracking.search_runs(experiment, run_ids)), run_ids)
    supports = {}  # test images per class, for the noise margins
    for run_id in selected["run_id"]:
        try:
            table = tracking.read_csv_artifact(run_id, PER_CLASS_CSV)
        except PipelineError:
            continue
        supports[run_id] = dict(zip(table["class_name"], table["support"], strict=True))
    comparison = compare(selected, supports)
    written = write_outputs(comparison, output_dir)
    labels, runs = comparison.labels, comparison.runs
    run_id = tracking.log_comparison(
        experiment_id=str(runs.iloc[0]["experiment_id"]),  # the baseline's
        run_name="compare " + " vs ".join(labels),
        description="\n\n".join(comparison.verdicts) or "Only one run: evaluate a run of another model to compare.",
        params={f"run_{slug(label)}": run for label, run in zip(labels, runs["run_id"], strict=True)},
        metrics=overall_metrics(comparison),
        table=comparison.table.reset_index(),
        files=written,
    )
    return CompareJob(comparison, written, run_id)


# ----------------------------------------------------------------- predict


@dataclass
class PredictJob:
    summary: PredictSummary
    warning: str | None  # about the model (e.g. no class names in its metadata), for the CLI to show


def predict_batch(model: str, inputs: tuple[str, ...], output: Path | None, config: PredictConfig) -> PredictJob:
    """Batch prediction with onnxruntime over a .onnx file or a logged model URI. Never imports torch."""
    from pipeline.files import temporary_folder
    from pipeline.predict import Predictor, is_model_uri, predict

    with temporary_folder("pipeline-predict") as tmp:
        model_path: str | Path = model
        if is_model_uri(model):
            from pipeline import tracking

            model_path = tracking.download_onnx_model(model, Path(tmp))
        predictor = Predictor(model_path)
        summary = predict(predictor, inputs, output, config)
    return PredictJob(summary, predictor.metadata_warning)


# ----------------------------------------------------------------- export-onnx / check-parity


@dataclass
class ExportedModel:
    variant: str  # fp32 or int8
    model_uri: str
    path: Path | None  # where --output wrote it; None when it went to MLflow only


@dataclass
class ExportJob:
    run_id: str
    model_name: str
    models: list[ExportedModel]
    folded_layers: str | None
    parity: ParityResult | None  # None when reused (it had passed)
    int8_check: QuantizedCheckResult | None = None
    reused: bool = False

    @property
    def int8_note(self) -> str | None:
        """Why an int8 model won't be faster on this CPU, if it won't: said, not hidden in a benchmark."""
        from pipeline import hardware

        if self.int8_check is None or hardware.cpu_features().vnni:
            return None
        return (
            "this CPU has no VNNI or AMX: the int8 model will not run faster than fp32 here (it is smaller, "
            "and faster on CPUs that have them)"
        )

    @property
    def failures(self) -> list[str]:
        found = [] if self.parity is None or self.parity.passed else [self.parity.failure_message()]
        if self.int8_check is not None and not self.int8_check.passed:
            found.append(self.int8_check.failure_message())
        return found


def export_run(
    run_id: str,
    output: str | None,
    opset: int | None,
    quantize: str,
    fold: bool | None,
    data_dir: Path,
    reuse: bool = False,
    in_process: InProcessModel | None = None,
) -> ExportJob:
    """Export a run's model to ONNX (and int8), check parity with torch, log all of it into the run.

    A failed check is reported in the result, not raised: the run keeps its status and is
    tagged parity=failed, and the caller decides the exit code. With `reuse` (and no --output),
    an export the run already has, with the same settings and a passed check, stands.
    `in_process`: the run's model as this process trained it, used instead of loading it from the store.
    """
    from pipeline import export, files, tracking
    from pipeline.data import load_split
    from pipeline.parity import check_parity, check_quantized
    from pipeline.predict.convert import png_bytes

    quiet_known_warnings()
    tracking.connect()
    job_run, run_id = run_id, tracking.model_run(run_id)
    fold = export.FOLD_BY_DEFAULT if fold is None else fold
    from pipeline.onnx_contract import parse_temperature

    test = load_split(data_dir, "test")
    params = tracking.get_run(run_id).params
    check_same_data(run_id, params, test.digests, data_dir)
    # The calibration `pipeline evaluate` fitted, if it did: into the ONNX metadata, for the predictor.
    temperature = params.get(tracking.TEMPERATURE_PARAM)
    temperature = None if temperature is None else parse_temperature(temperature, f"run {run_id}")
    settings = {"run_id": run_id, "opset": opset, "quantize": quantize, "fold": fold, **test.digests}
    if temperature is not None:
        settings["temperature"] = temperature  # keys of exports without one stay as they were
    key = tracking.stage_key("export", settings)
    if earlier := _reused("export", key, reuse and not output, job_run, run_id):
        variants = ["fp32", "int8"] if quantize == "int8" else ["fp32"]
        models = [ExportedModel(variant, earlier.tags[tracking.ONNX_URI_TAGS[variant]], None) for variant in variants]
        if earlier.tags.get(tracking.IMAGE_URI_TAG):  # runs exported before the image model existed have none
            models.append(ExportedModel("images", earlier.tags[tracking.IMAGE_URI_TAG], None))
        return ExportJob(run_id, earlier.params.get("model", ""), models, None, None, reused=True)
    model, class_names, logits = _run_model(run_id, in_process, test.images, TrainConfig.eval_batch_size)
    torch_test_logits = None if logits is None else logits.numpy()
    model_name = model.registry_name
    target = export.resolve_output(output, model_name) if output else None
    calibration = export.calibration_sample(load_split(data_dir, "train").images) if quantize == "int8" else None
    example = export.example_input(test.images)
    with files.temporary_folder("export-onnx") as tmp:
        fp32_path = export.export_onnx(
            model,
            target or Path(tmp) / export.default_output_name(model_name),
            class_names,
            model_name,
            run_id,
            opset,
            fold=fold,
            temperature=temperature,
        )
        paths = {"fp32": fp32_path}
        job = ExportJob(
            run_id=run_id,
            model_name=model_name,
            models=[],
            folded_layers=export.read_metadata(fp32_path).get(export.FOLDED_LAYERS_KEY),
            parity=check_parity(
                model, fp32_path, test.images, test.labels, class_names, torch_test_logits=torch_test_logits
            ),
        )
        if quantize == "int8":
            paths["int8"] = export.quantize_int8(fp32_path, export.int8_path_for(fp32_path), calibration)
            job.int8_check = check_quantized(
                model, paths["int8"], test.images, test.labels, class_names, torch_test_logits=torch_test_logits
            )
        step = tracking.fresh_step(run_id)
        with tracking.run(run_id=run_id):
            for variant, path in paths.items():
                uri = tracking.log_onnx_model(path, variant, example, export.onnx_logits(path, example), step)
                job.models.append(ExportedModel(variant, uri, path if target else None))
            # The model that serves photos (the conversion + onnxruntime over the fp32 file), torch-free.
            photo = png_bytes(test.images[0])
            job.models.append(ExportedModel("images", tracking.log_image_model(paths["fp32"], photo, step), None))
            uris = {m.variant: m.model_uri for m in job.models}
            tracking.log_check(job.parity, "parity.json", "parity", uris["fp32"], step)
            if job.int8_check is not None:
                tracking.log_check(job.int8_check, "int8_check.json", "int8_check", uris["int8"], step)
            if not job.failures:
                tracking.mark_stage_done("export", key)
        tracking.finish_stage(run_id, "export-onnx")
    return job


def check_run_parity(run_id: str, onnx_file: Path | None, data_dir: Path) -> ParityResult:
    """Check an ONNX file (default: the one export-onnx logged) against the run's torch model; logged."""
    from pipeline import tracking
    from pipeline.data import load_split
    from pipeline.parity import check_parity

    quiet_known_warnings()
    tracking.connect()
    test = load_split(data_dir, "test")
    check_same_data(run_id, tracking.get_run(run_id).params, test.digests, data_dir)
    model, class_names = tracking.load_run_model(run_id)
    logged_uri = None if onnx_file else tracking.run_onnx_model_uri(run_id)
    with tempfile.TemporaryDirectory(prefix="check-parity-") as tmp:
        onnx_path = onnx_file or tracking.download_onnx_model(logged_uri, Path(tmp))
        result = check_parity(model, onnx_path, test.images, test.labels, class_names)
    with tracking.run(run_id=run_id):
        tracking.log_check(result, "parity.json", "parity", logged_uri, tracking.fresh_step(run_id))
    tracking.finish_stage(run_id, "check-parity")
    return result


# ----------------------------------------------------------------- register / promote / ui-url


def register_run(run_id: str, name: str | None = None) -> Registration:
    """The run's ONNX model (and PyTorch twin) in the Model Registry, aliased candidate."""
    from pipeline.tracking import registry

    return registry.register_run(run_id, name)


def promote_model(name: str, version: str | None = None, force: bool = False) -> Promotion:
    """Move the champion alias: to `version`, or to the candidate if it beats the champion by more than noise."""
    from pipeline.tracking import registry

    return registry.promote(name, version, force)


@dataclass
class UiLinks:
    experiment: str
    runs: str | None  # None: the experiment does not exist yet
    models: str


def ui_links(experiment: str | None, host: str, port: int) -> UiLinks:
    """Where `mlflow ui` shows the experiment's runs (with the pipeline's columns) and the registry."""
    from pipeline import tracking

    return UiLinks(tracking.experiment_name(experiment), *tracking.ui_links(experiment, f"http://{host}:{port}"))


# ----------------------------------------------------------------- server


def start_tracking_server(config: ServerConfig) -> ServerInfo:
    """`mlflow server` in the background over sqlite or the folder's own PostgreSQL; waits until it answers."""
    from pipeline.server import start_server

    return start_server(config)


def stop_tracking_server(folder: Path) -> list[str]:
    """Stop the folder's server and its PostgreSQL; what was stopped, for the CLI to list."""
    from pipeline.server import stop_server

    return stop_server(folder)


# ----------------------------------------------------------------- bench


@dataclass
class BenchJob:
    report: str  # Markdown
    written: list[Path] = field(default_factory=list)
    model_source: str = ""
    docs_page: Path | None = None  # the Markdown page whose bench block was rewritten


def run_bench(
    quick: bool,
    run_id: str | None,
    steps: int | None,
    full_job: bool | None,
    output_dir: Path,
    data_dir: Path,
    max_cpu_isa: str = "native",
    recipe_seeds: int | None = None,
    progress: Callable[[str], Any] = lambda message: None,
    timing_s: float = 0.0,
    docs_page: Path | None = None,
) -> BenchJob:
    """Every benchmark, side by side with its baseline; JSON + Markdown in `output_dir`, logged to 'benchmarks'.

    With `docs_page`, the report's tables also replace their block of that Markdown page (see bench/docs.py),
    which is checked first, so a page without the block's markers fails before minutes of measuring.
    """
    if max_cpu_isa == "avx2":
        from pipeline import hardware

        hardware.limit_to_avx2()  # before bench imports torch
    from pipeline import bench, tracking
    from pipeline.bench import docs

    if docs_page is not None:
        docs.check_page(docs_page, docs.block_name(max_cpu_isa))
    from pipeline.files import write_text

    quiet_known_warnings()
    config = bench.BenchConfig(
        quick=quick,
        data_dir=data_dir,
        train_steps=steps or 0,
        full_job=(not quick) if full_job is None else full_job,
        recipe_seeds=-1 if recipe_seeds is None else recipe_seeds,
        timing_s=timing_s,
    )
    model, class_names, model_source = _bench_model(run_id, config)
    progress(f"Benchmarking inference on {model_source}.")
    with tempfile.TemporaryDirectory() as tmp:
        results = bench.run_benchmarks(config, model, class_names, Path(tmp), progress=lambda m: progress(f"- {m}"))
    results["model_source"] = model_source
    report = bench.render_markdown(results)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / "bench.json", output_dir / "bench.md"]
    bench.save_json(results, written[0])
    write_text(written[1], report)
    if docs_page is not None:
        docs.write_block(docs_page, docs.block_name(max_cpu_isa), docs.render_block(results))
    headline = {k: float(v) for k, v in results["headline"].items() if isinstance(v, (int, float))}
    with tracking.run(experiment="benchmarks", run_name="bench-quick" if quick else "bench", tags={"stage": "bench"}):
        tracking.log_report(bench.config_dict(config), headline, written)
    return BenchJob(report, written, model_source, docs_page)


def _bench_model(run_id: str | None, config) -> tuple[Any, list[str], str]:
    """The CNN whose inference is benchmarked: a given run, the latest finished one, or (None) the
    one the training measurement trains."""
    from pipeline import tracking
    from pipeline.config import CLASS_NAMES

    tracking.connect()
    run_id = run_id or tracking.latest_finished_run("cnn")
    if run_id:
        model, names = tracking.load_run_model(run_id)
        return model, names, f"run {run_id}"
    trained_here = f"the CNN the training measurement trains for {config.train_steps} steps (no finished run found)"
    return None, list(CLASS_NAMES), trained_here


# ----------------------------------------------------------------- the whole job in one process

# What `run_pipeline` hands its `report` callback after each stage, in order.
PIPELINE_STAGES = ("download", "train", "evaluate", "export-onnx", "register")


@dataclass
class PipelineJob:
    run_id: str  # the job's run: every stage logged into it (or, reused, pointed from it)
    stages: dict[str, Any]  # stage -> that stage's job result, in PIPELINE_STAGES order


def run_pipeline(
    config: TrainConfig,
    experiment: str | None = None,
    quantize: str = "none",
    reuse: bool = False,
    register: bool = False,
    report: Callable[[str, Any], Any] = lambda stage, result: None,
    explain: bool = True,
) -> PipelineJob:
    """download -> train -> evaluate -> export-onnx + parity (-> register), in ONE process and one run.

    The same jobs as the separate commands, so the run looks the same in MLflow; but torch and
    MLflow are imported once instead of once per stage (seconds each). `report` gets each stage's
    result as soon as it is done (download's is None with --allow-other-data: the data is used
    as it is). A failed parity check stops before `register`.
    """
    from pipeline.distributed import World

    if World.from_env().distributed:
        raise PipelineError("pipeline run is one process; under torchrun, run `pipeline train` (or train --nproc)")
    stages: dict[str, Any] = {}

    def done(stage: str, result: Any) -> Any:
        stages[stage] = result
        report(stage, result)
        return result

    # Other data on purpose: download would replace its files with Fashion-MNIST's.
    done("download", None if config.allow_other_data else download_data(config.data_dir, None, DOWNLOAD_TIMEOUT_S))
    trained = done("train", train_model(config, experiment, reuse))
    run_id, in_process = trained.job_run_id, trained.in_process
    done("evaluate", evaluate_run(run_id, None, config.data_dir, config.eval_batch_size, reuse, in_process, explain))
    exported = done("export-onnx", export_run(run_id, None, None, quantize, None, config.data_dir, reuse, in_process))
    if register and not exported.failures:
        done("register", register_run(run_id))
    return PipelineJob(run_id, stages)
