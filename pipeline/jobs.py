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
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.compare import Comparison
    from pipeline.data import DownloadReport
    from pipeline.evaluate import Evaluation
    from pipeline.parity import ParityResult, QuantizedCheckResult
    from pipeline.predict import PredictConfig, PredictSummary
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
class TrainJob:
    run_id: str
    model_uri: str
    metrics: dict[str, float]


def train_model(config: TrainConfig, experiment: str | None = None) -> TrainJob:
    """Train `config.model` in a new MLflow run: params, metrics per step and epoch, the model."""
    from pipeline import tracking
    from pipeline.progress import ProgressBar
    from pipeline.train import fit, setup

    quiet_known_warnings()
    tracking.connect()  # an unusable store fails here, in seconds, before the data is loaded
    # Before the run exists: missing or unknown data, or no CUDA, must not leave an empty FAILED run.
    trainer = setup(config)
    with tracking.run(run_name=config.model, experiment=experiment, tags={"stage": "train"}) as active:
        result = fit(trainer, [tracking.MlflowTrainCallback(), ProgressBar()])
        model_uri = tracking.log_torch_model(result.model, result.example_input, result.params["class_names"])
    return TrainJob(active.info.run_id, model_uri, result.metrics)


# ----------------------------------------------------------------- tune


@dataclass
class TuneJob:
    result: StudyResult
    parent_run_id: str
    retrained: TrainJob | None = None  # --retrain-best: the best settings on the full training set


def tune_model(
    config: TuneConfig,
    experiment: str | None = None,
    retrain_best: bool = False,
    progress: Callable[[str], Any] = lambda message: None,
) -> TuneJob:
    """An Optuna study on the validation split, tracked as one parent run with a nested run per trial.

    The parent run's id is kept in the study, so a resumed study and parallel workers log into
    the same parent. With `retrain_best`, the best trial's settings train on all training images
    in one more nested run, whose test accuracy is the only test figure the search produces.
    """
    from pipeline import tracking, tune
    from pipeline.progress import ProgressBar
    from pipeline.train import fit, setup

    quiet_known_warnings()
    tracking.connect()
    config.storage = config.storage or tracking.default_optuna_storage()
    study = tune.open_study(config)
    parent_id = study.user_attrs.get(tune.PARENT_RUN_ATTR)
    tags = {"stage": tracking.STUDY_STAGE, "study": config.study_name}
    with tracking.run(run_id=parent_id, run_name=f"tune {config.study_name}", experiment=experiment, tags=tags) as run:
        if parent_id is None:
            study.set_user_attr(tune.PARENT_RUN_ATTR, run.info.run_id)
        progress(f"Study {config.study_name!r} in {tune.safe_url(config.storage)}: {len(study.trials)} trials so far.")
        tune.optimize(study, config, [tracking.MlflowTrialObserver(), tune.ProgressLines(progress)])
        result = tune.summarize(study, config)
        tracking.log_study(tune.study_settings(config), result)
        job = TuneJob(result, run.info.run_id)
        if retrain_best:
            progress(f"Retraining trial {result.best_number}'s settings on the full training set.")
            trainer = setup(tune.retrain_config(config, result.best_params))
            run_tags = {"stage": "train", "study": config.study_name, "trial": str(result.best_number)}
            with tracking.child_run(f"{config.model} best of {config.study_name}", tags=run_tags) as child:
                trained = fit(trainer, [tracking.MlflowTrainCallback(), ProgressBar()])
                model_uri = tracking.log_torch_model(
                    trained.model, trained.example_input, trained.params["class_names"]
                )
            job.retrained = TrainJob(child.info.run_id, model_uri, trained.metrics)
            tracking.log_metrics({"retrained_test_accuracy": trained.metrics["test_accuracy"]})
    return job


# ----------------------------------------------------------------- evaluate


@dataclass
class EvaluateJob:
    run_id: str
    evaluation: Evaluation
    artifacts: list[str]  # what was logged besides the metrics, in the order logged


