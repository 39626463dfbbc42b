"""`pipeline`: one thin command per stage.

Each command parses options, calls one library function, and reports. Heavy imports
(torch, mlflow, onnxruntime) happen inside the commands so `pipeline --help` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.config import DATA_DIR_ENV, default_data_dir
from pipeline.errors import PipelineError


class PipelineGroup(click.Group):
    """Turns user mistakes into a one-line error and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            sys.exit(130)


# ----------------------------------------------------------------- shared options

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_data_dir,
    show_default=f"data/ at the project root, or ${DATA_DIR_ENV}",
    envvar=DATA_DIR_ENV,
    help="Where Fashion-MNIST lives (torchvision layout: DIR/FashionMNIST/raw/).",
)


def run_id_option(required_help: str):
    return click.option(
        "--run-id",
        envvar="MLFLOW_RUN_ID",
        show_envvar=True,
        help=f"MLflow run id {required_help}. Inside `mlflow run` it defaults to that run.",
    )


def echo_err(message: str) -> None:
    click.echo(message, err=True)


# ----------------------------------------------------------------- commands


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="fashion-pipeline")
def cli() -> None:
    """Fashion-MNIST pipeline: download -> train -> evaluate -> export-onnx -> predict.

    Every stage logs to MLflow: by default a sqlite store in mlruns/ at the project root
    (`make ui` browses it); set MLFLOW_TRACKING_URI to use another store.
    """


@cli.command()
@data_dir_option
@click.option(
    "--source",
    metavar="PATH|URL",
    default=None,
    help="A folder holding the four .gz (or raw) files, or a base URL serving the .gz files. "
    "Tried first; then Debian's copy in /usr/share/datasets/fashion-mnist; then "
    "torchvision's mirrors.  [default: none]",
)
@click.option("--timeout", type=float, default=30.0, help="Seconds to wait for a network source.")
def download(data_dir: Path, source: str | None, timeout: float) -> None:
    """Put the four Fashion-MNIST files in DATA_DIR, verified by SHA-256."""
    from pipeline.data import default_sources
    from pipeline.data import download as fetch

    report = fetch(data_dir, default_sources(source, timeout))
    if report.already_present:
        click.echo(f"Fashion-MNIST is present and verified in {data_dir}.")
        return
    for name, origin in report.sources.items():
        click.echo(f"{name}: {origin}")
    click.echo(f"Fashion-MNIST verified and saved in {data_dir}.")


@cli.command()
@click.option("--model", "model_name", default="cnn", help="Model to train: dnn or cnn (the chapter's).")
@click.option("--epochs", type=int, default=5, help="Passes over the 60,000 training images.")
@click.option("--batch-size", type=int, default=100, help="Images per optimizer step.")
@click.option("--lr", type=float, default=0.001, help="Adam learning rate.")
@click.option("--seed", type=int, default=0, help="Seeds weights, dropout and shuffling.")
@click.option(
    "--max-steps",
    type=click.IntRange(min=0),
    default=0,
    help="Stop after N optimizer steps, for smoke runs; 0 means no limit.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    help="auto picks cuda when torch sees a GPU.",
)
@click.option("--log-every", type=int, default=50, help="Log the mean training loss every N steps.")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    help="bf16 runs forward/backward under bfloat16 autocast (weights stay fp32); auto picks bf16 where "
    "the CPU or GPU computes it natively, else fp32.",
)
@click.option("--channels-last/--no-channels-last", default=True, help="NHWC memory layout for conv layers.")
@data_dir_option
@click.option(
    "--experiment", default=None, help="MLflow experiment.  [default: $MLFLOW_EXPERIMENT_NAME or fashion-mnist]"
)
def train(
    model_name: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    max_steps: int,
    device: str,
    log_every: int,
    precision: str,
    channels_last: bool,
    data_dir: Path,
    experiment: str | None,
) -> None:
    """Train a model and record params, metrics and the model in MLflow."""
    from pipeline import tracking
    from pipeline.progress import ProgressBar
    from pipeline.train import TrainConfig
    from pipeline.train import train as run_training

    config = TrainConfig(
        model=model_name,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        max_steps=max_steps or None,
        device=device,
        log_every=log_every,
        precision=precision,
        channels_last=channels_last,
        data_dir=data_dir,
    )
    from pipeline.models import model_class

    model_class(config.model)  # an unknown name fails here, before a run is created
    with tracking.run(run_name=model_name, experiment=experiment, tags={"stage": "train"}) as active:
        result = run_training(config, [tracking.MlflowTrainCallback(), ProgressBar()])
        model_uri = tracking.log_torch_model(result.model, result.example_input, result.params["class_names"])
    m = result.metrics
    click.echo(
        f"Trained {model_name} for {m['steps']} steps in {m['wall_time_s']:.1f} s "
        f"({m['train_images_per_s']:,.0f} images/s): test accuracy {m['test_accuracy']:.2%}, "
        f"test loss {m['test_loss']:.4f}"
    )
    click.echo(f"Run id: {active.info.run_id}")
    click.echo(f"Model:  {model_uri}")


