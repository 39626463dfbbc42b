"""`pipeline`: one thin command per stage.

Each command parses options, calls one job in pipeline.jobs, and prints what it returns.
Heavy imports (torch, mlflow, onnxruntime) happen inside the jobs, so `pipeline --help` is
instant and Click rejects a bad option value before any of them is loaded.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from pipeline import allocator, cli_args, collector, jobs, signals
from pipeline.config import (
    DOWNLOAD_TIMEOUT_S,
    HEARTBEAT_INTERVAL_S,
    MAX_NPROC,
    MODEL_NAMES,
    ONNX_OPSETS,
    PRUNERS,
    STALE_AFTER_S,
    TrainConfig,
)
from pipeline.errors import PipelineError
from pipeline.server import DATABASES, ServerConfig, default_folder
from pipeline.signals import Terminated, sigterm_raises


class PipelineGroup(click.Group):
    """Turns user mistakes into a one-line error and a non-zero exit, never a traceback.

    SIGTERM is handled like Ctrl-C (the run ends KILLED, temporary files are removed) and
    exits 143; Ctrl-C exits 130.
    """

    def invoke(self, ctx: click.Context):
        try:
            with sigterm_raises():
                return super().invoke(ctx)
        except (Exception, KeyboardInterrupt) as exc:
            # Whatever a library made of the SIGTERM on its way up (see pipeline.signals), it is one.
            if isinstance(exc, Terminated) or signals.received():
                click.echo("\nTerminated.", err=True)
                sys.exit(Terminated.exit_code)
            if isinstance(exc, PipelineError):
                raise click.ClickException(str(exc)) from None
            if isinstance(exc, KeyboardInterrupt):
                click.echo("\nInterrupted.", err=True)
                sys.exit(130)
            raise


def echo_err(message: str) -> None:
    click.echo(message, err=True)


# ----------------------------------------------------------------- commands


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="fashion-pipeline")
def cli() -> None:
    """Fashion-MNIST pipeline: download -> train -> evaluate -> export-onnx -> predict.

    Every stage logs to MLflow: by default MLflow's own default store, mlflow.db at the project
    root with artifacts in mlruns/ (`make ui` browses it); set MLFLOW_TRACKING_URI to use another store.
    """
    # A training step's freed tensors stay with the process for the next step (see pipeline.allocator).
    allocator.keep_freed_memory()
    # What the library says on the side (a store it moved, a run in an unexpected experiment): one line each.
    notes = logging.getLogger("pipeline")
    if not notes.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("note: %(message)s"))
        notes.addHandler(handler)
    # The database pool's own warnings as Python shows them by default, less an interrupt it caught
    # (see signals.not_an_interrupt): a SIGTERM there must read as "Terminated.", not as a traceback.
    pool = logging.getLogger("sqlalchemy.pool")
    if not pool.handlers:
        handler = logging.StreamHandler()
        handler.setLevel(logging.WARNING)
        handler.addFilter(signals.not_an_interrupt)
        pool.addHandler(handler)


@cli.command("download")
@cli_args.DATA_DIR
@click.option(
    "--source",
    type=cli_args.TEXT,
    metavar="PATH|URL",
    default=None,
    help="A folder holding the four .gz (or raw) files, or a base URL serving the .gz files. "
    "Tried first; then Debian's copy in /usr/share/datasets/fashion-mnist; then "
    "torchvision's mirrors.  [default: none]",
)
@click.option(
    "--timeout", type=cli_args.POSITIVE_FLOAT, default=DOWNLOAD_TIMEOUT_S, help="Seconds to wait for a network source."
)
def download_command(data_dir: Path, source: str | None, timeout: float) -> None:
    """Put the four Fashion-MNIST files in DATA_DIR, verified by SHA-256."""
    _echo_download(jobs.download_data(data_dir, source, timeout), data_dir)


def _echo_download(report, data_dir: Path) -> None:
    if report is None:
        click.echo(f"Download skipped: --allow-other-data trains on the data in {data_dir} as it is.")
        return
    for label, why in report.fell_back.items():
        echo_err(f"Warning: fell back from {label}: {why}.")
    if report.already_present:
        click.echo(f"Fashion-MNIST is present and verified in {data_dir}.")
        return
    for name, origin in report.sources.items():
        click.echo(f"{name}: {origin}")
    click.echo(f"Fashion-MNIST verified and saved in {data_dir}.")


@cli.command("train")
@cli_args.train_settings
@click.option(
    "--resume",
    type=cli_args.TEXT,
    metavar="RUN_ID",
    default=None,
    help="Continue a KILLED, FAILED or stale RUNNING run from its last checkpoint, in the same run, with "
    "its own settings (only --data-dir may be given).  [default: none]",
)
@click.option(
    "--nproc",
    type=click.IntRange(1, MAX_NPROC),
    default=1,
    help="Train on N local processes with DistributedDataParallel: runs "
    "`torchrun --nproc-per-node N -m pipeline train ...` with the other options (at most 4 per core).",
)
@click.option(
    "--per-rank-batch",
    is_flag=True,
    help="With several processes, --batch-size is each rank's batch (global batch = N x batch size) "
    "instead of the global batch split over the ranks.",
)
@cli_args.REUSE
@cli_args.EXPERIMENT
def train_command(resume: str | None, nproc: int, reuse: bool, experiment: str | None, **settings) -> None:
    """Train a model and record params, metrics, checkpoints and the model in MLflow."""
    if resume:
        ctx, typed_in = click.get_current_context(), click.core.ParameterSource.COMMANDLINE
        typed = [p for p in ctx.command.params if ctx.get_parameter_source(p.name) == typed_in]
        extra = [p.opts[0] for p in typed if p.name not in ("resume", "data_dir")]
        if extra:
            raise PipelineError(f"--resume continues a run with its own settings; drop {', '.join(extra)}")
        data_dir = settings["data_dir"] if "data_dir" in {p.name for p in typed} else None
        job = jobs.resume_training(resume, data_dir)
        click.echo(f"Resumed run {resume} from its checkpoint at step {job.resumed_from_step:,}.")
        _echo_trained(job)
        return
    config = cli_args.config_from_options(**settings)
    if nproc > 1:
        if reuse:
            raise PipelineError("--reuse is for one process; drop it or --nproc")
        jobs.train_distributed(config, nproc, experiment)
        return
    job = jobs.train_model(config, experiment, reuse)
    if job is not None:  # None: a rank other than 0 under torchrun; rank 0 reports the run
        _echo_trained(job)


def _echo_trained(job: jobs.TrainJob) -> None:
    if job.reused:
        click.echo(
            f"Reused train: run {job.run_id} finished training with the same parameters, data digests "
            "and git commit; nothing was trained."
        )
    m = job.metrics
    click.echo(
        f"Trained {job.model_name} for {m['steps']:,.0f} steps in {m['wall_time_s']:.1f} s "
        f"({m['train_images_per_s']:,.0f} images/s): test accuracy {m['test_accuracy']:.2%}, "
        f"test loss {m['test_loss']:.4f}"
        + (f"; validation accuracy {m['val_accuracy']:.2%}" if "val_accuracy" in m else "")
    )
    click.echo(f"Run id: {job.run_id}")
    click.echo(f"Model:  {job.model_uri}")


@cli.command("run")
@cli_args.train_settings
@cli_args.QUANTIZE
@cli_args.REUSE
@cli_args.EXPLAIN
@click.option(
    "--register",
    is_flag=True,
    envvar="PIPELINE_REGISTER",
    show_envvar=True,
    help="Register the exported model (fashion-<model>, alias candidate) once parity has passed "
    "(`mlflow run . -P register=true` sets it).",
)
@cli_args.EXPERIMENT
def run_command(quantize: str, reuse: bool, explain: bool, register: bool, experiment: str | None, **settings) -> None:
    """The whole job in one process: download, train, evaluate, export-onnx + parity (, register).

    What `mlflow run .` runs; the same as the five commands one after the other, into one run,
    without importing torch and MLflow once per stage.
    """
    config = cli_args.config_from_options(**settings)
    echo = {
        "download": lambda report: _echo_download(report, config.data_dir),
        "train": _echo_trained,
        "evaluate": _echo_evaluation,
        "export-onnx": _echo_export,
        "register": _echo_registration,
    }
    job = jobs.run_pipeline(
        config, experiment, quantize, reuse, register, report=lambda stage, r: echo[stage](r), explain=explain
    )
    exported = job.stages["export-onnx"]
    if exported.failures:
        raise PipelineError("\n".join(exported.failures))


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
@click.option(
    "--study-name",
    type=cli_args.TEXT,
    default=None,
    help="The same name and storage resume a study.  [default: MODEL-tune]",
)
@click.option(
    "--storage",
    type=cli_args.TEXT,
    metavar="URL",
    default=None,
    help="Optuna RDB storage shared by resumes and parallel workers, e.g. postgresql://user@host/optuna.  "
    "[default: a sqlite database beside a sqlite tracking store (mlflow-optuna.db for the project's)]",
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
    "set, once, in a run nested under the study's; export it, check parity and register it (alias candidate).",
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
        _echo_export(job.exported)
        if job.registration is not None:
            _echo_registration(job.registration)
        if job.exported.failures:
            raise PipelineError("\n".join(job.exported.failures))


@cli.command("evaluate")
@cli_args.run_id("of a `pipeline train` run; the results are logged into it", required=False)
@click.option(
    "--model-uri",
    type=cli_args.TEXT,
    metavar="URI",
    default=None,
    help="Evaluate this model instead: runs:/<run_id>/pytorch_model, models:/<model_id> or models:/<name>/<version>. "
    "Results go into the run that logged it.  [default: none]",
)
@cli_args.DATA_DIR
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=TrainConfig.eval_batch_size,
    help="Test images per forward pass.",
)
@cli_args.REUSE
@cli_args.EXPLAIN
def evaluate_command(
    run_id: str | None, model_uri: str | None, data_dir: Path, batch_size: int, reuse: bool, explain: bool
) -> None:
    """Per-class accuracy, confusion matrix, calibration (temperature scaling on the validation split),
    ROC and precision-recall curves, and what the model learned (filters, feature maps, Grad-CAM),
    on the test set, logged into the run."""
    # Inside `mlflow run`, MLFLOW_RUN_ID fills --run-id; an explicit --model-uri still wins.
    run_id_from_env = (
        click.get_current_context().get_parameter_source("run_id") == click.core.ParameterSource.ENVIRONMENT
    )
    if model_uri and run_id and not run_id_from_env:
        raise PipelineError("give --run-id or --model-uri, not both")
    if not (model_uri or run_id):
        raise PipelineError("which model? give --run-id ID (list runs with `make ui`) or --model-uri URI")
    _echo_evaluation(
        jobs.evaluate_run(None if model_uri else run_id, model_uri, data_dir, batch_size, reuse, explain=explain)
    )


def _echo_evaluation(job: jobs.EvaluateJob) -> None:
    from pipeline.evaluate import format_evaluation

    if job.reused:
        click.echo(f"Reused evaluate: run {job.run_id} was evaluated with the same test data and git commit.")
        return
    click.echo(format_evaluation(job.evaluation))
    for note in job.evaluation.notes:
        click.echo(f"Note: {note}")
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
    """Evaluated runs side by side: params, cost, overall and per-class accuracy, differences.

    The table and chart are also logged to MLflow, as a `compare ...` run in the baseline's experiment.
    """
    from pipeline.compare import format_comparison

    job = jobs.compare_runs(experiment, run_ids, output_dir)
    click.echo(format_comparison(job.comparison))
    click.echo(f"\nWrote {', '.join(str(path) for path in job.written)}; logged to MLflow as run {job.run_id}")


@cli.command("predict")
@click.option(
    "--model",
    "model",
    type=cli_args.MODEL_SOURCE,
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
    "--preprocess",
    type=click.Choice(["auto", "fashion-mnist", "none"]),
    default="auto",
    show_default=True,
    help="auto: a 28x28 grey image on a dark background is taken as it is, anything else (photos: light "
    "background, large, off-centre, tinted) goes through Fashion-MNIST's own conversion, its background's "
    "polarity read from its border. fashion-mnist: convert every image. none: only grey and resized. "
    "Arrays and IDX files are always taken as they are.",
)
@click.option(
    "--invert",
    is_flag=True,
    help="Old name, kept for scripts: the conversion with the background taken as light. Not needed: "
    "--preprocess auto detects the background.",
)
@click.option(
    "--contact-sheet",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE.png",
    help="Also draw a PNG: for the first image files, the original, the 28x28 image the model saw, and the top 3.",
)
@click.option(
    "--contact-sheet-size",
    type=click.IntRange(min=1, max=400),
    default=24,
    show_default=True,
    help="How many images the contact sheet shows.",
)
@click.option("--strict", is_flag=True, help="Exit non-zero if any input failed, not only if all did.")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
def predict_command(
    model: str,
    output: Path | None,
    batch_size: int,
    top_k: int,
    preprocess: str,
    invert: bool,
    contact_sheet: Path | None,
    contact_sheet_size: int,
    strict: bool,
    inputs: tuple[str, ...],
) -> None:
    """Classify images with an ONNX model in onnxruntime (no torch), one table row per image.

    INPUT: image files (any size, mode or alpha: photos too), folders (searched recursively),
    .npy/.npz arrays (N, 28, 28) or (N, 1, 28, 28) as uint8 0-255 or float 0-1, IDX files (raw or
    .gz), or - to read paths from stdin. Unreadable inputs get a row with an error and the run goes
    on. The preprocessing column says what was done to each image.
    """
    from pipeline.predict import PredictConfig

    if invert and preprocess == "none":
        raise click.UsageError("--invert converts the image; it cannot go with --preprocess none")
    config = PredictConfig(
        batch_size=batch_size,
        top_k=top_k,
        preprocess=preprocess,
        invert=invert,
        contact_sheet=contact_sheet,
        contact_sheet_size=contact_sheet_size,
    )
    job = jobs.predict_batch(model, inputs, output, config)
    if job.warning:
        echo_err(f"Warning: {job.warning}")
    summary = job.summary
    echo_err(summary.line() + (f"; table in {output}" if output else ""))
    if summary.contact_sheet:
        echo_err(f"Contact sheet in {summary.contact_sheet}")
    elif contact_sheet:
        echo_err(f"No contact sheet: no image file was predicted ({contact_sheet} shows image files, not arrays)")
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
@click.option(
    "--opset",
    type=click.IntRange(*ONNX_OPSETS),
    default=None,
    help="ONNX opset, among those torch's exporter builds natively.  [default: the exporter's]",
)
@cli_args.QUANTIZE
@click.option(
    "--fold/--no-fold",
    default=None,
    help="Export a copy with conv+BN folded and Linear layers with nothing nonlinear between them merged "
    "(faster, same logits to ~1e-5); parity is still checked against the original model.  [default: fold]",
)
@cli_args.REUSE
@cli_args.DATA_DIR
def export_onnx_command(
    run_id: str, output: str | None, opset: int | None, quantize: str, fold: bool | None, reuse: bool, data_dir: Path
) -> None:
    """Export a run's model to ONNX, log it to the run, and check parity with torch.

    Exits non-zero when parity (or the int8 accuracy check) fails; the run is tagged parity=failed.
    """
    job = jobs.export_run(run_id, output, opset, quantize, fold, data_dir, reuse)
    _echo_export(job)
    # The training run keeps its status, tagged parity=failed; the exit code says it failed.
    if job.failures:
        raise PipelineError("\n".join(job.failures))


def _echo_export(job: jobs.ExportJob) -> None:
    if job.reused:
        click.echo(f"Reused export-onnx: run {job.run_id} was exported with the same settings and passed parity.")
        for exported in job.models:
            _echo_exported(job, exported)
        return
    fp32, *int8 = [m for m in job.models if m.variant != "images"]
    _echo_exported(job, fp32)
    if job.folded_layers:
        click.echo(f"Folded for inference: {job.folded_layers}")
    for line in job.parity.summary_lines():
        click.echo(line)
    for exported in int8:
        _echo_exported(job, exported)
        for line in job.int8_check.summary_lines():
            click.echo(line)
        if job.int8_note:
            echo_err(f"Note: {job.int8_note}.")
    for exported in job.models:
        if exported.variant == "images":
            _echo_exported(job, exported)


def _echo_exported(job: jobs.ExportJob, exported: jobs.ExportedModel) -> None:
    if exported.variant == "images":
        click.echo(f"Image model (photos in, classes out; serve it): {exported.model_uri} in run {job.run_id}")
        return
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


@cli.command("runs")
@click.option(
    "--experiment",
    type=cli_args.EXPERIMENT_NAME,
    default=None,
    help="Only this experiment.  [default: every experiment in the store]",
)
@click.option(
    "--stale",
    is_flag=True,
    help="Only runs left RUNNING by a process that is gone (kill -9, a crash, a lost machine): its pid is "
    "dead on this host, or its heartbeat is older than --stale-after.",
)
@click.option(
    "--stale-after",
    type=cli_args.FiniteFloatRange(min=2 * HEARTBEAT_INTERVAL_S),
    default=STALE_AFTER_S,
    help=f"Seconds without a heartbeat after which a RUNNING run is stale (a live stage beats every "
    f"{HEARTBEAT_INTERVAL_S:.0f} s).",
)
@click.option("--mark-failed", is_flag=True, help="With --stale: close those runs as FAILED, with an end time.")
def runs_command(experiment: str | None, stale: bool, stale_after: float, mark_failed: bool) -> None:
    """List the store's runs, newest first, with what a KILLED or FAILED run can be resumed from."""
    import time

    if mark_failed and not stale:
        raise click.UsageError("--mark-failed closes stale runs: give --stale too")
    job = jobs.list_runs(experiment, stale, stale_after, mark_failed)
    for row in job.runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.start_time))
        if row.stale:
            detail = f"stale: {row.stale}"
        elif row.status == "RUNNING":
            detail = row.liveness
        elif row.status in ("KILLED", "FAILED") and row.checkpoint_step is not None:
            detail = f"resumable from step {row.checkpoint_step:,}: pipeline train --resume {row.run_id}"
        else:
            detail = ""
        click.echo(f"{row.run_id}  {row.status:<8}  {started}  {row.experiment}/{row.name}  {detail}".rstrip())
    if stale:
        if not job.runs:
            click.echo("No stale runs.")
        elif job.marked_failed:
            click.echo(f"Marked {len(job.marked_failed)} stale run(s) FAILED.")
        else:
            click.echo(f"{len(job.runs)} stale run(s); --mark-failed closes them.")


