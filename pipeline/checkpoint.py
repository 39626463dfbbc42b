"""Model checkpoints: the weights plus what it takes to rebuild the module by name.

Loaded with `torch.load(weights_only=True)`, so a checkpoint from an untrusted store cannot
run code; a file that isn't one of ours is a PipelineError, not a traceback.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models import build_model


def save_checkpoint(model: nn.Module, path, class_names: list[str] | tuple[str, ...]) -> None:
    """Weights plus what it takes to rebuild the module: its registry name and input shape."""
    torch.save(
        {
            "model": model.registry_name,
            "input_shape": list(model.input_shape),
            "class_names": list(class_names),
            "state_dict": model.state_dict(),
        },
        path,
    )


def load_checkpoint(path) -> tuple[nn.Module, list[str]]:
    """Rebuild a model saved by save_checkpoint; returns it in eval mode with its class names."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(checkpoint["model"], tuple(checkpoint["input_shape"]), len(checkpoint["class_names"]))
        model.load_state_dict(checkpoint["state_dict"])
    except PipelineError:
        raise
    except Exception as exc:  # a truncated file, a foreign pickle, mismatched weights
        raise PipelineError(f"{path}: not a usable model checkpoint ({exc})") from None
    return model.eval(), list(checkpoint["class_names"])
