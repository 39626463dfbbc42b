"""Options that several commands share, defined once (as mlflow's own cli_args.py does).

Defaults and choices come from pipeline.config, which imports nothing heavy, so Click
checks every value before torch or mlflow is loaded and `--help` stays instant.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from pipeline.config import DATA_DIR_ENV, MODEL_NAMES, SEED_RANGE, default_data_dir


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
