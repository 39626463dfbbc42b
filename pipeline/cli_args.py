"""Options that several commands share, defined once (as mlflow's own cli_args.py does).

Defaults and choices come from pipeline.config, which imports nothing heavy, so Click
checks every value before torch or mlflow is loaded and `--help` stays instant.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from pipeline.config import DATA_DIR_ENV, DEVICES, MODEL_NAMES, PRECISIONS, SEED_RANGE, TrainConfig, default_data_dir


class PositiveFloat(click.types.FloatParamType):
    """A finite float above 0: FloatRange lets nan and inf through."""

    name = "positive float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not (math.isfinite(number) and number > 0):
            self.fail(f"{value!r} is not a finite number above 0.", param, ctx)
        return number


POSITIVE_FLOAT = PositiveFloat()
SEED = click.IntRange(*SEED_RANGE)

DATA_DIR = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_data_dir,
    show_default=f"data/ at the project root, or ${DATA_DIR_ENV}",
    envvar=DATA_DIR_ENV,
    help="Where Fashion-MNIST lives (torchvision layout: DIR/FashionMNIST/raw/).",
)

EXPERIMENT = click.option(
    "--experiment",
    default=None,
    help="MLflow experiment.  [default: $MLFLOW_EXPERIMENT_NAME or fashion-mnist]",
)

MODEL = click.option(
    "--model",
    "model_name",
    type=click.Choice(MODEL_NAMES),
    default="cnn",
    help="Model to train: dnn or cnn (the chapter's).",
)


def run_id(what: str, required: bool = True):
    """--run-id, filled from MLFLOW_RUN_ID inside `mlflow run` (which sets it for the job's run)."""
    return click.option(
        "--run-id",
        envvar="MLFLOW_RUN_ID",
        show_envvar=True,
        required=required,
        help=f"MLflow run id {what}. Inside `mlflow run` it defaults to that run.",
    )


REUSE_ENV = "PIPELINE_REUSE"

REUSE = click.option(
    "--reuse",
    is_flag=True,
    envvar=REUSE_ENV,
    show_envvar=True,
    help="Skip this stage when a finished run already did it with the same parameters, data digests and "
    "git commit, and use its outputs (`mlflow run . -P reuse=true` sets it for every stage).",
)

QUANTIZE = click.option(
    "--quantize",
    type=click.Choice(["none", "int8"]),
    default="none",
    help="int8: also make a static int8 (QDQ) model calibrated on training images; it must stay "
    "within 0.5 accuracy points of the torch model.",
)


# The options that make a TrainConfig, shared by `train` and `run` (defaults from TrainConfig).
_TRAIN_SETTINGS = (
    MODEL,
    click.option("--epochs", type=int, default=TrainConfig.epochs, help="Passes over the 60,000 training images."),
    click.option("--batch-size", type=int, default=TrainConfig.batch_size, help="Images per optimizer step."),
    click.option("--lr", type=POSITIVE_FLOAT, default=TrainConfig.lr, help="Adam learning rate."),
    click.option("--seed", type=SEED, default=TrainConfig.seed, help="Seeds weights, dropout and shuffling."),
    click.option(
        "--max-steps",
        type=click.IntRange(min=0),
        default=0,
        help="Stop after N optimizer steps, for smoke runs; 0 means no limit.",
    ),
    click.option(
        "--device",
        type=click.Choice(DEVICES),
        default=TrainConfig.device,
        help="auto picks cuda when torch sees a GPU.",
    ),
    click.option(
        "--log-every", type=int, default=TrainConfig.log_every, help="Log the mean training loss every N steps."
    ),
    click.option(
        "--precision",
        type=click.Choice(PRECISIONS),
        default=TrainConfig.precision,
        help="bf16/fp16 run forward/backward under autocast (weights stay fp32; fp16 with a gradient scaler); "
        "auto picks bf16 where the CPU or GPU computes it natively, else fp16 on a GPU and fp32 on a CPU.",
    ),
    click.option(
        "--channels-last/--no-channels-last",
        default=TrainConfig.channels_last,
        help="NHWC memory layout for conv layers.",
    ),
    click.option(
        "--allow-other-data",
        is_flag=True,
        help="Train on data files whose SHA-256 differs from Fashion-MNIST's (your own data in the same "
        "IDX format); without it they are refused before training.",
    ),
    click.option(
        "--checkpoint-every",
        type=click.IntRange(min=0),
        default=TrainConfig.checkpoint_every,
        help="Also save a resumable checkpoint every N steps; 0: at the end of each epoch only.",
    ),
    click.option(
        "--system-metrics/--no-system-metrics",
        default=TrainConfig.system_metrics,
        help="Sample CPU, memory and GPU use into the run (MLflow's system/* metrics) while it trains.",
    ),
    DATA_DIR,
)


def train_settings(command):
    """Decorate a command with every training setting, in the order --help lists them."""
    for option in reversed(_TRAIN_SETTINGS):
        command = option(command)
    return command


def train_config(model_name: str, max_steps: int, **settings) -> TrainConfig:
    """The TrainConfig the train_settings options describe; --max-steps 0 means no limit."""
    return TrainConfig(model=model_name, max_steps=max_steps or None, **settings)
