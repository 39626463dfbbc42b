"""Training: the chapter's recipe (Adam, cross-entropy, batch 100, 5 epochs), done right.

Fixes over listings 5-8/5-11: batches are shuffled; the data is decoded once into tensors
and batches are index slices (no per-sample PIL/ToTensor); evaluation runs once per epoch
in eval() mode without gradients. `train` returns its metrics and reports progress through
callbacks, so it runs the same with MLflow on, off, or pointed at a temporary store.

A model's own recipe (config.RECIPES) may add an optimizer and schedule (optim.py), label
smoothing, batch augmentation (augment.py) and a validation split: the last `val_size`
training images, evaluated every epoch beside (or, in tuning, instead of) the test set.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import hardware
from pipeline.augment import augment_batch
from pipeline.callbacks import TrainCallback
from pipeline.config import CLASS_NAMES, TrainConfig
from pipeline.data import check_known, load_split
from pipeline.errors import PipelineError
from pipeline.evaluate import compute_logits, images_to_tensor, loss_and_accuracy
from pipeline.models import build_model, count_parameters, model_class
from pipeline.optim import DISPLAY_NAMES, build_optimizer, build_schedule


@dataclass
class TrainResult:
    model: nn.Module
    params: dict[str, Any]
    metrics: dict[str, float]  # final: test_accuracy, test_loss, [val_...], train_loss, wall_time_s, ...
    history: list[dict[str, float]]  # one row per evaluation (epoch end, or max-steps end)
    example_input: np.ndarray  # two test (else validation) images, float32 (2, 1, 28, 28): for model signatures


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    if choice not in ("cpu", "cuda"):
        raise PipelineError(f"unknown device {choice!r}; use auto, cpu or cuda")
    return torch.device(choice)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware (AVX512-BF16/AMX on x86, Ampere+ GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return hardware.cpu_features().native_bf16


def resolve_precision(choice: str, device: torch.device) -> str:
    if choice == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return choice


def library_versions() -> dict[str, str]:
    return {"torch_version": torch.__version__, "numpy_version": np.__version__}


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator, steps: int) -> list[torch.Tensor]:
    """Index tensors for one epoch's first `steps` batches, in a fresh random order."""
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))[:steps]


@dataclass
class Trainer:
    """Everything a training run holds between epochs: built once by `setup`, advanced by `run_epoch`."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str  # resolved: fp32 or bf16
    layout: torch.memory_format
    shuffle: torch.Generator  # draws each epoch's order; seeded, so a run repeats exactly
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None  # None when config.test_eval is "never": the test set is not even loaded
    test_y: torch.Tensor | None
    steps_per_epoch: int
    total_steps: int
    params: dict[str, Any]
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None
    augment: torch.Generator | None = None  # draws crops and flips, apart from `shuffle`
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    step: int = 0
    epoch: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps


def setup(config: TrainConfig) -> Trainer:
    """Decode the data once into tensors, build the model and optimizer, and record the run's params."""
    device = resolve_device(config.device)
    model_class(config.model)  # fail on a bad name before loading data
    train_split = load_split(config.data_dir, "train")
    if config.val_size >= len(train_split):
        raise PipelineError(
            f"val_size {config.val_size:,} leaves no training images (the training split has {len(train_split):,})"
        )
    # Only the test set's own final figure may see it: inside a tuning trial it is not loaded.
    test_split = load_split(config.data_dir, "test") if config.test_eval != "never" else None
    if not config.allow_other_data:
        check_known(train_split, config.data_dir)
        if test_split is not None:
            check_known(test_split, config.data_dir)
    digests = {**train_split.digests, **(test_split.digests if test_split else {})}

    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = build_optimizer(config, model.parameters())
    precision = resolve_precision(config.precision, device)

    # Decoded once; every batch is an index into these tensors. The validation images are the
    # LAST val_size of the training file, so a split is the same whatever the seed.
    fit = len(train_split) - config.val_size
    train_x = images_to_tensor(train_split.images[:fit], device)
    train_y = torch.from_numpy(train_split.labels[:fit]).to(device)
    val_x = images_to_tensor(train_split.images[fit:], device) if config.val_size else None
    val_y = torch.from_numpy(train_split.labels[fit:]).to(device) if config.val_size else None
    test_x = images_to_tensor(test_split.images, device) if test_split else None
    test_y = torch.from_numpy(test_split.labels).to(device) if test_split else None

    steps_per_epoch = -(-len(train_y) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    params = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "device": str(device),
        "precision": precision,
        "optimizer": DISPLAY_NAMES[config.optimizer],
        "loss": "cross_entropy",
        "num_parameters": count_parameters(model),
        "train_size": len(train_y),
        "test_size": len(test_y) if test_y is not None else 0,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "num_threads": torch.get_num_threads(),
        "class_names": list(CLASS_NAMES),
        **library_versions(),
        **{f"sha256_{name}": digest for name, digest in digests.items()},
    }
    return Trainer(
        config=config,
        model=model,
        optimizer=optimizer,
        device=device,
        precision=precision,
        layout=layout,
        shuffle=torch.Generator().manual_seed(config.seed),
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        params=params,
        schedule=build_schedule(config, optimizer, total_steps),
        # Its own stream, seeded apart from the shuffle's, so turning augmentation on or off
        # leaves the batch order of a seed unchanged.
        augment=torch.Generator().manual_seed(config.seed + 1) if config.crop_pad or config.hflip else None,
        val_x=val_x,
        val_y=val_y,
    )


