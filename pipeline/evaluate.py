"""Evaluation: logits, loss and accuracy of a model over a decoded split.

Always in eval() mode under inference_mode(): the chapter evaluated with dropout on and
gradients tracked, which both lowers the measured accuracy and wastes time.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def images_to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1], the scaling ToTensor() applies."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    return tensor.to(device).unsqueeze(1).float().div_(255.0)


def compute_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Run `model` over `inputs` in eval mode, batch by batch; restores the model's mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return torch.cat([model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
    finally:
        model.train(was_training)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    labels = labels.to(logits.device)
    return {
        "test_loss": F.cross_entropy(logits, labels).item(),
        "test_accuracy": (logits.argmax(1) == labels).float().mean().item(),
    }
