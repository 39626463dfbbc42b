"""The optimizer and learning-rate schedule a TrainConfig names.

The defaults (Adam, constant lr, no weight decay) build exactly the chapter's optimizer, so
runs that ask for nothing else repeat as before.
"""

from __future__ import annotations

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


def build_schedule(
    config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """None for a constant lr; onecycle rises to `lr` over warmup_fraction of the steps, then anneals
    (cosine) to lr/10,000, cycling momentum (Adam's beta1) inversely between 0.85 and 0.95."""
    if config.schedule == "constant":
        return None
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=max(total_steps, 1), pct_start=config.warmup_fraction
    )
