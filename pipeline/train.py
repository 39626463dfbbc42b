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
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import distributed, hardware, signals
from pipeline.augment import augment_batch
from pipeline.callbacks import TrainCallback, TrainResult
from pipeline.config import CLASS_NAMES, TrainConfig
from pipeline.data import check_known, images_to_fit, load_split
from pipeline.errors import PipelineError
from pipeline.evaluate import compute_logits, images_to_tensor, loss_and_accuracy
from pipeline.models import build_model, count_parameters, model_class
from pipeline.optim import DISPLAY_NAMES, build_optimizer, build_schedule
from pipeline.provenance import git_commit, library_versions


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
    """auto: bf16 where the hardware has it; else fp16 (with a gradient scaler) on a GPU, fp32 on a CPU."""
    if choice == "auto":
        if native_bf16(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    return choice


# The dtype each mixed precision runs the forward pass in; fp32 runs without autocast.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# A model with `initialise_from(images)` (cnn_plus) starts from statistics of the first training
# images, this many (as scripts/ablation.py measured it).
INITIALISING_IMAGES = 10_000


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator, steps: int) -> list[torch.Tensor]:
    """Index tensors for one epoch's first `steps` batches, in a fresh random order."""
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))[:steps]


@dataclass
class Trainer:
    """Everything a training run holds between steps: built once by `setup`, advanced by `run_epoch`.

    `capture_state` and `restore_state` turn it into a checkpoint and back, so a run killed at
    any checkpoint continues to exactly the result it would have reached.
    """

    config: TrainConfig
    model: nn.Module
    # What the training step calls: `model` itself, or its torch.compile'd wrapper (--compile).
    # Evaluation, checkpoints and export always use `model`.
    forward: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str  # resolved: fp32, bf16 or fp16
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
    earlier_seconds: float = 0.0  # wall time spent by the processes before a resume
    started: float = field(default_factory=time.perf_counter)  # when this process began training
    history: list[dict[str, float]] = field(default_factory=list)
    # The epoch in progress. A mid-epoch checkpoint keeps the shuffle generator's state from the
    # epoch's start, so a resume draws the same order again and skips the steps already done.
    epoch_step: int = 0  # steps done in the current epoch; 0 between epochs
    epoch_shuffle: torch.Tensor | None = None
    epoch_loss: float = 0.0
    test_logits: torch.Tensor | None = None  # from the latest test evaluation
    val_logits: torch.Tensor | None = None  # from the latest validation evaluation
    window_loss: float = 0.0  # since the last on_log
    window_steps: int = 0
    world: distributed.World = field(default_factory=distributed.World)  # one process unless torchrun started it
    global_batch: int = 0  # images per optimizer step over all ranks (config.batch_size for one process)
    scaler: torch.amp.GradScaler | None = None  # fp16 only: scales the loss so small gradients survive

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps


