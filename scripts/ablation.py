"""The recipe's ablation (README "A faster recipe"): cnn_plus with its whole recipe, then with one
part taken away at a time, and the chapter's CNN, each trained once on all but the last 5,000
training images and judged on those 5,000 (the validation split). The test set decided nothing
here; its figure is printed for reference only.

    python scripts/ablation.py [--seed 0] [--out ablation.json]

About 15 minutes on a 2-core machine. Tracking is off: these runs are a measurement, not results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.config import default_data_dir, train_config
from pipeline.train import train

VAL_SIZE = 5_000
# (label, model, settings over the model's recipe)
VARIANTS = [
    ("cnn_plus, whole recipe", "cnn_plus", {}),
    ("  6 epochs instead of 5", "cnn_plus", {"epochs": 6}),
    ("  with a random crop (pad 1)", "cnn_plus", {"crop_pad": 1}),
    ("  with horizontal flips", "cnn_plus", {"hflip": True}),
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
    for label, model, settings in VARIANTS:
        config = train_config(model, seed=args.seed, val_size=VAL_SIZE, data_dir=default_data_dir(), **settings)
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