def evaluate_run(run_id: str | None, model_uri: str | None, data_dir: Path, batch_size: int) -> EvaluateJob:
    """Evaluate a run's model (or the run that logged `model_uri`) on the test set, logged into that run."""
    from pipeline import tracking
    from pipeline.data import load_split
    from pipeline.evaluate import CURVE_METRICS, PER_CLASS_TABLE, evaluate, write_report

    quiet_known_warnings()
    tracking.connect()
    run_id = tracking.run_id_for_model(model_uri) if model_uri else tracking.get_run(run_id).info.run_id
    model, class_names = tracking.load_run_model(run_id)
    split = load_split(data_dir, "test")
    result = evaluate(model, split.images, split.labels, class_names, batch_size)
    history = tracking.metric_history(run_id, CURVE_METRICS)
    # Logged at the run's last training step, so these become the run's latest values.
    last_step = int(history["step"].max()) if len(history) else 0
    with tempfile.TemporaryDirectory() as tmp:
        subtitle = f" · {getattr(model, 'registry_name', type(model).__name__)} run {run_id[:8]}"
        written = write_report(result, split.images, history, Path(tmp), subtitle)
        with tracking.run(run_id=run_id):
            tracking.log_evaluation(result.metrics, last_step, result.per_class, PER_CLASS_TABLE, Path(tmp))
    return EvaluateJob(run_id, result, [f"{PER_CLASS_TABLE} (table)", *(path.name for path in written)])


# ----------------------------------------------------------------- compare


def compare_runs(experiment: str | None, run_ids: tuple[str, ...], output_dir: Path) -> tuple[Comparison, list[Path]]:
    """Evaluated runs side by side; the table and chart are written to `output_dir`."""
    from pipeline import tracking
    from pipeline.compare import compare, select_runs, write_outputs
    from pipeline.evaluate import PER_CLASS_CSV

    selected = select_runs(tracking.search_runs(experiment, run_ids), run_ids)
    supports = {}  # test images per class, for the noise margins
    for run_id in selected["run_id"]:
        try:
            table = tracking.read_csv_artifact(run_id, PER_CLASS_CSV)
        except PipelineError:
            continue
        supports[run_id] = dict(zip(table["class_name"], table["support"], strict=True))
    comparison = compare(selected, supports)
    return comparison, write_outputs(comparison, output_dir)


# ----------------------------------------------------------------- predict


@dataclass
class PredictJob:
    summary: PredictSummary
    warning: str | None  # about the model (e.g. no class names in its metadata), for the CLI to show


def predict_batch(model: str, inputs: tuple[str, ...], output: Path | None, config: PredictConfig) -> PredictJob:
    """Batch prediction with onnxruntime over a .onnx file or a logged model URI. Never imports torch."""
    from pipeline.predict import Predictor, is_model_uri, predict

    with tempfile.TemporaryDirectory(prefix="pipeline-predict-") as tmp:
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
    parity: ParityResult
    int8_check: QuantizedCheckResult | None = None

    @property
    def failures(self) -> list[str]:
        found = [] if self.parity.passed else [self.parity.failure_message()]
        if self.int8_check is not None and not self.int8_check.passed:
            found.append(self.int8_check.failure_message())
        return found


