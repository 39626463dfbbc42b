"""The recipe's ablation (docs/recipe.md): cnn_plus with its whole recipe, then with one
part taken away (or one lever added) at a time, and the chapter's CNN, each trained once on all
but the last 5,000 training images and judged on those 5,000 (the validation split). The test set
decided nothing here; its figure is printed for reference only.

    .venv/bin/python scripts/ablation.py [--seed 0] [--only TEXT ...] [--out outputs/ablation.json]
    .venv/bin/python scripts/ablation.py --step-times [--only TEXT ...]

A row is a training of about a minute on a 2-core machine, so one seed of every row takes about an
hour (--only picks the variants whose label contains TEXT).
Tracking is off: these runs are a measurement, not results. --step-times trains nothing to the end:
it times the variants' training steps side by side (see step_times), for differences of time that
the machine's swings between whole trainings would hide.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from unittest.mock import patch

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import SqueezeExcitation

from pipeline import distributed, models
from pipeline import train as train_stage
from pipeline.allocator import keep_freed_memory
from pipeline.collector import collect_for_a_command
from pipeline.config import default_data_dir, train_config
from pipeline.explain import conv_layers
from pipeline.train import train

VAL_SIZE = 5_000


@contextmanager
def batch_norm_before_pooling():
    """cnn_plus built with the usual block order, conv -> batch norm -> ReLU -> max-pool."""

    def block(in_channels: int, out_channels: int) -> nn.Sequential:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(), nn.MaxPool2d(2))

    with patch.object(models, "conv_pool_bn_relu", block):
        yield


def without_flip_averaging():
    """cnn_plus judged on each image alone, without the mean over it and its mirror."""
    return patch.object(models.FashionCNNPlus, "flip_averaged", False)


def without_whitening():
    """cnn_plus's first conv as torch initialises it, all of it trained."""
    return combined(
        patch.object(models.FashionCNNPlus, "initialise_from", lambda self, images: None), whitening_trained()
    )


def whitening_trained():
    """cnn_plus's first conv starts whitened, but its whitening filters are trained like the others."""
    return patch.object(models.FashionCNNPlus, "_keep_fixed_filters", lambda self, grad: grad)


def first_model():
    """cnn_plus as the first recipe had it: no whitened first conv, no flip averaging."""
    return combined(without_whitening(), without_flip_averaging())


@contextmanager
def weight_average(decay: float = 0.998):
    """An exponential moving average of the weights (and batch-norm statistics), updated after every
    step, is what the epoch's evaluation judges; training itself is unchanged."""
    step, evaluate = train_stage.optimizer_step, train_stage.compute_logits
    averages: dict[int, torch.optim.swa_utils.AveragedModel] = {}

    def step_and_average(t, loss):
        step(t, loss)
        if id(t.model) not in averages:
            averages.clear()  # one training at a time
            ema = torch.optim.swa_utils.get_ema_multi_avg_fn(decay)
            averages[id(t.model)] = torch.optim.swa_utils.AveragedModel(t.model, multi_avg_fn=ema, use_buffers=True)
        else:
            averages[id(t.model)].update_parameters(t.model)

    def evaluate_average(model, inputs, batch_size=200):
        average = averages.get(id(model))
        return evaluate(average.module if average else model, inputs, batch_size)

    with (
        patch.object(train_stage, "optimizer_step", step_and_average),
        patch.object(train_stage, "compute_logits", evaluate_average),
    ):
        yield


def widths(*channels: int):
    """cnn_plus with other conv widths (the chosen model's are 32 and 64)."""
    return patch.object(models.FashionCNNPlus, "widths", channels)


def hidden_width(units: int):
    """cnn_plus with another hidden layer width (the chosen model's is 256)."""
    return patch.object(models.FashionCNNPlus, "hidden", units)


def dropout(p: float):
    """cnn_plus with another dropout before its last layer (the chosen model's is 0.25)."""
    return patch.object(models.FashionCNNPlus, "dropout", p)


def activation(make: Callable[[], nn.Module]):
    """cnn_plus with `make()` in place of every ReLU (in both conv blocks and the hidden layer)."""
    return patch.object(nn, "ReLU", make)