@cli.command("register")
@cli_args.run_id("whose exported ONNX model is registered (its parity check must have passed)")
@click.option(
    "--name",
    type=cli_args.TEXT,
    default=None,
    help="Registered model name; the PyTorch model goes to NAME-pytorch, the image model (serves photos) to "
    "NAME-images. Give runs of different models "
    "the same name to make them compete for champion.  [default: fashion-<model>, e.g. fashion-cnn]",
)
def register_command(run_id: str, name: str | None) -> None:
    """Register a run's ONNX model (and its PyTorch and image models) in the Model Registry, aliased `candidate`."""
    _echo_registration(jobs.register_run(run_id, name))


def _echo_registration(job) -> None:
    for registered in filter(None, (job.onnx, job.pytorch, job.image_model)):
        how = "Registered as" if registered.created else "Already registered as"
        click.echo(f"{how} {registered.name} v{registered.version} (alias candidate)")
    click.echo(f"test accuracy {job.test_accuracy:.2%} on {job.test_images:,} test images; ONNX parity passed")
    click.echo(f"Next: pipeline promote --name {job.onnx.name}")


@cli.command("promote")
@click.option("--name", type=cli_args.TEXT, required=True, help="Registered model name, e.g. fashion-cnn.")
@click.option(
    "--version",
    type=cli_args.TEXT,
    default=None,
    help="Make this version the champion, whatever its accuracy.  [default: the candidate, if it beats the "
    "champion by more than the noise margin]",
)
@click.option("--force", is_flag=True, help="Promote the candidate even if it does not beat the champion.")
def promote_command(name: str, version: str | None, force: bool) -> None:
    """Move the `champion` alias, which predict and serve follow (models:/NAME@champion)."""
    job = jobs.promote_model(name, version, force)
    click.echo(job.decision.message + ".")
    if job.champion:
        click.echo(f"Champion: models:/{name}@champion = {name} v{job.champion}")
    for twin in job.twins:
        click.echo(f"  with {twin} (same run)")


