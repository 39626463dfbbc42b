"""`pipeline`: one thin command per stage.

Each command parses options, calls one job in pipeline.jobs, and prints what it returns.
Heavy imports (torch, mlflow, onnxruntime) happen inside the jobs, so `pipeline --help` is
instant and Click rejects a bad option value before any of them is loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline import cli_args, jobs
from pipeline.config import DEVICES, MODEL_NAMES, PRECISIONS, PRUNERS, TrainConfig, train_config
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


@cli.command("download")
@cli_args.DATA_DIR
@click.option(
    "--source",
    metavar="PATH|URL",
    default=None,
    help="A folder holding the four .gz (or raw) files, or a base URL serving the .gz files. "
    "Tried first; then Debian's copy in /usr/share/datasets/fashion-mnist; then "
    "torchvision's mirrors.  [default: none]",
)
@click.option("--timeout", type=cli_args.POSITIVE_FLOAT, default=30.0, help="Seconds to wait for a network source.")
def download_command(data_dir: Path, source: str | None, timeout: float) -> None:
    """Put the four Fashion-MNIST files in DATA_DIR, verified by SHA-256."""
    report = jobs.download_data(data_dir, source, timeout)
    for label, why in report.fell_back.items():
        echo_err(f"Warning: fell back from {label}: {why}.")
    if report.already_present:
        click.echo(f"Fashion-MNIST is present and verified in {data_dir}.")
        return
    for name, origin in report.sources.items():
        click.echo(f"{name}: {origin}")
    click.echo(f"Fashion-MNIST verified and saved in {data_dir}.")


@cli.command("train")
@cli_args.MODEL
@cli_args.recipe_options
@cli_args.VAL_SIZE
@click.option("--seed", type=cli_args.SEED, default=TrainConfig.seed, help="Seeds weights, dropout and shuffling.")
@click.option(
    "--max-steps",
    type=click.IntRange(min=0),
    default=0,
    help="Stop after N optimizer steps, for smoke runs; 0 means no limit.",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default=TrainConfig.device,
    help="auto picks cuda when torch sees a GPU.",
)
@click.option("--log-every", type=int, default=TrainConfig.log_every, help="Log the mean training loss every N steps.")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=TrainConfig.precision,
    help="bf16 runs forward/backward under bfloat16 autocast (weights stay fp32); auto picks bf16 where "
    "the CPU or GPU computes it natively, else fp32.",
)
@click.option(
    "--channels-last/--no-channels-last",
    default=TrainConfig.channels_last,
    help="NHWC memory layout for conv layers.",
)
@cli_args.ALLOW_OTHER_DATA
@cli_args.DATA_DIR
@cli_args.EXPERIMENT
def train_command(
    model_name: str,
    val_size: int,
    seed: int,
    max_steps: int,
    device: str,
    log_every: int,
    precision: str,
    channels_last: bool,
    allow_other_data: bool,
    data_dir: Path,
    experiment: str | None,
    **recipe,
) -> None:
    """Train a model and record params, metrics and the model in MLflow.

    Options left out take the model's recipe (cnn_plus has its own), else the chapter's values.
    """
    config = train_config(
        model_name,
        **recipe,
        val_size=val_size,
        seed=seed,
        max_steps=max_steps or None,
        device=device,
        log_every=log_every,
        precision=precision,
        channels_last=channels_last,
        allow_other_data=allow_other_data,
        data_dir=data_dir,
    )
    job = jobs.train_model(config, experiment)
    m = job.metrics
    click.echo(
        f"Trained {model_name} for {m['steps']} steps in {m['wall_time_s']:.1f} s "
        f"({m['train_images_per_s']:,.0f} images/s): test accuracy {m['test_accuracy']:.2%}, "
        f"test loss {m['test_loss']:.4f}"
        + (f"; validation accuracy {m['val_accuracy']:.2%}" if "val_accuracy" in m else "")
    )
    click.echo(f"Run id: {job.run_id}")
    click.echo(f"Model:  {job.model_uri}")


@cli.command("tune")
@click.option(
    "--model",
    "model_name",
    type=click.Choice(MODEL_NAMES),
    default="cnn_plus",
    help="Model whose recipe is searched (its space: pipeline/tune.py SEARCH_SPACES).",
)
@click.option("--n-trials", type=click.IntRange(min=1), default=20, help="Trials this invocation runs.")
@click.option(
    "--timeout",
    type=cli_args.DURATION,
    default=None,
    help="Start no new trial after this long: 90s, 30m, 2h (with --n-trials, whichever comes first).  [default: none]",
)
@click.option("--study-name", default=None, help="The same name and storage resume a study.  [default: MODEL-tune]")
@click.option(
    "--storage",
    metavar="URL",
    default=None,
    help="Optuna RDB storage shared by resumes and parallel workers, e.g. postgresql://user@host/optuna.  "
    "[default: sqlite optuna.db beside the tracking store, in mlruns/]",
)
@click.option(
    "--val-size",
    type=click.IntRange(min=1),
    default=5000,
    help="Trials train on all but the LAST N training images and are judged on those N; the test set is "
    "never loaded in a trial.",
)
@click.option(
    "--pruner",
    type=click.Choice(PRUNERS),
    default="median",
    help="Stop trials whose validation accuracy trails at the same share of their schedule.",
)
@click.option("--seed", type=cli_args.SEED, default=0, help="The training seed of every trial.")
@click.option(
    "--max-steps",
    type=click.IntRange(min=0),
    default=0,
    help="Cap each trial (and the retraining) at N optimizer steps, for smoke runs; 0 means no limit.",
)
@click.option(
    "--retrain-best",
    is_flag=True,
    help="Then train the best trial's settings on all training images and evaluate that model on the test "
    "set, once, in a run nested under the study's.",
)
@cli_args.ALLOW_OTHER_DATA
@cli_args.DATA_DIR
@cli_args.EXPERIMENT
def tune_command(
    model_name: str,
    n_trials: int,
    timeout: float | None,
    study_name: str | None,
    storage: str | None,
    val_size: int,
    pruner: str,
    seed: int,
    max_steps: int,
    retrain_best: bool,
    allow_other_data: bool,
    data_dir: Path,
    experiment: str | None,
) -> None:
    """Search a model's training settings with Optuna on a validation split, tracked in MLflow.

    One parent run per study, one nested run per trial (params, per-epoch validation metrics,
    state); the parent holds the best params, Optuna's plots and the trials table.
    """
    from pipeline.tune import TuneConfig

    config = TuneConfig(
        model=model_name,
        n_trials=n_trials,
        timeout_s=timeout,
        study_name=study_name,
        storage=storage or "",
        val_size=val_size,
        pruner=pruner,
        seed=seed,
        max_steps=max_steps or None,
        data_dir=data_dir,
        allow_other_data=allow_other_data,
    )
    job = jobs.tune_model(config, experiment, retrain_best, progress=echo_err)
    r = job.result
    counts = ", ".join(f"{n} {state}" for state, n in sorted(r.counts.items()))
    click.echo(f"Study {r.study_name}: {counts}.")
    click.echo(f"Best trial {r.best_number}: validation accuracy {r.best_value:.2%}")
    for name, value in r.best_params.items():
        click.echo(f"  {name} = {value}")
    click.echo(f"Parent run id: {job.parent_run_id}")
    if job.retrained:
        m = job.retrained.metrics
        click.echo(f"Retrained on the full training set: test accuracy {m['test_accuracy']:.2%}")
        click.echo(f"Run id: {job.retrained.run_id}")
        click.echo(f"Model:  {job.retrained.model_uri}")


@cli.command("evaluate")
@cli_args.run_id("of a `pipeline train` run; the results are logged into it", required=False)
@click.option(
    "--model-uri",
    metavar="URI",
    default=None,
    help="Evaluate this model instead: runs:/<run_id>/model, models:/<model_id> or models:/<name>/<version>. "
    "Results go into the run that logged it.  [default: none]",
)
@cli_args.DATA_DIR
@click.option("--batch-size", type=click.IntRange(min=1), default=200, help="Test images per forward pass.")
def evaluate_command(run_id: str | None, model_uri: str | None, data_dir: Path, batch_size: int) -> None:
    """Per-class accuracy, confusion matrix and figures on the test set, logged into the run."""
    from pipeline.evaluate import format_evaluation

    # Inside `mlflow run`, MLFLOW_RUN_ID fills --run-id; an explicit --model-uri still wins.
    run_id_from_env = (
        click.get_current_context().get_parameter_source("run_id") == click.core.ParameterSource.ENVIRONMENT
    )
    if model_uri and run_id and not run_id_from_env:
        raise PipelineError("give --run-id or --model-uri, not both")
    if not (model_uri or run_id):
        raise PipelineError("which model? give --run-id ID (list runs with `make ui`) or --model-uri URI")
    job = jobs.evaluate_run(None if model_uri else run_id, model_uri, data_dir, batch_size)
    click.echo(format_evaluation(job.evaluation))
    click.echo(f"\nLogged into run {job.run_id}: {len(job.evaluation.metrics)} metrics; {', '.join(job.artifacts)}")


@cli.command("compare")
@cli_args.EXPERIMENT
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
def compare_command(experiment: str | None, run_ids: tuple[str, ...], output_dir: Path) -> None:
    """Evaluated runs side by side: params, cost, overall and per-class accuracy, differences."""
    from pipeline.compare import format_comparison

    comparison, written = jobs.compare_runs(experiment, run_ids, output_dir)
    click.echo(format_comparison(comparison))
    click.echo(f"\nWrote {', '.join(str(path) for path in written)}")


@cli.command("predict")
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
def predict_command(
    model: str, output: Path | None, batch_size: int, top_k: int, invert: bool, strict: bool, inputs: tuple[str, ...]
) -> None:
    """Classify images with an ONNX model in onnxruntime (no torch), one table row per image.

    INPUT: image files (any size, mode or alpha), folders (searched recursively), .npy/.npz
    arrays (N, 28, 28) or (N, 1, 28, 28) as uint8 0-255 or float 0-1, IDX files (raw or .gz),
    or - to read paths from stdin. Unreadable inputs get a row with an error and the run goes on.
    """
    from pipeline.predict import PredictConfig

    job = jobs.predict_batch(model, inputs, output, PredictConfig(batch_size=batch_size, top_k=top_k, invert=invert))
    if job.warning:
        echo_err(f"Warning: {job.warning}")
    summary = job.summary
    echo_err(summary.line() + (f"; table in {output}" if output else ""))
    if summary.predicted == 0:
        raise PipelineError("nothing was predicted; the error column says why each input failed")
    if strict and summary.failed:
        raise PipelineError(f"--strict: {summary.failed:,} input(s) failed; the error column says why")


@cli.command("export-onnx")
@cli_args.run_id("of the trained model to export")
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
@cli_args.DATA_DIR
def export_onnx_command(
    run_id: str, output: str | None, opset: int | None, quantize: str, fold: bool | None, data_dir: Path
) -> None:
    """Export a run's model to ONNX, log it to the run, and check parity with torch.

    Exits non-zero when parity (or the int8 accuracy check) fails; the run is tagged parity=failed.
    """
    job = jobs.export_run(run_id, output, opset, quantize, fold, data_dir)
    fp32, *int8 = job.models
    _echo_exported(job, fp32)
    if job.folded_layers:
        click.echo(f"Folded for inference: {job.folded_layers}")
    for line in job.parity.summary_lines():
        click.echo(line)
    for exported in int8:
        _echo_exported(job, exported)
        for line in job.int8_check.summary_lines():
            click.echo(line)
    # The training run keeps its status, tagged parity=failed; the exit code says it failed.
    if job.failures:
        raise PipelineError("\n".join(job.failures))


def _echo_exported(job: jobs.ExportJob, exported: jobs.ExportedModel) -> None:
    click.echo(f"ONNX model ({job.model_name}, {exported.variant}): {exported.model_uri} in run {job.run_id}")
    if exported.path:
        click.echo(f"Written to: {exported.path}")


@cli.command("check-parity")
@cli_args.run_id("whose torch model is the reference")
@click.option(
    "--onnx",
    "onnx_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The .onnx file to check.  [default: the one `export-onnx` logged to the run]",
)
@cli_args.DATA_DIR
def check_parity_command(run_id: str, onnx_file: Path | None, data_dir: Path) -> None:
    """Compare a run's torch model with an ONNX file under onnxruntime; non-zero exit on mismatch."""
    result = jobs.check_run_parity(run_id, onnx_file, data_dir)
    source = result.onnx_metadata.get("source_run_id")
    if source != run_id:
        echo_err(f"Warning: {result.onnx_path} was exported from run {source}, not {run_id}.")
    for line in result.summary_lines():
        click.echo(line)
    if not result.passed:
        raise PipelineError(result.failure_message())


@cli.command("bench")
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
@click.option(
    "--max-cpu-isa",
    type=click.Choice(["native", "avx2"]),
    default="native",
    help="avx2: cap torch's kernels and `auto` choices at AVX2, to see what an AVX2-only CPU would measure "
    "(onnxruntime has no such cap).",
)
@cli_args.DATA_DIR
def bench_command(
    quick: bool,
    run_id: str | None,
    steps: int | None,
    full_job: bool | None,
    output_dir: Path,
    max_cpu_isa: str,
    data_dir: Path,
) -> None:
    """Benchmark our stages against the chapter's own loop, side by side; PASS/MISS per target."""
    job = jobs.run_bench(quick, run_id, steps, full_job, output_dir, data_dir, max_cpu_isa, progress=echo_err)
    click.echo(job.report)
    click.echo(f"Wrote {job.written[0]} and {job.written[1]}; logged to experiment 'benchmarks'.")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
