"""The recipe's ablation (docs/recipe.md): cnn_plus with its whole recipe, then with one
part taken away at a time, and the chapter's CNN, each trained once on all but the last 5,000
training images and judged on those 5,000 (the validation split). The test set decided nothing
here; its figure is printed for reference only.

    python scripts/ablation.py [--seed 0] [--out ablation.json]

About 8 minutes on a 2-core machine. Tracking is off: these runs are a measurement, not results.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

from torch import nn

from pipeline import models
from pipeline.config import default_data_dir, train_config
from pipeline.train import train

VAL_SIZE = 5_000


@contextmanager
def batch_norm_before_pooling():
    """cnn_plus built with the usual block order, conv -> batch norm -> ReLU -> max-pool."""

    def block(in_channels: int, out_channels: int) -> nn.Sequential:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(), nn.MaxPool2d(2))

    chosen = models.conv_pool_bn_relu
    models.conv_pool_bn_relu = block
    try:
        yield
    finally:
        models.conv_pool_bn_relu = chosen


# (label, model, settings over the model's recipe[, a change to the model])
VARIANTS = [
    ("cnn_plus, whole recipe", "cnn_plus", {}),
    ("  without horizontal flips", "cnn_plus", {"hflip": False}),
    ("  5 epochs instead of 6", "cnn_plus", {"epochs": 5}),
    ("  7 epochs instead of 6", "cnn_plus", {"epochs": 7}),
    ("  batch norm before the pooling", "cnn_plus", {}, batch_norm_before_pooling),
    (
        "  the previous recipe: batch norm first, no flips, 5 epochs",
        "cnn_plus",
        {"epochs": 5, "hflip": False},
        batch_norm_before_pooling,
    ),
    ("  with a random crop (pad 1) too", "cnn_plus", {"crop_pad": 1}),
    ("  without label smoothing", "cnn_plus", {"label_smoothing": 0.0}),
    ("  batch 256 instead of 100", "cnn_plus", {"batch_size": 256}),
    (
        "  the chapter's optimizer (Adam 0.001, constant)",
        "cnn_plus",
        {"optimizer": "adam", "lr": 0.001, "weight_decay": 0.0, "schedule": "constant"},
    ),
    ("cnn (the chapter's model and recipe)", "cnn", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("ablation.json"))
    args = parser.parse_args()
    rows = []
    for label, model, settings, *change in VARIANTS:
        config = train_config(model, seed=args.seed, val_size=VAL_SIZE, data_dir=default_data_dir(), **settings)
        with (change[0] if change else nullcontext)():
            m = train(config).metrics
        rows.append(
            {
                "variant": label,
                "model": model,
                **settings,
                "val_accuracy": m["val_accuracy"],
                "test_accuracy": m["test_accuracy"],
                "train_time_s": m["train_time_s"],
                "wall_time_s": m["wall_time_s"],
            }
        )
        print(
            f"{label:55s} val {m['val_accuracy']:.2%}  test {m['test_accuracy']:.2%}  "
            f"train {m['train_time_s']:.0f} s  wall {m['wall_time_s']:.0f} s",
            flush=True,
        )
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