def setup(config: TrainConfig, world: distributed.World | None = None) -> Trainer:
    """Decode the data once into tensors, build the model and optimizer, and record the run's params.

    Under torchrun (`world` from the environment by default) it also joins the process group
    and wraps the model in DistributedDataParallel.
    """
    world = distributed.World.from_env() if world is None else world
    device = distributed.local_device(resolve_device(config.device), world)
    model_class(config.model)  # fail on a bad name before loading data
    global_batch = distributed.global_batch_size(config.batch_size, world, config.per_rank_batch)
    train_split = load_split(config.data_dir, "train")
    # Before any run exists (train_model opens it after setup): a batch larger than the data fails here.
    fit = images_to_fit(len(train_split), config.val_size)
    distributed.check_batch_fits(global_batch, fit, world, config.per_rank_batch)
    # Only the test set's own final figure may see it: inside a tuning trial it is not loaded.
    test_split = load_split(config.data_dir, "test") if config.test_eval != "never" else None
    if not config.allow_other_data:
        check_known(train_split, config.data_dir)
        if test_split is not None:
            check_known(test_split, config.data_dir)
    digests = {**train_split.digests, **(test_split.digests if test_split else {})}
    world = distributed.init(world, device)

    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)
    for name, split in (("train", train_split), ("test", test_split)):  # before any run: no FAILED run
        if split is not None and tuple(split.images.shape[1:]) != tuple(model.input_shape[1:]):
            height, width = model.input_shape[1:]
            raise PipelineError(
                f"{config.data_dir}: the {name} images are {split.images.shape[1]}x{split.images.shape[2]}, "
                f"but the {config.model} model takes {height}x{width}; give --data-dir with {height}x{width} images"
            )
    initialise = getattr(model, "initialise_from", None)
    if initialise is not None:  # a model that starts from the training images (cnn_plus's first conv)
        initialise(images_to_tensor(train_split.images[: min(fit, INITIALISING_IMAGES)], device))
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = build_optimizer(config, model.parameters())
    precision = resolve_precision(config.precision, device)
    model = distributed.wrap(model, world, device)

    # Decoded once; every batch is an index into these tensors. The validation images are the
    # LAST val_size of the training file, so a split is the same whatever the seed.
    train_x = images_to_tensor(train_split.images[:fit], device)
    train_y = torch.from_numpy(train_split.labels[:fit]).to(device)
    val_x = images_to_tensor(train_split.images[fit:], device) if config.val_size else None
    val_y = torch.from_numpy(train_split.labels[fit:]).to(device) if config.val_size else None
    test_x = images_to_tensor(test_split.images, device) if test_split else None
    test_y = torch.from_numpy(test_split.labels).to(device) if test_split else None

    steps_per_epoch = -(-len(train_y) // global_batch)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    params = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "device": str(device),
        "precision": precision,
        "optimizer": DISPLAY_NAMES[config.optimizer],
        "loss": "cross_entropy",
        "num_parameters": count_parameters(distributed.unwrap(model)),
        "train_size": len(train_y),
        "test_size": len(test_y) if test_y is not None else 0,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "num_threads": torch.get_num_threads(),
        **(distributed_params(world, global_batch) if world.distributed else {}),
        "class_names": list(CLASS_NAMES),
        **library_versions(),
        "git_commit": git_commit(),
        **{f"sha256_{name}": digest for name, digest in digests.items()},
    }
    return Trainer(
        config=config,
        model=model,
        forward=compiled(model) if config.compile else model,
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
        world=world,
        global_batch=global_batch,
        scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,
        schedule=build_schedule(config, optimizer, total_steps),
        # Its own stream, seeded apart from the shuffle's, so turning augmentation on or off
        # leaves the batch order of a seed unchanged.
        augment=torch.Generator().manual_seed(config.seed + 1) if config.crop_pad or config.hflip else None,
        val_x=val_x,
        val_y=val_y,
    )


# torch.compile's on-disk cache (inductor's FX graphs and AOTAutograd's), which lets a second run
# skip most of the compile.
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_cache_dir() -> Path:
    """Where torch.compile caches: $TORCHINDUCTOR_CACHE_DIR if the user set it, else ~/.cache
    (torch's default in /tmp is emptied by a reboot).

    Under the AVX2 cap the cache is a separate folder: inductor's cache key leaves the cap out, and
    kernels compiled for the full CPU, served to a capped process, computed garbage (seen with
    torch 2.14.1: out-of-range indices in max-pool's backward).
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Importing parts of torch (the fused optimizers do) writes torch's default into the
    # environment, so "set" alone doesn't tell the user's choice from torch's.
    given = os.environ.get(INDUCTOR_CACHE_ENV)
    if given and os.path.abspath(given) != os.path.abspath(default_cache_dir()):
        return Path(given)
    capability = os.environ.get("ATEN_CPU_CAPABILITY")  # set by hardware.limit_to_avx2
    name = f"torchinductor-{capability.lower()}" if capability else "torchinductor"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fashion-pipeline" / name


def compiled(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` under torch.compile (inductor), compiled on its first call, cached on disk."""
    os.environ[INDUCTOR_CACHE_ENV] = str(compile_cache_dir())
    return torch.compile(model)


def distributed_params(world: distributed.World, global_batch: int) -> dict[str, Any]:
    return {
        "world_size": world.size,
        "backend": world.backend,
        "global_batch_size": global_batch,
        "rank_batch_size": global_batch // world.size,  # the largest shard is one more when it doesn't divide
    }


def optimizer_step(t: Trainer, loss: torch.Tensor) -> None:
    """Backward and update, then the lr schedule; with fp16 through the gradient scaler, which
    skips steps with inf/NaN gradients."""
    t.optimizer.zero_grad(set_to_none=True)
    if t.scaler is None:
        loss.backward()
        t.optimizer.step()
    else:
        t.scaler.scale(loss).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
    if t.schedule is not None:
        t.schedule.step()


