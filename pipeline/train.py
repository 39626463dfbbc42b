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

from pipeline.callbacks import TrainCallback
from pipeline.config import CLASS_NAMES, default_data_dir
from pipeline.data import load_split
from pipeline.errors import PipelineError
from pipeline.evaluate import compute_logits, images_to_tensor, loss_and_accuracy
from pipeline.models import build_model, count_parameters, model_class


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
    # accuracy), and fp32 elsewhere, where emulated bf16 would be slower.
    precision: str = "auto"  # auto | fp32 | bf16
    channels_last: bool = True

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise PipelineError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.lr <= 0:
            raise PipelineError(f"lr must be positive, got {self.lr}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise PipelineError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


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
    if choice == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return choice


def library_versions() -> dict[str, str]:
    return {"torch_version": torch.__version__, "numpy_version": np.__version__}


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator, steps: int) -> list[torch.Tensor]:
    """Index tensors for one epoch's first `steps` batches, in a fresh random order."""
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))[:steps]


def train(config: TrainConfig, callbacks: list[TrainCallback] = ()) -> TrainResult:
    device = resolve_device(config.device)
    model_class(config.model)  # fail on a bad name before loading data
    train_split = load_split(config.data_dir, "train")
    test_split = load_split(config.data_dir, "test")

    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    # fused: one kernel for the whole Adam update instead of a few per parameter tensor.
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    precision = resolve_precision(config.precision, device)
    shuffle = torch.Generator().manual_seed(config.seed)

    # Decoded once; every batch below is an index into these tensors.
    train_x = images_to_tensor(train_split.images, device)
    train_y = torch.from_numpy(train_split.labels).to(device)
    test_x = images_to_tensor(test_split.images, device)
    test_y = torch.from_numpy(test_split.labels).to(device)

    steps_per_epoch = -(-len(train_y) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    params = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "device": str(device),
        "precision": precision,
        "optimizer": "Adam",
        "loss": "cross_entropy",
        "num_parameters": count_parameters(model),
        "train_size": len(train_y),
        "test_size": len(test_y),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "num_threads": torch.get_num_threads(),
        "class_names": list(CLASS_NAMES),
        **library_versions(),
        **{f"sha256_{name}": digest for name, digest in {**train_split.digests, **test_split.digests}.items()},
    }
    for cb in callbacks:
        cb.on_train_start(params)

    history: list[dict[str, float]] = []
    step, train_seconds, images_seen = 0, 0.0, 0
    started = time.perf_counter()
    epoch = 0
    while step < total_steps:
        epoch += 1
        model.train()
        steps_this_epoch = min(steps_per_epoch, total_steps - step)
        for cb in callbacks:
            cb.on_epoch_start(epoch, steps_this_epoch)
        epoch_loss, window_loss, window_steps = 0.0, 0.0, 0
        tick = time.perf_counter()
        for index in shuffled_batches(len(train_y), config.batch_size, shuffle, steps_this_epoch):
            index = index.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(train_x[index].contiguous(memory_format=layout))
            loss = F.cross_entropy(logits.float(), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            images_seen += len(index)
            loss_value = loss.item()
            epoch_loss += loss_value
            window_loss += loss_value
            window_steps += 1
            for cb in callbacks:
                cb.on_step(step, loss_value, len(index))
            if step % config.log_every == 0:
                for cb in callbacks:
                    cb.on_log(step, {"train_loss_step": window_loss / window_steps})
                window_loss, window_steps = 0.0, 0
        train_seconds += time.perf_counter() - tick

        metrics = {
            "train_loss": epoch_loss / steps_this_epoch,
            **loss_and_accuracy(compute_logits(model, test_x, config.eval_batch_size), test_y),
        }
        history.append({"epoch": epoch, "step": step, **metrics})
        for cb in callbacks:
            cb.on_epoch_end(epoch, step, metrics)

    wall = time.perf_counter() - started
    final = {
        **{k: v for k, v in history[-1].items() if k not in ("epoch", "step")},
        "steps": step,
        "epochs_completed": epoch,
        "wall_time_s": wall,
        "train_time_s": train_seconds,
        "train_images_per_s": images_seen / train_seconds if train_seconds else 0.0,
    }
    example = test_x[:2].cpu().numpy()
    result = TrainResult(model=model, params=params, metrics=final, history=history, example_input=example)
    for cb in callbacks:
        cb.on_train_end(result)
    return result