@cli.command()
@run_id_option("of a `pipeline train` run; the results are logged into it")
@click.option(
    "--model-uri",
    metavar="URI",
    default=None,
    help="Evaluate this model instead: runs:/<run_id>/model, models:/<model_id> or models:/<name>/<version>. "
    "Results go into the run that logged it.  [default: none]",
)
@data_dir_option
@click.option("--batch-size", type=click.IntRange(min=1), default=200, help="Test images per forward pass.")
def evaluate(run_id: str | None, model_uri: str | None, data_dir: Path, batch_size: int) -> None:
    """Per-class accuracy, confusion matrix and figures on the test set, logged into the run."""
    import tempfile

    from pipeline import tracking
    from pipeline.data import load_split
    from pipeline.evaluate import CURVE_METRICS, PER_CLASS_TABLE, format_evaluation, write_report
    from pipeline.evaluate import evaluate as run_evaluation

    # Inside `mlflow run`, MLFLOW_RUN_ID fills --run-id; an explicit --model-uri still wins.
    run_id_from_env = (
        click.get_current_context().get_parameter_source("run_id") == click.core.ParameterSource.ENVIRONMENT
    )
    if model_uri and run_id and not run_id_from_env:
        raise PipelineError("give --run-id or --model-uri, not both")
    if not (model_uri or run_id):
        raise PipelineError("which model? give --run-id ID (list runs with `make ui`) or --model-uri URI")
    tracking.connect()
    run_id = tracking.run_id_for_model(model_uri) if model_uri else tracking.ensure_run(run_id).info.run_id
    model, class_names = tracking.load_run_model(run_id)
    split = load_split(data_dir, "test")
    result = run_evaluation(model, split.images, split.labels, class_names, batch_size)
    history = tracking.metric_history(run_id, CURVE_METRICS)
    # Logged at the run's last training step, so these become the run's latest values.
    last_step = int(history["step"].max()) if len(history) else 0
    with tempfile.TemporaryDirectory() as tmp:
        subtitle = f" · {getattr(model, 'registry_name', type(model).__name__)} run {run_id[:8]}"
        written = write_report(result, split.images, history, Path(tmp), subtitle)
        with tracking.run(run_id=run_id):
            tracking.log_metrics(result.metrics, step=last_step)
            tracking.log_table(result.per_class, PER_CLASS_TABLE)
            tracking.log_artifacts(Path(tmp))
    click.echo(format_evaluation(result))
    artifacts = ", ".join([f"{PER_CLASS_TABLE} (table)", *(path.name for path in written)])
    click.echo(f"\nLogged into run {run_id}: {len(result.metrics)} metrics; {artifacts}")


