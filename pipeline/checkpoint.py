"""Checkpoints: a trained model (weights plus what it takes to rebuild the module by name), and
the full training state a killed run resumes from.

Loaded with `torch.load(weights_only=True)`, so a checkpoint from an untrusted store cannot
run code; a file that isn't one of ours is a PipelineError, not a traceback.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.files import atomic_write
from pipeline.models import build_model


def _why_unusable(exc: Exception) -> str:
    """One line on why torch.load refused a file, never torch's advice to load it with weights_only=False.

    A checkpoint of ours holds tensors and plain values only. One that pickles anything else (a
    function, a class) could run code when unpickled, so it stays refused, whatever its source.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in text.lower():
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = f" (it refers to {found.group(1)})" if found else ""
        return f"it holds Python objects other than tensors and plain values{what}, which can run code when loaded"
    line = " ".join(text.split()) or type(exc).__name__  # load_state_dict's list of keys spans lines
    return line if len(line) <= 300 else line[:297] + "..."


def save_checkpoint(
    model: nn.Module, path, class_names: list[str] | tuple[str, ...], temperature: float | None = None
) -> None:
    """Weights plus what it takes to rebuild the module: its registry name and input shape, and the
    calibration temperature once `pipeline evaluate` has fitted one (read back by `checkpoint_temperature`)."""
    checkpoint = {
        "model": model.registry_name,
        "input_shape": list(model.input_shape),
        "class_names": list(class_names),
        "state_dict": model.state_dict(),
    }
    if temperature is not None:
        checkpoint["temperature"] = float(temperature)
    torch.save(checkpoint, path)


def checkpoint_temperature(path) -> float | None:
    """The temperature a checkpoint holds (softmax(logits / T) is calibrated), None when it has none."""
    value = torch.load(path, map_location="cpu", weights_only=True).get("temperature")
    return None if value is None else float(value)


def load_checkpoint(path) -> tuple[nn.Module, list[str]]:
    """Rebuild a model saved by save_checkpoint; returns it in eval mode with its class names."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(checkpoint["model"], tuple(checkpoint["input_shape"]), len(checkpoint["class_names"]))
        model.load_state_dict(checkpoint["state_dict"])
    except PipelineError:
        raise
    except Exception as exc:  # a truncated file, a foreign pickle, mismatched weights
        raise PipelineError(f"{path}: not a usable model checkpoint: {_why_unusable(exc)}") from None
    return model.eval(), list(checkpoint["class_names"])


# ----------------------------------------------------------------- training state (resume)

TRAINING_STATE_KEYS = ("model_name", "total_steps", "model", "optimizer", "rng", "step", "epoch", "history")


def save_training_state(state: dict, path) -> Path:
    """A checkpoint to resume training from (train.capture_state's dict), written atomically."""
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)
    return Path(path)


def load_training_state(path) -> dict:
    """A checkpoint saved by save_training_state. Tensors and plain types only: no pickle runs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a foreign pickle
        raise PipelineError(f"{path}: not a usable training checkpoint: {_why_unusable(exc)}") from None
    missing = [key for key in TRAINING_STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise PipelineError(f"{path}: not a training checkpoint (no {', '.join(missing)})")
    return state
