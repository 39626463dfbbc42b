"""A per-epoch progress bar for training: running loss and images/s.

tqdm's disable=None turns it off when stderr is not a terminal, so CI logs stay short.
"""

from __future__ import annotations

import time

from tqdm import tqdm

from pipeline.callbacks import TrainCallback


class ProgressBar(TrainCallback):
    def __init__(self, refresh_every: int = 20):
        self.refresh_every = refresh_every
        self.bar: tqdm | None = None

    def on_epoch_start(self, epoch: int, steps_in_epoch: int) -> None:
        self.bar = tqdm(total=steps_in_epoch, desc=f"epoch {epoch}", unit="step", disable=None, leave=True)
        self.loss_sum, self.steps, self.images, self.started = 0.0, 0, 0, time.perf_counter()

    def on_step(self, step: int, loss: float, images: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.images += images
        if self.bar is not None and not self.bar.disable and self.steps % self.refresh_every == 0:
            rate = self.images / max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix(loss=f"{self.loss_sum / self.steps:.4f}", img_s=f"{rate:,.0f}", refresh=False)
            self.bar.update(self.refresh_every)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(self.steps - self.bar.n)
            # Whatever this epoch evaluated: validation, test, both, or (tuning) validation only.
            accuracies = {
                f"{split}_acc": f"{metrics[f'{split}_accuracy']:.2%}"
                for split in ("val", "test")
                if f"{split}_accuracy" in metrics
            }
            self.bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", **accuracies)
            self.bar.close()
