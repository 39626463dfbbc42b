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
        data_dir=data_dir,
    )
    from pipeline.models import build_model

    build_model(config.model)  # an unknown name fails here, before a run is created
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


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