def export_run(
    run_id: str, output: str | None, opset: int | None, quantize: str, fold: bool | None, data_dir: Path
) -> ExportJob:
    """Export a run's model to ONNX (and int8), check parity with torch, log all of it into the run.

    A failed check is reported in the result, not raised: the run keeps its status and is
    tagged parity=failed, and the caller decides the exit code.
    """
    from pipeline import export, tracking
    from pipeline.data import load_split
    from pipeline.parity import check_parity, check_quantized

    quiet_known_warnings()
    tracking.connect()
    model, class_names = tracking.load_run_model(run_id)
    model_name = model.registry_name
    target = export.resolve_output(output, model_name) if output else None
    test = load_split(data_dir, "test")
    calibration = export.calibration_sample(load_split(data_dir, "train").images) if quantize == "int8" else None
    example = export.example_input(test.images)
    fold = export.FOLD_BY_DEFAULT if fold is None else fold
    with tempfile.TemporaryDirectory(prefix="export-onnx-") as tmp:
        fp32_path = export.export_onnx(
            model,
            target or Path(tmp) / export.default_output_name(model_name),
            class_names,
            model_name,
            run_id,
            opset,
            fold=fold,
        )
        paths = {"fp32": fp32_path}
        job = ExportJob(
            run_id=run_id,
            model_name=model_name,
            models=[],
            folded_layers=export.read_metadata(fp32_path).get(export.FOLDED_LAYERS_KEY),
            parity=check_parity(model, fp32_path, test.images, test.labels, class_names),
        )
        if quantize == "int8":
            paths["int8"] = export.quantize_int8(fp32_path, export.int8_path_for(fp32_path), calibration)
            job.int8_check = check_quantized(model, paths["int8"], test.images, test.labels, class_names)
        with tracking.run(run_id=run_id):
            for variant, path in paths.items():
                uri = tracking.log_onnx_model(path, variant, example, export.onnx_logits(path, example))
                job.models.append(ExportedModel(variant, uri, path if target else None))
            tracking.log_check(job.parity, "parity.json", "parity")
            if job.int8_check is not None:
                tracking.log_check(job.int8_check, "int8_check.json", "int8_check")
    return job


def check_run_parity(run_id: str, onnx_file: Path | None, data_dir: Path) -> ParityResult:
    """Check an ONNX file (default: the one export-onnx logged) against the run's torch model; logged."""
    from pipeline import tracking
    from pipeline.data import load_split
    from pipeline.parity import check_parity

    quiet_known_warnings()
    tracking.connect()
    model, class_names = tracking.load_run_model(run_id)
    test = load_split(data_dir, "test")
    with tempfile.TemporaryDirectory(prefix="check-parity-") as tmp:
        onnx_path = onnx_file or tracking.download_onnx_model(tracking.run_onnx_model_uri(run_id), Path(tmp))
        result = check_parity(model, onnx_path, test.images, test.labels, class_names)
    with tracking.run(run_id=run_id):
        tracking.log_check(result, "parity.json", "parity")
    return result


# ----------------------------------------------------------------- bench


@dataclass
class BenchJob:
    report: str  # Markdown
    written: list[Path] = field(default_factory=list)
    model_source: str = ""


def run_bench(
    quick: bool,
    run_id: str | None,
    steps: int | None,
    full_job: bool | None,
    output_dir: Path,
    data_dir: Path,
    max_cpu_isa: str = "native",
    progress: Callable[[str], Any] = lambda message: None,
) -> BenchJob:
    """Every benchmark, side by side with its baseline; JSON + Markdown in `output_dir`, logged to 'benchmarks'."""
    if max_cpu_isa == "avx2":
        from pipeline import hardware

        hardware.limit_to_avx2()  # before bench imports torch
    from pipeline import bench, tracking
    from pipeline.files import write_text

    quiet_known_warnings()
    config = bench.BenchConfig(
        quick=quick, data_dir=data_dir, train_steps=steps or 0, full_job=(not quick) if full_job is None else full_job
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
    headline = {k: float(v) for k, v in results["headline"].items() if isinstance(v, (int, float))}
    with tracking.run(experiment="benchmarks", run_name="bench-quick" if quick else "bench", tags={"stage": "bench"}):
        tracking.log_report(bench.config_dict(config), headline, written)
    return BenchJob(report, written, model_source)


def _bench_model(run_id: str | None, config) -> tuple[Any, list[str], str]:
    """The CNN whose inference is benchmarked: a given run, the latest finished one, or one trained here."""
    from pipeline import tracking
    from pipeline.config import CLASS_NAMES
    from pipeline.train import train

    tracking.connect()
    run_id = run_id or tracking.latest_finished_run("cnn")
    if run_id:
        model, names = tracking.load_run_model(run_id)
        return model, names, f"run {run_id}"
    result = train(TrainConfig(model="cnn", max_steps=config.train_steps, data_dir=config.data_dir))
    return result.model, list(CLASS_NAMES), f"a CNN trained here for {config.train_steps} steps (no finished run found)"
