"""Defaults that more than one layer needs, defined once: paths, class names, input shape,
model names, and the training settings.

Nothing heavy is imported here, so the CLI takes its option defaults and choices from this
module and `pipeline --help` stays instant. Settings that only one stage reads live in
dataclasses beside that stage (ParityConfig in parity.py, ...).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline import hardware
from pipeline.errors import PipelineError

# Fashion-MNIST's labels in id order (the chapter's listing 5-5, in the dataset's own spelling).
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# (channels, height, width) of one image as the models see it: float32 in [0, 1].
INPUT_SHAPE: tuple[int, int, int] = (1, 28, 28)

# The model registry's names (pipeline.models registers a class under each). Listed here,
# torch-free, so Click can offer and check them before torch is imported.
MODEL_NAMES: tuple[str, ...] = ("dnn", "cnn", "cnn_plus")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")
SCHEDULES: tuple[str, ...] = ("constant", "onecycle")
# When the test set is evaluated: every epoch (train's default), once at the end (the final figure
# of a tuned configuration), or never (inside a tuning trial, where only validation may decide).
TEST_EVALS: tuple[str, ...] = ("epoch", "end", "never")
PRUNERS: tuple[str, ...] = ("median", "halving", "none")  # `pipeline tune --pruner`

# Seeds every tool accepts (numpy's legacy seeding stops at 2**32 - 1); Click checks the option.
SEED_RANGE: tuple[int, int] = (0, 2**32 - 1)

# `pipeline train --nproc`: at most 4 local processes per core. Each rank is a whole training process
# with its own copy of the data as float tensors (~190 MB for Fashion-MNIST's training set) and its
# own threads, so ranks beyond the cores only time-slice them and multiply the memory; 4x still leaves
# room to try oversubscription (gloo on a few cores, ranks that wait on I/O), while a typo such as
# --nproc 1000 is refused instead of starting a thousand processes.
MAX_NPROC = 4 * (os.cpu_count() or 1)

# The ONNX opsets `export-onnx --opset` accepts: what torch.onnx's exporter (torch.export + onnxscript's
# torchlib) builds natively. From torch/onnx/_internal/exporter/_constants.py TORCHLIB_OPSET (18):
# below it torch exports at 18 and then tries onnxscript's version converter, which fails for our
# models (opset 13, 7: "No Adapter From Version 15 for Shape"); up to torch/onnx/_constants.py
# ONNX_MAX_OPSET (23). tests/test_hostile.py checks both against the installed torch.
ONNX_OPSETS: tuple[int, int] = (18, 23)

# MLflow refuses longer experiment names (mlflow.utils.validation.MAX_EXPERIMENT_NAME_LENGTH, which
# tests/test_hostile.py checks); the CLI refuses them first, before any store is opened.
MAX_EXPERIMENT_NAME_LENGTH = 500

DATA_DIR_ENV = "PIPELINE_DATA_DIR"
DOWNLOAD_TIMEOUT_S = 30.0  # seconds to wait for a network source
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "fashion-mnist"

# A running stage refreshes its run's heartbeat tag this often; `pipeline runs --stale` calls a
# RUNNING run stale when its heartbeat is older than STALE_AFTER_S (or its process is gone).
HEARTBEAT_INTERVAL_S = 30.0
STALE_AFTER_S = 300.0


def project_root() -> Path:
    """The checkout this package was installed from (editable), else the working directory.

    Runs from `pipeline ...`, `make` and `mlflow run .` must all land in one store, so
    paths are anchored to the project, not to wherever the command happened to start.
    """
    candidate = Path(__file__).resolve().parent.parent
    if (candidate / "MLproject").is_file():
        return candidate
    return Path.cwd()


def project_store() -> Path:
    """The project's tracking store: MLflow's own default (sqlite:///mlflow.db at the root), so `mlflow run`,
    `mlflow ui` and `pipeline` started from the root with nothing exported all use one store."""
    return project_root() / "mlflow.db"


def artifact_root(database: Path) -> Path:
    """Where a sqlite store's artifacts go: mlruns/ beside the database, as MLflow's own default has them."""
    return database.parent / "mlruns"


def default_data_dir() -> Path:
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else project_root() / "data"


def class_metric_name(class_name: str) -> str:
    """The metric of one class's test accuracy: 'Ankle boot' -> 'test_accuracy_ankle_boot'."""
    return f"test_accuracy_{slug(class_name)}"


def slug(name: str) -> str:
    """'Ankle boot' -> 'ankle_boot', 'T-shirt/top' -> 't_shirt_top': safe in metric names."""
    out = "".join(ch.lower() if ch.isalnum() else "_" for ch in name)
    return "_".join(part for part in out.split("_") if part)


@dataclass
class TrainConfig:
    model: str = "cnn"
    epochs: int = 5
    batch_size: int = 100
    lr: float = 0.001
    seed: int = 0
    data_dir: Path = field(default_factory=default_data_dir)
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    device: str = "auto"  # auto | cpu | cuda
    # Measured (`pipeline bench`): 100-200 images per pass stay in cache; 1,000 is ~1.5x slower.
    eval_batch_size: int = 200
    log_every: int = 50  # steps between loss reports to callbacks
    # Speed levers (measured by `pipeline bench`). channels_last only changes the memory layout
    # of conv activations. bf16 runs the forward/backward matmuls and convs under autocast in
    # bfloat16 while weights and the optimizer stay float32; "auto" uses it only where the
    # hardware computes bf16 natively (there it roughly doubles CNN training speed at the same
    # accuracy), and fp32 elsewhere, where emulated bf16 would be slower. On a GPU without
    # bf16, auto picks fp16 autocast with a gradient scaler.
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool = True
    # torch.compile (inductor) for the training forward and backward; evaluation stays eager.
    # Off by default: on every CPU `pipeline bench` has measured, its kernels for batch norm,
    # ReLU and pooling were slower than eager's oneDNN ones (docs/performance.md).
    compile: bool = False
    # Train on files whose SHA-256 differs from Fashion-MNIST's (own data in the same IDX format).
    allow_other_data: bool = False
    # A resumable checkpoint is saved at the end of every epoch, and also every N steps if > 0.
    checkpoint_every: int = 0
    # CPU, memory (and GPU) use sampled into the run by MLflow while it trains, as system/* metrics.
    system_metrics: bool = True
    # Distributed runs (torchrun): batch_size is the global batch, split over the ranks, so the
    # recipe means the same at any world size; True makes it the batch of each rank instead.
    per_rank_batch: bool = False
    # The recipe beyond the chapter's. These defaults are the chapter's own training (Adam at a
    # constant lr, plain cross-entropy, no augmentation), so a run that sets none of them is
    # the same run, step for step, as before they existed.
    optimizer: str = "adam"  # adam | adamw | sgd (with momentum)
    weight_decay: float = 0.0  # decoupled for adamw, L2 for adam and sgd
    momentum: float = 0.9  # sgd only
    schedule: str = "constant"  # constant | onecycle (lr is then the peak)
    warmup_fraction: float = 0.25  # onecycle: share of the steps spent rising to the peak
    label_smoothing: float = 0.0
    crop_pad: int = 0  # random crop: shift each training image by up to this many pixels (0: off)
    hflip: bool = False  # flip half the training images left-right
    val_size: int = 0  # hold out the LAST val_size training images for validation (0: none)
    test_eval: str = "epoch"  # epoch | end | never

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("test_eval", TEST_EVALS)):
            if getattr(self, name) not in choices:
                raise PipelineError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("weight_decay", "crop_pad", "val_size"):
            if getattr(self, name) < 0:
                raise PipelineError(f"{name} must not be negative, got {getattr(self, name)}")
        if not math.isfinite(self.weight_decay):  # nan passes `< 0`: test what we want
            raise PipelineError(f"weight_decay must be a finite number, got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise PipelineError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.warmup_fraction < 1:
            raise PipelineError(f"warmup_fraction must be in (0, 1), got {self.warmup_fraction}")
        if not 0 <= self.momentum < 1:
            raise PipelineError(f"momentum must be in [0, 1), got {self.momentum}")
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise PipelineError(f"checkpoint_every must be 0 (epoch ends only) or more, got {self.checkpoint_every}")
        if self.max_steps is not None and self.max_steps < 1:
            raise PipelineError(f"max_steps must be at least 1, got {self.max_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):  # `nan <= 0` is False: test what we want
            raise PipelineError(f"lr must be a finite number above 0, got {self.lr}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise PipelineError(f"seed must be in {SEED_RANGE[0]}..{SEED_RANGE[1]}, got {self.seed}")
        if self.precision not in PRECISIONS:
            raise PipelineError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def train_config_from_params(params: dict[str, str], **overrides) -> TrainConfig:
    """The settings a run was trained with, rebuilt from its logged params (strings), to resume it.

    device and precision come back resolved (cpu, bf16), as the run logged them, so a resumed
    run computes exactly as before. Params a run lacks keep their defaults.
    """
    values = {}
    for f in fields(TrainConfig):
        if f.name in overrides or f.name not in params:
            continue
        text = params[f.name]
        if f.name == "optimizer":  # logged by its display name (the chapter's "Adam")
            text = text.lower()
        if f.type == "int | None":  # max_steps: `mlflow run` logs its "0" (no limit) before train can
            values[f.name] = None if text in ("None", "0") else int(text)
        elif f.type == "bool":
            values[f.name] = text.lower() == "true"
        elif f.type in ("int", "float"):
            values[f.name] = int(text) if f.type == "int" else float(text)
        else:
            values[f.name] = text
    return TrainConfig(**values, **overrides)


# Each model's own training recipe: the TrainConfig fields it sets differently from the defaults
# above, which are the chapter's recipe for its dnn and cnn. Chosen on the validation split
# (docs/recipe.md); an option the user gives always wins over the recipe.
RECIPES: dict[str, dict[str, Any]] = {
    # Batch 256 runs more images a second than 100, so 7 epochs of it train in about the time of
    # the chapter CNN's 5; 6 reached 0.1 point less, 8 no more. Horizontal flips added 0.36 points
    # of validation accuracy over 3 seeds at no cost in time, random crops cost accuracy in a
    # schedule this short. The test set is evaluated once, at the end: each evaluation is two
    # forward passes (the model's flip averaging, pipeline/models.py), and seven of them would
    # cost a sixth of the training's time; --val-size gives a curve per epoch.
    "cnn_plus": {
        "epochs": 7,
        "test_eval": "end",
        "batch_size": 256,
        "hflip": True,
        "optimizer": "adamw",
        "lr": 0.006,
        "weight_decay": 0.05,
        "schedule": "onecycle",
        "label_smoothing": 0.1,
    },
}


# A recipe's epochs on a CPU that computes bf16 only in emulation (no AVX512-BF16, no AMX: most
# AVX2 CPUs). There `--precision auto` trains in fp32, where batch 256 gains less over the chapter's
# batch 100 than in bf16: the recipe's 7 epochs ran over the chapter CNN's 5-epoch time, and 6
# stayed under it (docs/recipe.md, "On a CPU without native bf16").
EPOCHS_WITHOUT_NATIVE_BF16: dict[str, int] = {"cnn_plus": 6}


def native_bf16_or_gpu(device: str) -> bool:
    """Whether a training on `device` (auto | cpu | cuda) runs on a CPU that computes bf16 natively,
    or on a GPU: where a recipe's epochs were timed."""
    if device == "cuda" or hardware.cpu_features().native_bf16:
        return True
    if device == "cpu":
        return False
    import torch  # device auto: a GPU, if torch sees one (only this case needs torch)

    return torch.cuda.is_available()


def train_config(model: str, **given: Any) -> TrainConfig:
    """The TrainConfig for `model`: the defaults, then the model's recipe, then what was `given`.

    A `given` value of None means "not set" (a CLI option left out), so the recipe applies; its
    epochs follow the CPU (EPOCHS_WITHOUT_NATIVE_BF16).
    """
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(given) - known
    if unknown:
        raise TypeError(f"unknown TrainConfig fields: {', '.join(sorted(unknown))}")
    chosen = {**RECIPES.get(model, {}), **{k: v for k, v in given.items() if v is not None}}
    if given.get("epochs") is None and model in EPOCHS_WITHOUT_NATIVE_BF16:
        if not native_bf16_or_gpu(chosen.get("device", TrainConfig.device)):
            chosen["epochs"] = EPOCHS_WITHOUT_NATIVE_BF16[model]
    return TrainConfig(model=model, **chosen)