@contextmanager
def each_block(change: Callable[[nn.Sequential, int, int], nn.Sequential]):
    """cnn_plus with `change(block, in_channels, out_channels)` made of each conv block that
    models.conv_pool_bn_relu builds (as it is on entering: changes stack)."""
    block = models.conv_pool_bn_relu
    with patch.object(models, "conv_pool_bn_relu", lambda c_in, c_out: change(block(c_in, c_out), c_in, c_out)):
        yield


def overlapping_pooling():
    """cnn_plus's max-pools 3x3 with stride 2 (padded by 1: the same 28 -> 14 -> 7), as AlexNet's
    overlapping pooling, in place of 2x2."""

    def overlapping(layers: nn.Sequential, in_channels: int, out_channels: int) -> nn.Sequential:
        layers[1] = nn.MaxPool2d(3, stride=2, padding=1)
        return layers

    return each_block(overlapping)


def squeeze_excitation():
    """cnn_plus with a squeeze-and-excitation gate (Hu et al.: each channel scaled by a gate computed
    from every channel's mean, squeezed to a quarter of them) at the end of each conv block."""
    return each_block(lambda layers, _, c_out: nn.Sequential(*layers, SqueezeExcitation(c_out, c_out // 4)))


@contextmanager
def whitening_only(kernel: int = 3, directions: int = 9, frozen: bool = False):
    """cnn_plus's first conv reduced to its whitening filters: `kernel` x `kernel`, the `directions`
    leading principal directions of the patches and their negatives, and nothing else, fixed. With
    `frozen` its weight takes no gradient at all, so the backward pass stops at the first batch
    norm: the first block's max-pool and conv run forward only, and a step takes less time (the
    recipe's 14 trained filters need that backward)."""
    build = models.FashionCNNPlus.__init__

    def first_block(layers: nn.Sequential, in_channels: int, out_channels: int) -> nn.Sequential:
        if in_channels == models.INPUT_SHAPE[0] and kernel != layers[0].kernel_size[0]:  # the block on the image
            layers[0] = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)
        return layers

    def built(self, *args, **kwargs):
        build(self, *args, **kwargs)
        self.fixed_filters = 2 * directions
        if frozen:
            self.first_conv.weight.requires_grad_(False)

    @torch.no_grad()
    def initialise(self, images: torch.Tensor) -> None:
        first = self.first_conv
        leading = models.whitening_filters(images.to(first.weight.device), first.kernel_size)[:directions]
        filters = torch.cat([leading, -leading])
        first.weight[: len(filters)] = filters * first.weight.std() / filters.std()

    with (
        each_block(first_block),
        patch.object(models.FashionCNNPlus, "widths", (2 * directions, *models.FashionCNNPlus.widths[1:])),
        patch.object(models.FashionCNNPlus, "__init__", built),
        patch.object(models.FashionCNNPlus, "initialise_from", initialise),
    ):
        yield


@contextmanager
def flat_parameters_apart(lr_factor: float = 1.0):
    """The optimizer's one-dimensional parameters (batch-norm scales and shifts, biases) without
    weight decay, at `lr_factor` times the learning rate: decay pulls a batch-norm scale toward
    zero for no gain, and airbench trains its batch-norm biases at a much higher rate."""
    build = train_stage.build_optimizer

    def grouped(config, parameters):
        parameters = list(parameters)
        optimizer = build(config, [p for p in parameters if p.ndim > 1])
        flat = [p for p in parameters if p.ndim <= 1]
        optimizer.add_param_group({"params": flat, "weight_decay": 0.0, "lr": config.lr * lr_factor})
        return optimizer

    with patch.object(train_stage, "build_optimizer", grouped):
        yield


@contextmanager
def after_setup(change):
    """`change(trainer)` applied to the model once it is built, before the first step."""
    build = train_stage.setup

    def set_up(*args, **kwargs):
        t = build(*args, **kwargs)
        with torch.no_grad():
            change(t)
        return t

    with patch.object(train_stage, "setup", set_up):
        yield


def identity_later_convs():
    """airbench's identity start: every conv after the first begins as the identity on its first
    in_channels outputs (a Dirac kernel), the rest as torch drew them."""

    def dirac(t):
        for _, conv in conv_layers(distributed.unwrap(t.model))[1:]:
            nn.init.dirac_(conv.weight[: conv.in_channels])

    return after_setup(dirac)


@contextmanager
def alternating_flips():
    """airbench's alternating flips: each image is mirrored at random in the first epoch, then in
    every other epoch exactly the images that were not mirrored in the one before."""
    shard, augment, run_epoch = distributed.shard, train_stage.augment_batch, train_stage.run_epoch
    state = {"epoch": 0, "index": None, "first": None}

    def remember(batch, world):
        state["index"] = batch = shard(batch, world)
        return batch

    def epoch(t, *args, **kwargs):
        state["epoch"] = t.epoch + (t.epoch_step == 0)  # the epoch run_epoch is about to run
        if state["first"] is None:
            state["first"] = torch.rand(len(t.train_y), generator=t.augment) < 0.5
        return run_epoch(t, *args, **kwargs)

    def flipped(images, crop_pad, hflip, generator):
        images = augment(images, crop_pad, False, generator)
        flip = state["first"][state["index"]] ^ (state["epoch"] % 2 == 0)
        return torch.where(flip[:, None, None, None], images.flip(-1), images)

    with (
        patch.object(distributed, "shard", remember),
        patch.object(train_stage, "augment_batch", flipped),
        patch.object(train_stage, "run_epoch", epoch),
    ):
        yield


@contextmanager
def shifted_test_time_augmentation():
    """Flip test-time augmentation with 1-pixel shifts too (airbench's level 2): the mean of the
    logits of the image and its mirror, weighted 1/2, and of both shifted one pixel up-left and
    down-right, 1/4 each pair."""
    forward = models.FashionCNNPlus.forward

    def views(self, x: torch.Tensor) -> torch.Tensor:
        both = lambda v: (self.logits(v) + self.logits(v.flip(-1))) / 2  # noqa: E731
        padded = F.pad(x, (1, 1, 1, 1))
        height, width = x.shape[-2:]
        shifted = (both(padded[..., :height, :width]) + both(padded[..., 2:, 2:])) / 2
        return (both(x) + shifted) / 2

    def averaged(self, x: torch.Tensor) -> torch.Tensor:
        return forward(self, x) if self.training else views(self, x)

    with patch.object(models.FashionCNNPlus, "forward", averaged):
        yield


@contextmanager
def combined(*changes):
    """Several of the changes above at once."""
    with ExitStack() as stack:
        for change in changes:
            stack.enter_context(change)
        yield


# The first recipe (the first table of docs/recipe.md): 6 epochs of batch 100 at a peak lr of 0.004,
# on cnn_plus without its whitened first conv and flip averaging (first_model).
FIRST = {"epochs": 6, "batch_size": 100, "lr": 0.004}
# The best schedule before the whitened conv: batch 256 for 8 epochs at 0.006.
B256X8 = {"batch_size": 256, "epochs": 8, "lr": 0.006}

# (label, model, settings over the model's recipe[, a change to the model])
VARIANTS = [
    # The recipe as it is (pipeline/config.py RECIPES, pipeline/models.py FashionCNNPlus), and without each part.
    ("cnn_plus, whole recipe", "cnn_plus", {}),
    ("  without the whitened first conv", "cnn_plus", {}, without_whitening),
    ("  whitening filters trained, not fixed", "cnn_plus", {}, whitening_trained),
    ("  without flip averaging", "cnn_plus", {}, without_flip_averaging),
    ("  8 epochs instead of 7", "cnn_plus", {"epochs": 8}),
    ("  6 epochs instead of 7", "cnn_plus", {"epochs": 6}),
    ("  batch 512 for 8 epochs, lr 0.008", "cnn_plus", {"batch_size": 512, "epochs": 8, "lr": 0.008}),
    ("  + flip and shift test-time augmentation", "cnn_plus", {}, shifted_test_time_augmentation),
    ("  label smoothing 0.2 instead of 0.1", "cnn_plus", {"label_smoothing": 0.2}),
    ("  peak lr 0.008 instead of 0.006", "cnn_plus", {"lr": 0.008}),
    ("  weight decay 0.1 instead of 0.05", "cnn_plus", {"weight_decay": 0.1}),
    ("  hidden layer of 512 instead of 256", "cnn_plus", {}, lambda: hidden_width(512)),
    ("  dropout 0.1 instead of 0.25", "cnn_plus", {}, lambda: dropout(0.1)),
    ("  dropout 0.4 instead of 0.25", "cnn_plus", {}, lambda: dropout(0.4)),
    ("  GELU instead of ReLU", "cnn_plus", {}, lambda: activation(nn.GELU)),  # airbench's
    ("  leaky ReLU (0.1) instead of ReLU", "cnn_plus", {}, lambda: activation(partial(nn.LeakyReLU, 0.1))),
    ("  overlapping max-pools (3x3, stride 2)", "cnn_plus", {}, overlapping_pooling),
    ("  squeeze-and-excitation gates after each conv block", "cnn_plus", {}, squeeze_excitation),
    (
        "  first conv of 24 (its 18 whitening filters and 6 trained), hidden layer of 512",
        "cnn_plus",
        {},
        lambda: combined(widths(24, 64), hidden_width(512)),
    ),
    # The first conv reduced to its whitening filters (whitening_only), and what its saved time buys.
    ("  first conv: only the 18 whitening filters", "cnn_plus", {}, whitening_only),
    ("  first conv: only the 18 whitening filters, frozen", "cnn_plus", {}, lambda: whitening_only(frozen=True)),
    (
        "  first conv: only the 18 whitening filters, frozen, 8 epochs",
        "cnn_plus",
        {"epochs": 8},
        lambda: whitening_only(frozen=True),
    ),
    (
        "  first conv: only the 18 whitening filters, frozen, second conv of 80",
        "cnn_plus",
        {},
        lambda: combined(widths(18, 80), whitening_only(frozen=True)),
    ),
    (
        "  first conv: only the 18 whitening filters, frozen, hidden layer of 384",
        "cnn_plus",
        {},
        lambda: combined(hidden_width(384), whitening_only(frozen=True)),
    ),
    (
        "  first conv: only the 18 whitening filters, frozen, hidden layer of 512",
        "cnn_plus",
        {},
        lambda: combined(hidden_width(512), whitening_only(frozen=True)),
    ),
    (
        "  first conv: only the 18 whitening filters, frozen, batch 128, lr 0.004",
        "cnn_plus",
        {"batch_size": 128, "lr": 0.004},
        lambda: whitening_only(frozen=True),
    ),
    ("  first conv 5x5: 12 leading directions and negatives", "cnn_plus", {}, lambda: whitening_only(5, 12)),
    ("  first conv 5x5: 16 leading directions and negatives", "cnn_plus", {}, lambda: whitening_only(5, 16)),
    # The first recipe, and one part taken away (or changed) at a time (docs/recipe.md's first table).
    ("first recipe", "cnn_plus", FIRST, first_model),
    ("  without horizontal flips", "cnn_plus", {**FIRST, "hflip": False}, first_model),
    ("  5 epochs instead of 6", "cnn_plus", {**FIRST, "epochs": 5}, first_model),
    ("  7 epochs instead of 6", "cnn_plus", {**FIRST, "epochs": 7}, first_model),
    (
        "  batch norm before the pooling",
        "cnn_plus",
        FIRST,
        lambda: combined(first_model(), batch_norm_before_pooling()),
    ),
    (
        "  the previous recipe: batch norm first, no flips, 5 epochs",
        "cnn_plus",
        {**FIRST, "epochs": 5, "hflip": False},
        lambda: combined(first_model(), batch_norm_before_pooling()),
    ),
    ("  with a random crop (pad 1) too", "cnn_plus", {**FIRST, "crop_pad": 1}, first_model),
    ("  without label smoothing", "cnn_plus", {**FIRST, "label_smoothing": 0.0}, first_model),
    ("  batch 256 instead of 100", "cnn_plus", {**FIRST, "batch_size": 256}, first_model),
    (
        "  the chapter's optimizer (Adam 0.001, constant)",
        "cnn_plus",
        {**FIRST, "optimizer": "adam", "lr": 0.001, "weight_decay": 0.0, "schedule": "constant"},
        first_model,
    ),
    # Levers tried toward 94 % on the first recipe (docs/recipe.md, "Toward 94 %"), each added to it.
    ("  + flip test-time augmentation", "cnn_plus", FIRST, without_whitening),
    ("  + weight average (EMA 0.998) judged", "cnn_plus", FIRST, lambda: combined(first_model(), weight_average())),
    ("  + wider convs (64, 128)", "cnn_plus", FIRST, lambda: combined(first_model(), widths(64, 128))),
    ("  + batch 256 for 8 epochs, lr 0.006", "cnn_plus", B256X8, first_model),
    ("  + batch 256 for 8 epochs, lr 0.006, flip test-time augmentation", "cnn_plus", B256X8, without_whitening),
    (
        "  + no weight decay on batch norm and biases",
        "cnn_plus",
        FIRST,
        lambda: combined(first_model(), flat_parameters_apart()),
    ),
    (
        "  + batch norm and biases: no decay, 4x the lr",
        "cnn_plus",
        FIRST,
        lambda: combined(first_model(), flat_parameters_apart(4.0)),
    ),
    (
        "  + batch 512 for 10 epochs, lr 0.008, flip test-time augmentation",
        "cnn_plus",
        {"batch_size": 512, "epochs": 10, "lr": 0.008},
        without_whitening,
    ),
    (
        "  + batch 512 for 8 epochs, lr 0.008, flip test-time augmentation",
        "cnn_plus",
        {"batch_size": 512, "epochs": 8, "lr": 0.008},
        without_whitening,
    ),
    (
        "  + convs of 48 and 96, batch 256 for 8 epochs, lr 0.006, flip test-time augmentation",
        "cnn_plus",
        B256X8,
        lambda: combined(without_whitening(), widths(48, 96)),
    ),
    # airbench's levers, each added to batch 256 for 8 epochs with flip test-time augmentation (the
    # whitened first conv, the one that carried over, is the recipe's: its rows are at the top).
    (
        "  + b256x8 TTA, identity-initialised second conv",
        "cnn_plus",
        B256X8,
        lambda: combined(without_whitening(), identity_later_convs()),
    ),
    (
        "  + b256x8 TTA, alternating flips",
        "cnn_plus",
        B256X8,
        lambda: combined(without_whitening(), alternating_flips()),
    ),
    (
        "  + b256x8, flip and shift TTA",
        "cnn_plus",
        B256X8,
        lambda: combined(without_whitening(), shifted_test_time_augmentation()),
    ),
    ("cnn (the chapter's model and recipe)", "cnn", {}),
]


def applied(change: list):
    """The context of a VARIANTS row's change to the model (its optional fourth item), or none."""
    return change[0]() if change else nullcontext()


def step_times(variants: list[tuple], rounds: int = 12, steps: int = 10) -> dict[str, float]:
    """The time per training image of each variant's training step (run_epoch's, augmentation and
    update included), in rounds of `steps` steps that take the variants in turn, so that the
    machine's swings fall on all of them alike; the best round of each, the least disturbed."""
    trainers = []
    for label, model, settings, *change in variants:
        config = train_config(
            model, val_size=0, test_eval="never", max_steps=steps, data_dir=default_data_dir(), **settings
        )
        with applied(change):
            trainers.append((label, change, train_stage.setup(config)))
    best = dict.fromkeys((label for label, *_ in trainers), math.inf)
    for round_ in range(rounds + 1):  # round 0 warms up
        for label, change, t in trainers:
            t.step, t.train_seconds = 0, 0.0
            with applied(change):
                train_stage.run_epoch(t)
            if round_:
                best[label] = min(best[label], t.train_seconds / (steps * t.global_batch))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", action="append", default=[], help="run only the variants whose label contains this text (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/ablation.json"))
    parser.add_argument("--step-times", action="store_true", help="time the variants' training steps side by side")
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does
    collect_for_a_command()  # as the CLI does
    chosen = [v for v in VARIANTS if not args.only or any(text in v[0] for text in args.only)]
    if not chosen:
        parser.error(f"no variant's label contains {' or '.join(map(repr, args.only))}")
    if args.step_times:
        times = step_times(chosen)
        reference = next(iter(times.values()))
        for label, seconds in times.items():
            print(f"{label:55s} {seconds * 1e6:6.1f} us per training image  {seconds / reference:.2f} of the first")
        return
    rows = []
    for label, model, settings, *change in chosen:
        config = train_config(model, seed=args.seed, val_size=VAL_SIZE, data_dir=default_data_dir(), **settings)
        with applied(change):
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
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
