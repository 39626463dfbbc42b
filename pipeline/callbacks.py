"""What training hands its observers: the callback and tuning observer protocols and the training
result. Kept free of torch (and optuna) at run time, so tracking code can implement them without
importing either (the onnxruntime predictor shares the tracking package)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn


@dataclass
class TrainResult:
    model: nn.Module
    params: dict[str, Any]
    metrics: dict[str, float]  # final: test_accuracy, test_loss, [val_...], train_loss, wall_time_s, ...
    history: list[dict[str, float]]  # one row per evaluation (epoch end, or max-steps end)
    example_input: np.ndarray  # two test (else validation) images, float32 (2, 1, 28, 28): for model signatures
    # The final model's logits on the whole test set (CPU), when its last evaluation included the test set.
    test_logits: torch.Tensor | None = None
    # The same for the validation split (evaluate fits its calibration temperature on them).
    val_logits: torch.Tensor | None = None


class TrainCallback:
    """Hooks `train` calls; override what you need. All are no-ops here."""

    def on_train_start(self, params: dict[str, Any]) -> None: ...

    def on_epoch_start(self, epoch: int, steps_in_epoch: int) -> None: ...

    def on_step(self, step: int, loss: float, images: int) -> None:
        """After every optimizer step; `images` is the batch size just trained on."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Every `log_every` steps, with the mean training loss since the last call."""

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, epoch: int, step: int, state: dict[str, Any]) -> None:
        """At the end of every epoch and every `checkpoint_every` steps: the training state to save.

        `state` holds live tensors (see train.capture_state): save it before returning.
        checkpoint.save_training_state writes it; train.restore_state resumes from it.
        """

    def on_train_end(self, result: TrainResult) -> None: ...


class TrialObserver:
    """Hooks a hyperparameter search (pipeline.tune) calls around each trial; no-ops here."""

    def trial_started(self, number: int, params: dict[str, Any]) -> list[TrainCallback]:
        """Before the trial trains; the callbacks returned see its training."""
        return []

    def trial_finished(self, number: int, state: str, value: float | None, metrics: dict[str, float]) -> None:
        """`state`: complete, pruned, failed or killed; `value`: its validation accuracy, if it has one."""