def run_epoch(t: Trainer, callbacks: list[TrainCallback] = ()) -> dict[str, float]:
    """One epoch (or what is left of it, or of max_steps), then the evaluations (validation, test)
    it calls for.

    Calls on_checkpoint every `checkpoint_every` steps within the epoch and once at its end.
    Returns the epoch's metrics.
    """
    config, model = t.config, t.model
    if t.epoch_step == 0:
        t.epoch += 1
        t.epoch_shuffle = t.shuffle.get_state()
        t.epoch_loss, t.window_loss, t.window_steps = 0.0, 0.0, 0
    else:  # resumed mid-epoch: the epoch's order again, from the generator state it was drawn with
        t.shuffle.set_state(t.epoch_shuffle)
    model.train()
    steps_this_epoch = min(t.steps_per_epoch, t.total_steps - (t.step - t.epoch_step))
    for cb in callbacks:
        cb.on_epoch_start(t.epoch, steps_this_epoch - t.epoch_step)
    batches = shuffled_batches(len(t.train_y), t.global_batch, t.shuffle, steps_this_epoch)
    autocast_dtype = AUTOCAST_DTYPES.get(t.precision, torch.bfloat16)
    tick = time.perf_counter()
    for batch in batches[t.epoch_step :]:
        signals.raise_if_received()  # a SIGTERM whose exception some library swallowed still stops training
        # Every rank draws the same global batch (same seed, same epoch) and trains its own shard.
        index = distributed.shard(batch, t.world).to(t.device)
        images = t.train_x[index]
        if t.augment is not None:
            images = augment_batch(images, config.crop_pad, config.hflip, t.augment)
        with torch.autocast(t.device.type, dtype=autocast_dtype, enabled=t.precision in AUTOCAST_DTYPES):
            logits = t.forward(images.contiguous(memory_format=t.layout))
        loss = F.cross_entropy(logits.float(), t.train_y[index], label_smoothing=config.label_smoothing)
        if t.world.distributed:
            # DDP averages the ranks' gradients; weighting each shard by its size makes that the
            # gradient of the whole batch's mean loss even when the batch doesn't split evenly.
            loss = loss * (len(index) * t.world.size / len(batch))
        optimizer_step(t, loss)
        t.step += 1
        t.epoch_step += 1
        t.images_seen += len(index)
        loss_value = distributed.mean(loss.detach(), t.world)  # the same on every rank: they stop together
        if not math.isfinite(loss_value):
            raise PipelineError(
                f"training diverged: the loss is {loss_value} at step {t.step}; lower the learning rate "
                f"(--lr, now {config.lr})"
            )
        t.epoch_loss += loss_value
        t.window_loss += loss_value
        t.window_steps += 1
        for cb in callbacks:
            cb.on_step(t.step, loss_value, len(batch))
        if t.step % config.log_every == 0:
            for cb in callbacks:
                cb.on_log(t.step, {"train_loss_step": t.window_loss / t.window_steps})
            t.window_loss, t.window_steps = 0.0, 0
        # The epoch's last step is checkpointed after its evaluation, below.
        if config.checkpoint_every and t.step % config.checkpoint_every == 0 and t.epoch_step < steps_this_epoch:
            t.train_seconds += time.perf_counter() - tick
            checkpoint(t, callbacks)
            tick = time.perf_counter()
    t.train_seconds += time.perf_counter() - tick

    metrics = {"train_loss": t.epoch_loss / steps_this_epoch}
    if t.world.is_main:  # evaluated once, by rank 0, not once per rank
        evaluated = distributed.unwrap(model)
        if t.val_x is not None:
            t.val_logits = compute_logits(evaluated, t.val_x, config.eval_batch_size)
            metrics.update(loss_and_accuracy(t.val_logits, t.val_y, "val"))
        if config.test_eval == "epoch" or (config.test_eval == "end" and t.done):
            t.test_logits = compute_logits(evaluated, t.test_x, config.eval_batch_size)
            metrics.update(loss_and_accuracy(t.test_logits, t.test_y))
    t.epoch_step = 0
    t.history.append({"epoch": t.epoch, "step": t.step, **metrics})
    for cb in callbacks:
        cb.on_epoch_end(t.epoch, t.step, metrics)
    checkpoint(t, callbacks)
    distributed.barrier(t.world)  # the others wait here, not inside the next backward, so their timing stays clean
    return metrics


def checkpoint(t: Trainer, callbacks: list[TrainCallback]) -> None:
    if callbacks:
        state = capture_state(t)
        for cb in callbacks:
            cb.on_checkpoint(t.epoch, t.step, state)