@cli.command("ui-url")
@cli_args.EXPERIMENT
@click.option("--host", type=cli_args.TEXT, default="127.0.0.1", help="Where `mlflow ui` listens.")
@click.option("--port", type=int, default=5000, help="Where `mlflow ui` listens.")
def ui_url_command(experiment: str | None, host: str, port: int) -> None:
    """Print the MLflow UI's links to the experiment's runs (with the pipeline's columns) and to the registry."""
    links = jobs.ui_links(experiment, host, port)
    if links.runs:
        click.echo(f"Runs of experiment {links.experiment!r}: {links.runs}")
    else:
        click.echo(f"No experiment {links.experiment!r} in the store yet: `make run` makes one.")
    click.echo(f"Registered models: {links.models}")


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
    "--timing-seconds",
    type=cli_args.FiniteFloatRange(min=0, min_open=True),
    default=None,
    help="Seconds each inference throughput figure is timed for (at least 5 calls each).  "
    "[default: 1 with --quick, else 3 (2 for the onnxruntime levers)]",
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
@click.option(
    "--recipe-seeds",
    type=click.IntRange(min=0),
    default=None,
    help="Full trainings of cnn_plus and of the chapter's CNN, one pair per seed, for the recipe's accuracy "
    "and time; 0 extrapolates the time from a few steps and measures no accuracy.  [default: 3, 0 with --quick]",
)
@click.option(
    "--docs",
    "docs_page",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the report's tables into this Markdown page, between its <!-- bench:native:start --> and "
    "<!-- bench:native:end --> lines (bench:avx2 with --max-cpu-isa avx2); the rest of the page is kept as it "
    "is (make bench: docs/performance.md).  [default: none]",
)
@cli_args.DATA_DIR
def bench_command(
    quick: bool,
    run_id: str | None,
    steps: int | None,
    timing_seconds: float | None,
    full_job: bool | None,
    output_dir: Path,
    max_cpu_isa: str,
    recipe_seeds: int | None,
    docs_page: Path | None,
    data_dir: Path,
) -> None:
    """Benchmark our stages against the chapter's own loop, side by side; PASS/MISS per target."""
    job = jobs.run_bench(
        quick,
        run_id,
        steps,
        full_job,
        output_dir,
        data_dir,
        max_cpu_isa,
        recipe_seeds,
        progress=echo_err,
        timing_s=timing_seconds or 0.0,
        docs_page=docs_page,
    )
    click.echo(job.report)
    click.echo(f"Wrote {job.written[0]} and {job.written[1]}; logged to experiment 'benchmarks'.")
    if job.docs_page is not None:
        click.echo(f"Tables written into {job.docs_page}.")


