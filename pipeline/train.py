"""Training: the chapter's recipe (Adam, cross-entropy, batch 100, 5 epochs), done right.

Fixes over listings 5-8/5-11: batches are shuffled; the data is decoded once into tensors
and batches are index slices (no per-sample PIL/ToTensor); evaluation runs once per epoch
in eval() mode without gradients. `train` returns its metrics and reports progress through
callbacks, so it runs the same with MLflow on, off, or pointed at a temporary store.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import distributed
from pipeline.callbacks import TrainCallback
from pipeline.config import CLASS_NAMES, TrainConfig
from pipeline.data import load_split
from pipeline.errors import PipelineError
from pipeline.evaluate import compute_logits, images_to_tensor, loss_and_accuracy
from pipeline.models import build_model, count_parameters, model_class


@dataclass
class TrainResult:
    model: nn.Module
    params: dict[str, Any]
    metrics: dict[str, float]  # final: test_accuracy, test_loss, train_loss, wall_time_s, ...
    history: list[dict[str, float]]  # one row per evaluation (epoch end, or max-steps end)
    example_input: np.ndarray  # two test images, float32 (2, 1, 28, 28): for model signatures


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
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def resolve_precision(choice: str, device: torch.device) -> str:
    """auto: bf16 where the hardware has it; else fp16 (with a gradient scaler) on a GPU, fp32 on a CPU."""
    if choice == "auto":
        if native_bf16(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    return choice


# The dtype each mixed precision runs the forward pass in; fp32 runs without autocast.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    precision: str  # resolved: fp32, bf16 or fp16
    layout: torch.memory_format
    shuffle: torch.Generator  # draws each epoch's order; seeded, so a run repeats exactly
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    steps_per_epoch: int
    total_steps: int
    params: dict[str, Any]
    step: int = 0
    epoch: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
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
    world = distributed.init(world, device)
    train_split = load_split(config.data_dir, "train")
    test_split = load_split(config.data_dir, "test")

    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    # fused: one kernel for the whole Adam update instead of a few per parameter tensor.
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    precision = resolve_precision(config.precision, device)
    model = distributed.wrap(model, world, device)

    # Decoded once; every batch is an index into these tensors.
    train_x = images_to_tensor(train_split.images, device)
    train_y = torch.from_numpy(train_split.labels).to(device)
    test_x = images_to_tensor(test_split.images, device)
    test_y = torch.from_numpy(test_split.labels).to(device)

    steps_per_epoch = -(-len(train_y) // global_batch)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    params = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "device": str(device),
        "precision": precision,
        "optimizer": "Adam",
        "loss": "cross_entropy",
        "num_parameters": count_parameters(distributed.unwrap(model)),
        "train_size": len(train_y),
        "test_size": len(test_y),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "num_threads": torch.get_num_threads(),
        "world_size": world.size,
        **(distributed_params(world, global_batch) if world.distributed else {}),
        "class_names": list(CLASS_NAMES),
        **library_versions(),
        **{f"sha256_{name}": digest for name, digest in {**train_split.digests, **test_split.digests}.items()},
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
        world=world,
        global_batch=global_batch,
        scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,
    )


def distributed_params(world: distributed.World, global_batch: int) -> dict[str, Any]:
    return {
        "backend": world.backend,
        "global_batch_size": global_batch,
        "rank_batch_size": global_batch // world.size,  # the largest shard is one more when it doesn't divide
    }


def optimizer_step(t: Trainer, loss: torch.Tensor) -> None:
    """Backward and update; with fp16 through the gradient scaler, which skips steps with inf/NaN gradients."""
    t.optimizer.zero_grad(set_to_none=True)
    if t.scaler is None:
        loss.backward()
        t.optimizer.step()
        return
    t.scaler.scale(loss).backward()
    t.scaler.step(t.optimizer)
    t.scaler.update()


def run_epoch(t: Trainer, callbacks: list[TrainCallback] = ()) -> dict[str, float]:
    """One epoch (or what is left of max_steps), then one evaluation on the test set; returns its metrics."""
    config, model = t.config, t.model
    t.epoch += 1
    model.train()
    steps_this_epoch = min(t.steps_per_epoch, t.total_steps - t.step)
    for cb in callbacks:
        cb.on_epoch_start(t.epoch, steps_this_epoch)
    epoch_loss, window_loss, window_steps = 0.0, 0.0, 0
    tick = time.perf_counter()
    autocast_dtype = AUTOCAST_DTYPES.get(t.precision, torch.bfloat16)
    for batch in shuffled_batches(len(t.train_y), t.global_batch, t.shuffle, steps_this_epoch):
        # Every rank draws the same global batch (same seed, same epoch) and trains its own shard.
        index = distributed.shard(batch, t.world).to(t.device)
        with torch.autocast(t.device.type, dtype=autocast_dtype, enabled=t.precision in AUTOCAST_DTYPES):
            logits = model(t.train_x[index].contiguous(memory_format=t.layout))
        loss = F.cross_entropy(logits.float(), t.train_y[index])
        if t.world.distributed:
            # DDP averages the ranks' gradients; weighting each shard by its size makes that the
            # gradient of the whole batch's mean loss even when the batch doesn't split evenly.
            loss = loss * (len(index) * t.world.size / len(batch))
        optimizer_step(t, loss)
        t.step += 1
        t.images_seen += len(index)
        loss_value = distributed.mean(loss.detach(), t.world)
        epoch_loss += loss_value
        window_loss += loss_value
        window_steps += 1
        for cb in callbacks:
            cb.on_step(t.step, loss_value, len(batch))
        if t.step % config.log_every == 0:
            for cb in callbacks:
                cb.on_log(t.step, {"train_loss_step": window_loss / window_steps})
            window_loss, window_steps = 0.0, 0
    t.train_seconds += time.perf_counter() - tick

    metrics = {"train_loss": epoch_loss / steps_this_epoch}
    if t.world.is_main:  # evaluated once, by rank 0, not once per rank
        evaluated = compute_logits(distributed.unwrap(model), t.test_x, config.eval_batch_size)
        metrics.update(loss_and_accuracy(evaluated, t.test_y))
    t.history.append({"epoch": t.epoch, "step": t.step, **metrics})
    for cb in callbacks:
        cb.on_epoch_end(t.epoch, t.step, metrics)
    distributed.barrier(t.world)  # the others wait here, not inside the next backward, so their timing stays clean
    return metrics


def train(config: TrainConfig, callbacks: list[TrainCallback] = ()) -> TrainResult:
    """The whole run: setup, epochs until done, and the result with its final metrics."""
    t = setup(config)
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
    if t.world.distributed:
        final.update(rank_throughput(t))
        distributed.shutdown(t.world)
    example = t.test_x[:2].cpu().numpy()
    model = distributed.unwrap(t.model)
    result = TrainResult(model=model, params=t.params, metrics=final, history=t.history, example_input=example)
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
