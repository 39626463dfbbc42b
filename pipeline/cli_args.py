"""Options that several commands share, defined once (as mlflow's own cli_args.py does).

Defaults and choices come from pipeline.config, which imports nothing heavy, so Click
checks every value before torch or mlflow is loaded and `--help` stays instant.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from pipeline.config import (
    DATA_DIR_ENV,
    DEVICES,
    EPOCHS_WITHOUT_NATIVE_BF16,
    MAX_EXPERIMENT_NAME_LENGTH,
    MODEL_NAMES,
    OPTIMIZERS,
    PRECISIONS,
    RECIPES,
    SCHEDULES,
    SEED_RANGE,
    TrainConfig,
    default_data_dir,
    train_config,
)


class PositiveFloat(click.types.FloatParamType):
    """A finite float above 0: FloatRange lets nan and inf through."""

    name = "positive float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not (math.isfinite(number) and number > 0):
            self.fail(f"{value!r} is not a finite number above 0.", param, ctx)
        return number


POSITIVE_FLOAT = PositiveFloat()


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf: nan fails no comparison, so FloatRange takes it
    (and inf where the range has no upper end)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class Text(click.ParamType):
    """A string that is not empty, nor only blanks, and at most `max_length` characters.

    Typed explicitly, an empty value is a mistake (`--resume $RUN` with RUN unset), not a request for
    the default: without this, `train --resume ''` trained a new run from scratch and exited 0.
    """

    name = "text"

    def __init__(self, max_length: int | None = None, limit_source: str = ""):
        self.max_length = max_length
        self.limit_source = limit_source

    def convert(self, value, param, ctx):
        text = value if isinstance(value, str) else str(value)
        if not text.strip():
            default = "" if param is None or param.required else ", or leave the option out for its default"
            self.fail(f"it is empty (an unset variable?): give a value{default}.", param, ctx)
        if self.max_length is not None and len(text) > self.max_length:
            self.fail(
                f"{len(text):,} characters; at most {self.max_length}{self.limit_source} may be given.", param, ctx
            )
        return text


TEXT = Text()
EXPERIMENT_NAME = Text(MAX_EXPERIMENT_NAME_LENGTH, " (MLflow's limit for an experiment name)")


class ModelSource(Text):
    """predict's --model: a .onnx file or folder, or a model URI MLflow resolves in the tracking store.

    An http(s) URL is neither: MLflow would take it for an artifact store and fail with a message
    about something else, so it is refused here with what to give instead.
    """

    name = "model"

    def convert(self, value, param, ctx):
        text = super().convert(value, param, ctx)
        if text.lower().startswith(("http://", "https://")):
            self.fail(
                "an http(s) URL is not a model source: download the .onnx file and give its path, or give a "
                "model logged in the tracking store (runs:/<run_id>/<name>, models:/<name>@<alias>, "
                "models:/<model_id>; set MLFLOW_TRACKING_URI to reach a tracking server).",
                param,
                ctx,
            )
        return text


MODEL_SOURCE = ModelSource()


class Duration(click.ParamType):
    """Seconds, or a number with a unit: 90, 90s, 30m, 1.5h."""

    name = "duration"
    UNITS = {"s": 1, "m": 60, "h": 3600}

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            seconds = float(value)
        else:
            text = str(value).strip().lower()
            scale = self.UNITS.get(text[-1:], None)
            try:
                seconds = float(text[:-1] if scale else text) * (scale or 1)
            except ValueError:
                self.fail(f"{value!r} is not a duration such as 90s, 30m or 2h.", param, ctx)
        if not (math.isfinite(seconds) and seconds > 0):
            self.fail(f"{value!r} is not a positive duration.", param, ctx)
        return seconds


DURATION = Duration()
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
    type=EXPERIMENT_NAME,
    default=None,
    help="MLflow experiment.  [default: $MLFLOW_EXPERIMENT_NAME or fashion-mnist]",
)

MODEL = click.option(
    "--model",
    "model_name",
    type=click.Choice(MODEL_NAMES),
    default="cnn",
    help="Model to train: dnn or cnn (the chapter's), or cnn_plus (faster to 93 %, with its own recipe).",
)


def run_id(what: str, required: bool = True):
    """--run-id, filled from MLFLOW_RUN_ID inside `mlflow run` (which sets it for the job's run)."""
    return click.option(
        "--run-id",
        type=TEXT,
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

EXPLAIN = click.option(
    "--explain/--no-explain",
    default=True,
    show_default=True,
    help="Draw what the model learned: first-layer filters, feature maps after each convolution and pooling, "
    "Grad-CAM (saliency for a model without convolutions) on mistakes and right answers. --no-explain skips "
    "them for quick runs; calibration and ranking metrics are computed either way.",
)

QUANTIZE = click.option(
    "--quantize",
    type=click.Choice(["none", "int8"]),
    default="none",
    help="int8: also make a static int8 model (QOperator where the CPU has VNNI or AMX, else QDQ), "
    "calibrated on training images; it must stay within 0.5 accuracy points of the torch model.",
)


def _recipe_value(ctx: click.Context, param: click.Parameter, value):
    # Left out means "not set", whatever default --help shows: the model's recipe then decides.
    return None if ctx.get_parameter_source(param.name) is click.core.ParameterSource.DEFAULT else value


def _recipe_option(flag: str, field: str, help: str, **kwargs):
    """A training setting a model's recipe may set: the chapter's value (TrainConfig's) is the
    default shown; left out, it arrives as None, so the recipe (listed in the help) applies."""
    cpu_note = EPOCHS_WITHOUT_NATIVE_BF16 if field == "epochs" else {}
    differ = ", ".join(
        f"{model} {recipe[field]}" + (f" ({cpu_note[model]} on a CPU without native bf16)" if model in cpu_note else "")
        for model, recipe in RECIPES.items()
        if field in recipe
    )
    return click.option(
        flag,
        field,
        default=getattr(TrainConfig, field),
        callback=_recipe_value,
        help=help + (f" Recipes: {differ}." if differ else ""),
        **kwargs,
    )


# The settings of a model's recipe. Each applies to every model; without the option, the
# model's recipe (pipeline.config.RECIPES) decides, else the chapter's value.
RECIPE_OPTIONS = (
    _recipe_option("--epochs", "epochs", "Passes over the training images.", type=int),
    _recipe_option("--batch-size", "batch_size", "Images per optimizer step.", type=int),
    _recipe_option("--lr", "lr", "Learning rate (with onecycle: the peak).", type=POSITIVE_FLOAT),
    _recipe_option(
        "--optimizer",
        "optimizer",
        "adamw: decoupled weight decay; sgd: Nesterov momentum 0.9.",
        type=click.Choice(OPTIMIZERS),
    ),
    _recipe_option("--weight-decay", "weight_decay", "Weight decay.", type=FiniteFloatRange(min=0)),
    _recipe_option(
        "--schedule",
        "schedule",
        "onecycle: rise to --lr over the first quarter of the steps, then a cosine anneal.",
        type=click.Choice(SCHEDULES),
    ),
    _recipe_option(
        "--label-smoothing",
        "label_smoothing",
        "Cross-entropy label smoothing.",
        type=FiniteFloatRange(0, 1, max_open=True),
    ),
    _recipe_option(
        "--crop-pad",
        "crop_pad",
        "Augmentation: shift each training image by up to N pixels (random crop of the zero-padded image); 0 is off.",
        type=click.IntRange(min=0),
    ),
    _recipe_option("--hflip/--no-hflip", "hflip", "Augmentation: mirror half the training images left-right."),
    _recipe_option(
        "--test-eval",
        "test_eval",
        "When the test set is evaluated: after every epoch (a test curve), or once, at the end.",
        # Not "never" (pipeline.tune and the bench use it): the report and the registry read the run's test accuracy.
        type=click.Choice(("epoch", "end")),
    ),
)


VAL_SIZE = click.option(
    "--val-size",
    type=click.IntRange(min=0),
    default=TrainConfig.val_size,
    help="Hold out the LAST N training images as a validation split, evaluated every epoch beside the test "
    "set (val_accuracy, val_loss). 0 trains on all 60,000.",
)

ALLOW_OTHER_DATA = click.option(
    "--allow-other-data",
    is_flag=True,
    help="Train on data files whose SHA-256 differs from Fashion-MNIST's (your own data in the same "
    "IDX format); without it they are refused before training.",
)

# The options that make a TrainConfig, shared by `train` and `run` (defaults from TrainConfig).
_TRAIN_SETTINGS = (
    MODEL,
    *RECIPE_OPTIONS,
    VAL_SIZE,
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
        "--compile/--no-compile",
        default=TrainConfig.compile,
        help="torch.compile (inductor) the training step's model; compiled code is cached on disk, so a "
        "second run skips most of the compile. Off by default: slower than eager on the CPUs measured.",
    ),
    ALLOW_OTHER_DATA,
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


def config_from_options(model_name: str, max_steps: int, **settings) -> TrainConfig:
    """The TrainConfig the train_settings options describe: the model's recipe under what was typed;
    --max-steps 0 means no limit."""
    return train_config(model_name, max_steps=max_steps or None, **settings)