def run_epoch(t: Trainer, callbacks: list[TrainCallback] = ()) -> dict[str, float]:
    """One epoch (or what is left of max_steps), then the evaluations (validation, test) it calls for."""
    config, model = t.config, t.model
    t.epoch += 1
    model.train()
    steps_this_epoch = min(t.steps_per_epoch, t.total_steps - t.step)
    for cb in callbacks:
        cb.on_epoch_start(t.epoch, steps_this_epoch)
    epoch_loss, window_loss, window_steps = 0.0, 0.0, 0
    tick = time.perf_counter()
    for index in shuffled_batches(len(t.train_y), config.batch_size, t.shuffle, steps_this_epoch):
        index = index.to(t.device)
        images = t.train_x[index]
        if t.augment is not None:
            images = augment_batch(images, config.crop_pad, config.hflip, t.augment)
        with torch.autocast(t.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
            logits = model(images.contiguous(memory_format=t.layout))
        loss = F.cross_entropy(logits.float(), t.train_y[index], label_smoothing=config.label_smoothing)
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.optimizer.step()
        if t.schedule is not None:
            t.schedule.step()
        t.step += 1
        t.images_seen += len(index)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise PipelineError(
                f"training diverged: the loss is {loss_value} at step {t.step}; lower the learning rate "
                f"(--lr, now {config.lr})"
            )
        epoch_loss += loss_value
        window_loss += loss_value
        window_steps += 1
        for cb in callbacks:
            cb.on_step(t.step, loss_value, len(index))
        if t.step % config.log_every == 0:
            for cb in callbacks:
                cb.on_log(t.step, {"train_loss_step": window_loss / window_steps})
            window_loss, window_steps = 0.0, 0
    t.train_seconds += time.perf_counter() - tick

    metrics = {"train_loss": epoch_loss / steps_this_epoch}
    if t.val_x is not None:
        metrics.update(loss_and_accuracy(compute_logits(model, t.val_x, config.eval_batch_size), t.val_y, "val"))
    if config.test_eval == "epoch" or (config.test_eval == "end" and t.done):
        metrics.update(loss_and_accuracy(compute_logits(model, t.test_x, config.eval_batch_size), t.test_y))
    t.history.append({"epoch": t.epoch, "step": t.step, **metrics})
    for cb in callbacks:
        cb.on_epoch_end(t.epoch, t.step, metrics)
    return metrics


def train(config: TrainConfig, callbacks: list[TrainCallback] = ()) -> TrainResult:
    """The whole run: setup, epochs until done, and the result with its final metrics."""
    return fit(setup(config), callbacks)


def fit(t: Trainer, callbacks: list[TrainCallback] = ()) -> TrainResult:
    """Epochs from a `setup` until done, and the result with its final metrics."""
    for cb in callbacks:
        cb.on_train_start(t.params)
    started = time.perf_counter()
    while not t.done:
        run_epoch(t, callbacks)
    wall = time.perf_counter() - started
    final = {
        **{k: v for k, v in t.history[-1].items() if k not in ("epoch", "step")},
        "steps": t.step,
        "epochs_completed": t.epoch,
        "wall_time_s": wall,
        "train_time_s": t.train_seconds,
        "train_images_per_s": t.images_seen / t.train_seconds if t.train_seconds else 0.0,
    }
    example = next(x for x in (t.test_x, t.val_x, t.train_x) if x is not None)[:2].cpu().numpy()
    result = TrainResult(model=t.model, params=t.params, metrics=final, history=t.history, example_input=example)
    for cb in callbacks:
        cb.on_train_end(result)
    return result