@cli.command()
@click.option(
    "--experiment", default=None, help="Experiment to search.  [default: $MLFLOW_EXPERIMENT_NAME or fashion-mnist]"
)
@click.option(
    "--run-id",
    "run_ids",
    multiple=True,
    help="A run to compare (repeat it; the first is the baseline). "
    "[default: the latest finished, evaluated run of each model, smallest model first]",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("outputs/compare"),
    help="Where compare.csv and the bar chart go.",
)
def compare(experiment: str | None, run_ids: tuple[str, ...], output_dir: Path) -> None:
    """Evaluated runs side by side: params, cost, overall and per-class accuracy, differences."""
    from pipeline import tracking
    from pipeline.compare import compare as compare_runs
    from pipeline.compare import format_comparison, select_runs, write_outputs
    from pipeline.evaluate import PER_CLASS_CSV

    selected = select_runs(tracking.search_runs(experiment, run_ids), run_ids)
    supports = {}  # test images per class, for the noise margins
    for run_id in selected["run_id"]:
        try:
            table = tracking.read_csv_artifact(run_id, PER_CLASS_CSV)
        except PipelineError:
            continue
        supports[run_id] = dict(zip(table["class_name"], table["support"], strict=True))
    comparison = compare_runs(selected, supports)
    written = write_outputs(comparison, output_dir)
    click.echo(format_comparison(comparison))
    click.echo(f"\nWrote {', '.join(str(path) for path in written)}")