@cli.group("server")
def server_group() -> None:
    """A tracking server for a team: `mlflow server` over sqlite or PostgreSQL (`make server`)."""


@server_group.command("start")
@click.option(
    "--db",
    type=click.Choice(DATABASES),
    default=ServerConfig.db,
    help="sqlite: the project store (mlflow.db); postgresql: a cluster of its own in FOLDER/postgresql.",
)
@click.option(
    "--host",
    type=cli_args.TEXT,
    default=ServerConfig.host,
    help="Interface to listen on; 0.0.0.0 for the whole network.",
)
@click.option("--port", type=click.IntRange(1, 65535), default=ServerConfig.port, help="Port to listen on.")
@click.option("--workers", type=click.IntRange(min=1), default=ServerConfig.workers, help="Server processes.")
@click.option(
    "--basic-auth",
    is_flag=True,
    help="MLflow's own login (--app-name basic-auth). The first start needs MLFLOW_AUTH_ADMIN_PASSWORD.",
)
@click.option(
    "--folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_folder,
    show_default=".server/ at the project root",
    help="Pid file, logs, the PostgreSQL cluster and its artifacts.",
)
def server_start_command(db: str, host: str, port: int, workers: int, basic_auth: bool, folder: Path) -> None:
    """Start the server in the background and wait until it answers."""
    config = ServerConfig(
        db=db, host=host, port=port, workers=workers, folder=folder, app_name="basic-auth" if basic_auth else None
    )
    info = jobs.start_tracking_server(config)
    state = "already running" if info.already_running else "started"
    click.echo(f"MLflow tracking server {state} at {info.url} (pid {info.pid}, {info.db}; log {info.log})")
    click.echo(f"Backend store: {info.backend_store_uri}")
    click.echo(f"Artifacts:     {info.artifacts_destination} (proxied by the server)")
    click.echo(f"Use it:        export MLFLOW_TRACKING_URI={info.url}")


@server_group.command("stop")
@click.option(
    "--folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_folder,
    show_default=".server/ at the project root",
    help="The folder `server start` used.",
)
def server_stop_command(folder: Path) -> None:
    """Stop the server and its PostgreSQL."""
    stopped = jobs.stop_tracking_server(folder)
    click.echo("\n".join(f"Stopped {what}." for what in stopped) or "Nothing was running.")


def main() -> None:
    collector.collect_for_a_command()  # seconds less per command: see pipeline.collector
    cli()


if __name__ == "__main__":
    main()