def capture_state(t: Trainer) -> dict[str, Any]:
    """What a resume needs, as tensors and plain types (torch.load(weights_only=True) reads it back).

    The tensors are the live ones, not copies: save the state before training goes on.
    """
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    rng = {
        "torch": torch.get_rng_state(),
        "numpy": (np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
        "python": random.getstate(),
        "shuffle": t.shuffle.get_state(),
        "epoch_shuffle": t.epoch_shuffle,
    }
    if t.augment is not None:
        rng["augment"] = t.augment.get_state()
    if t.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(t.device)
    return {
        "model_name": t.config.model,
        "total_steps": t.total_steps,
        "model": distributed.unwrap(t.model).state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "schedule": t.schedule.state_dict() if t.schedule is not None else None,
        "rng": rng,
        "step": t.step,
        "epoch": t.epoch,
        "epoch_step": t.epoch_step,
        "epoch_loss": t.epoch_loss,
        "window_loss": t.window_loss,
        "window_steps": t.window_steps,
        "images_seen": t.images_seen,
        "train_seconds": t.train_seconds,
        "elapsed_seconds": t.earlier_seconds + time.perf_counter() - t.started,
        "history": [dict(row) for row in t.history],
    }


def restore_state(t: Trainer, state: dict[str, Any]) -> None:
    """Put a fresh `setup` back where `capture_state` was taken: weights, optimizer, counters, every RNG."""
    if state["model_name"] != t.config.model or state["total_steps"] != t.total_steps:
        raise PipelineError(
            f"the checkpoint is of a {state['model_name']} run of {state['total_steps']} steps, "
            f"not of this {t.config.model} run of {t.total_steps} steps"
        )
    distributed.unwrap(t.model).load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    if t.schedule is not None:
        t.schedule.load_state_dict(state["schedule"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = rng["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    random.setstate(rng["python"])
    t.shuffle.set_state(rng["shuffle"])
    t.epoch_shuffle = rng["epoch_shuffle"]
    if t.augment is not None:
        t.augment.set_state(rng["augment"])
    if "cuda" in rng and t.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], t.device)
    for name in ("step", "epoch", "epoch_step", "epoch_loss", "window_loss", "window_steps", "images_seen"):
        setattr(t, name, state[name])
    t.train_seconds = state["train_seconds"]
    t.earlier_seconds = state["elapsed_seconds"]
    t.history = [dict(row) for row in state["history"]]


def fit(t: Trainer, callbacks: list[TrainCallback] = ()) -> TrainResult:
    """Epochs until done, from wherever `t` stands (fresh, or restored from a checkpoint)."""
    for cb in callbacks:
        cb.on_train_start(t.params)
    t.started = time.perf_counter()
    while not t.done:
        run_epoch(t, callbacks)
    final = {
        **{k: v for k, v in t.history[-1].items() if k not in ("epoch", "step")},
        "steps": t.step,
        "epochs_completed": t.epoch,
        "wall_time_s": t.earlier_seconds + time.perf_counter() - t.started,
        "train_time_s": t.train_seconds,
        "train_images_per_s": t.images_seen / t.train_seconds if t.train_seconds else 0.0,
    }
    if t.world.distributed:
        final.update(rank_throughput(t))
        # DDP's reducer holds the process group: drop the wrapper first, so that the group's gloo
        # threads are joined in shutdown() and not during interpreter exit, where they can abort a rank.
        t.model = distributed.unwrap(t.model)
        distributed.shutdown(t.world)
    example = next(x for x in (t.test_x, t.val_x, t.train_x) if x is not None)[:2].cpu().numpy()
    model = distributed.unwrap(t.model)
    # Only if the test set was evaluated after the last step: an earlier evaluation saw an earlier model.
    evaluated_last = t.test_logits is not None and t.history[-1]["step"] == t.step and "test_accuracy" in t.history[-1]
    result = TrainResult(
        model=model,
        params=t.params,
        metrics=final,
        history=t.history,
        example_input=example,
        test_logits=t.test_logits.cpu() if evaluated_last else None,
        val_logits=t.val_logits.cpu() if t.val_logits is not None and "val_accuracy" in t.history[-1] else None,
    )
    for cb in callbacks:
        cb.on_train_end(result)
    return result


def rank_throughput(t: Trainer) -> dict[str, float]:
    """Images/s of every rank, and of the whole job: all ranks' images over the slowest rank's time."""
    images = distributed.gather(float(t.images_seen), t.world, t.device)
    seconds = distributed.gather(t.train_seconds, t.world, t.device)
    rates = [n / s if s else 0.0 for n, s in zip(images, seconds, strict=True)]
    per_rank = {f"train_images_per_s_rank{rank}": rate for rank, rate in enumerate(rates)}
    return {**per_rank, "train_images_per_s": sum(images) / max(seconds) if max(seconds) else 0.0}


def train(config: TrainConfig, callbacks: list[TrainCallback] = ()) -> TrainResult:
    """The whole run: setup, epochs until done, and the result with its final metrics."""
    return fit(setup(config), callbacks)