@cli.command()
@click.option(
    "--model",
    "model",
    required=True,
    metavar="PATH|URI",
    help="An exported .onnx file, or a logged ONNX model: runs:/<run_id>/<name>, models:/<name>@<alias>, "
    "models:/<model_id>.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where the table goes; .csv, .parquet or .jsonl picks the format.  [default: CSV on stdout]",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Images per onnxruntime call.")
@click.option("--top-k", type=click.IntRange(min=1), default=3, help="Most likely classes listed per image.")
@click.option(
    "--invert", is_flag=True, help="Images show dark objects on a light background (product photos): invert them."
)
@click.option("--strict", is_flag=True, help="Exit non-zero if any input failed, not only if all did.")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
def predict(
    model: str, output: Path | None, batch_size: int, top_k: int, invert: bool, strict: bool, inputs: tuple[str, ...]
) -> None:
    """Classify images with an ONNX model in onnxruntime (no torch), one table row per image.

    INPUT: image files (any size, mode or alpha), folders (searched recursively), .npy/.npz
    arrays (N, 28, 28) or (N, 1, 28, 28) as uint8 0-255 or float 0-1, IDX files (raw or .gz),
    or - to read paths from stdin. Unreadable inputs get a row with an error and the run goes on.
    """
    import tempfile

    from pipeline.predict import PredictConfig, Predictor, is_model_uri
    from pipeline.predict import predict as run_prediction

    with tempfile.TemporaryDirectory(prefix="pipeline-predict-") as tmp:
        model_path: str | Path = model
        if is_model_uri(model):
            from pipeline import tracking

            model_path = tracking.download_onnx_model(model, Path(tmp))
        predictor = Predictor(model_path)
        if predictor.metadata_warning:
            echo_err(f"Warning: {predictor.metadata_warning}")
        config = PredictConfig(batch_size=batch_size, top_k=top_k, invert=invert)
        summary = run_prediction(predictor, inputs, output, config)
    echo_err(summary.line() + (f"; table in {output}" if output else ""))
    if summary.predicted == 0:
        raise PipelineError("nothing was predicted; the error column says why each input failed")
    if strict and summary.failed:
        raise PipelineError(f"--strict: {summary.failed:,} input(s) failed; the error column says why")


# ----------------------------------------------------------------- export-onnx / check-parity


def _log_parity(result) -> None:
    """Parity metrics, parity.json and the parity tag, into the active run; then the report."""
    from pipeline import tracking

    tracking.log_metrics(result.metrics())
    tracking.log_dict(result.to_dict(), "parity.json")
    tracking.set_tags({"parity": "passed" if result.passed else "failed"})
    for line in result.summary_lines():
        click.echo(line)


@cli.command("export-onnx")
@run_id_option("of the trained model to export (required)")
@click.option(
    "--output",
    type=click.Path(),  # a str: Path() would drop the trailing slash that asks for a directory
    default=None,
    help="Also write the .onnx file here: a .onnx path, or a directory (created if it ends in /) for "
    "<model>.onnx. With --quantize "
    "the int8 model goes beside it as <name>.int8.onnx.  [default: logged to MLflow only]",
)
@click.option("--opset", type=click.IntRange(min=1), default=None, help="ONNX opset.  [default: the exporter's]")
@click.option(
    "--quantize",
    type=click.Choice(["none", "int8"]),
    default="none",
    help="int8: also make a static int8 (QDQ) model calibrated on training images; it must stay "
    "within 0.5 accuracy points of the torch model.",
)
@click.option(
    "--fold/--no-fold",
    default=None,
    help="Export a copy with conv+BN folded and Linear layers with nothing nonlinear between them merged "
    "(faster, same logits to ~1e-5); parity is still checked against the original model.  [default: fold]",
)
@data_dir_option
def export_onnx(
    run_id: str | None, output: str | None, opset: int | None, quantize: str, fold: bool | None, data_dir: Path
):
    """Export a run's model to ONNX, log it to the run, and check parity with torch.

    Exits non-zero when parity (or the int8 accuracy check) fails; the run is tagged parity=failed.
    """
    import tempfile

    from pipeline import export, tracking
    from pipeline.data import load_split
    from pipeline.parity import check_parity, check_quantized

    if not run_id:
        raise click.UsageError("--run-id is required (inside `mlflow run` it defaults to the job's run)")
    tracking.connect()
    model, class_names = tracking.load_run_model(run_id)
    model_name = model.registry_name
    target = export.resolve_output(output, model_name) if output else None
    test = load_split(data_dir, "test")
    calibration = export.calibration_sample(load_split(data_dir, "train").images) if quantize == "int8" else None
    example = export.example_input(test.images)
    fold = export.FOLD_BY_DEFAULT if fold is None else fold
    with tempfile.TemporaryDirectory(prefix="export-onnx-") as tmp:
        onnx_path = export.export_onnx(
            model,
            target or Path(tmp) / export.default_output_name(model_name),
            class_names,
            model_name,
            run_id,
            opset,
            fold=fold,
        )
        folded_layers = export.read_metadata(onnx_path).get(export.FOLDED_LAYERS_KEY)
        parity = check_parity(model, onnx_path, test.images, test.labels, class_names)
        if quantize == "int8":
            int8_path = export.quantize_int8(onnx_path, export.int8_path_for(onnx_path), calibration)
            int8_check = check_quantized(model, int8_path, test.images, test.labels, class_names)
        with tracking.run(run_id=run_id):
            model_uri = tracking.log_onnx_model(onnx_path, "fp32", example, export.onnx_logits(onnx_path, example))
            click.echo(f"ONNX model ({model_name}, fp32): {model_uri} in run {run_id}")
            if target:
                click.echo(f"Written to: {onnx_path}")
            if folded_layers:
                click.echo(f"Folded for inference: {folded_layers}")
            _log_parity(parity)
            if quantize == "int8":
                int8_uri = tracking.log_onnx_model(int8_path, "int8", example, export.onnx_logits(int8_path, example))
                tracking.log_metrics(int8_check.metrics())
                tracking.log_dict(int8_check.to_dict(), "int8_check.json")
                tracking.set_tags({"int8_check": "passed" if int8_check.passed else "failed"})
                click.echo(f"ONNX model ({model_name}, int8): {int8_uri} in run {run_id}")
                if target:
                    click.echo(f"Written to: {int8_path}")
                for line in int8_check.summary_lines():
                    click.echo(line)
    # Raised after the run is closed: the training run keeps its status, tagged parity=failed.
    failures = [] if parity.passed else [parity.failure_message()]
    if quantize == "int8" and not int8_check.passed:
        failures.append(int8_check.failure_message())
    if failures:
        raise PipelineError("\n".join(failures))


@cli.command("check-parity")
@run_id_option("whose torch model is the reference (required)")
@click.option(
    "--onnx",
    "onnx_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The .onnx file to check.  [default: the one `export-onnx` logged to the run]",
)
@data_dir_option
def check_parity_command(run_id: str | None, onnx_file: Path | None, data_dir: Path) -> None:
    """Compare a run's torch model with an ONNX file under onnxruntime; non-zero exit on mismatch."""
    import tempfile

    from pipeline import tracking
    from pipeline.data import load_split
    from pipeline.parity import check_parity

    if not run_id:
        raise click.UsageError("--run-id is required (inside `mlflow run` it defaults to the job's run)")
    tracking.connect()
    model, class_names = tracking.load_run_model(run_id)
    test = load_split(data_dir, "test")
    with tempfile.TemporaryDirectory(prefix="check-parity-") as tmp:
        onnx_path = onnx_file or tracking.download_onnx_model(tracking.run_onnx_model_uri(run_id), Path(tmp))
        result = check_parity(model, onnx_path, test.images, test.labels, class_names)
    source = result.onnx_metadata.get("source_run_id")
    if source != run_id:
        echo_err(f"Warning: {onnx_path} was exported from run {source}, not {run_id}.")
    with tracking.run(run_id=run_id):
        _log_parity(result)
    if not result.passed:
        raise PipelineError(result.failure_message())


@cli.command()
@click.option("--quick", is_flag=True, help="A smoke run of every measurement, in about two minutes (CI runs it).")
@click.option(
    "--run-id",
    default=None,
    help="Trained CNN run to benchmark inference on.  [default: the latest finished cnn run, "
    "else a model trained here for the measured steps]",
)
@click.option(
    "--steps",
    type=click.IntRange(min=50),
    default=None,
    help="Training steps per measurement.  [default: 60 with --quick, else 300]",
)
@click.option(
    "--full-job/--no-full-job",
    default=None,
    help="Also time the real 5-epoch `mlflow run` end to end.  [default: on unless --quick]",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("outputs/bench"),
    help="Where bench.json and bench.md go.",
)
@data_dir_option
def bench(
    quick: bool, run_id: str | None, steps: int | None, full_job: bool | None, output_dir: Path, data_dir: Path
) -> None:
    """Benchmark our stages against the chapter's own loop, side by side; PASS/MISS per target."""
    import tempfile

    from pipeline import bench as benchmarks
    from pipeline import tracking
    from pipeline.files import write_text

    config = benchmarks.BenchConfig(
        quick=quick, data_dir=data_dir, train_steps=steps or 0, full_job=(not quick) if full_job is None else full_job
    )
    model, class_names, model_source = _bench_model(run_id, config)
    echo_err(f"Benchmarking inference on {model_source}.")
    with tempfile.TemporaryDirectory() as tmp:
        results = benchmarks.run_benchmarks(
            config, model, class_names, Path(tmp), progress=lambda message: echo_err(f"- {message}")
        )
    results["model_source"] = model_source
    report = benchmarks.render_markdown(results)
    output_dir.mkdir(parents=True, exist_ok=True)
    benchmarks.save_json(results, output_dir / "bench.json")
    write_text(output_dir / "bench.md", report)
    with tracking.run(experiment="benchmarks", run_name="bench-quick" if quick else "bench", tags={"stage": "bench"}):
        tracking.log_params(benchmarks.config_dict(config))
        tracking.log_metrics({k: float(v) for k, v in results["headline"].items() if isinstance(v, (int, float))})
        tracking.log_artifact(output_dir / "bench.json")
        tracking.log_artifact(output_dir / "bench.md")
    click.echo(report)
    click.echo(f"Wrote {output_dir / 'bench.json'} and {output_dir / 'bench.md'}; logged to experiment 'benchmarks'.")


def _bench_model(run_id: str | None, config):
    """The CNN whose inference is benchmarked: a given run, the latest real one, or a quick one."""
    from pipeline import tracking
    from pipeline.config import CLASS_NAMES
    from pipeline.train import TrainConfig, train

    if run_id is None:
        runs = tracking.search_runs() if tracking.has_experiment() else None
        if runs is not None and not runs.empty and "params.model" in runs:
            finished = runs[(runs["status"] == "FINISHED") & (runs["params.model"] == "cnn")]
            if not finished.empty:
                run_id = finished.iloc[0]["run_id"]
    if run_id:
        model, names = tracking.load_run_model(run_id)
        return model, names, f"run {run_id}"
    result = train(TrainConfig(model="cnn", max_steps=config.train_steps, data_dir=config.data_dir))
    return result.model, list(CLASS_NAMES), f"a CNN trained here for {config.train_steps} steps (no finished run found)"


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
