"""The optimizer and learning-rate schedule a TrainConfig names.

The defaults (Adam, constant lr, no weight decay) build exactly the chapter's optimizer, so
runs that ask for nothing else repeat as before.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from pipeline.config import TrainConfig

# How each optimizer is named in a run's params (the chapter's is "Adam").
DISPLAY_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}


def build_optimizer(config: TrainConfig, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    # fused: one kernel for the whole update instead of a few per parameter tensor.
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    return torch.optim.SGD(
        parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True, fused=True
    )


START, END = 1 / 25, 1e-4  # of the peak lr: OneCycleLR's 1/div_factor and 1/(div_factor * final_div_factor)


def one_cycle(step: int, total_steps: int, warmup_fraction: float) -> float:
    """The one-cycle multiplier of the peak lr at `step`: a linear rise from 1/25 over the warm-up,
    then a cosine anneal to 1/10,000 at the last step (the shape of torch's OneCycleLR, which
    divides by zero on schedules of a few steps)."""
    warmup = max(1, round(warmup_fraction * total_steps))
    if step < warmup:
        return START + (1 - START) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return END + (1 - END) * 0.5 * (1 + math.cos(math.pi * progress))


def build_schedule(
    config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """None for a constant lr; onecycle is stepped once per optimizer step (see `one_cycle`)."""
    if config.schedule == "constant":
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: one_cycle(step, total_steps, config.warmup_fraction)
    )
