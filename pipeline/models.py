"""The chapter's two classifiers, layer for layer, one faster-to-train CNN, and the registry.

`print(FashionDNN())` and `print(FashionCNN())` match listings 5-7 and 5-10. Adding a
model takes one class and one `@register("name")` line; its training recipe, if it has
its own, is one entry of pipeline.config.RECIPES.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import CLASS_NAMES, INPUT_SHAPE, MODEL_NAMES
from pipeline.errors import PipelineError

MODELS: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    # The CLI offers MODEL_NAMES as --model's choices without importing torch; a model missing
    # there could never be picked, so registering one fails at once.
    if name not in MODEL_NAMES:
        raise ValueError(f"add {name!r} to pipeline.config.MODEL_NAMES to register it")

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        cls.registry_name = name  # saved in checkpoints, so a run's model can be rebuilt by name
        MODELS[name] = cls
        return cls

    return add


def model_class(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise PipelineError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(
    name: str, input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = len(CLASS_NAMES)
) -> nn.Module:
    return model_class(name)(input_shape=input_shape, num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register("dnn")
class FashionDNN(nn.Module):
    """Listing 5-6: three fully connected layers with dropout after the first."""

    def __init__(self, input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = 10):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.in_features = int(torch.Size(input_shape).numel())
        self.fc1 = nn.Linear(in_features=self.in_features, out_features=256)
        self.drop = nn.Dropout(0.25)
        self.fc2 = nn.Linear(in_features=256, out_features=128)
        self.fc3 = nn.Linear(in_features=128, out_features=num_classes)

    def forward(self, input_data: torch.Tensor) -> torch.Tensor:
        out = input_data.reshape(-1, self.in_features)
        out = F.relu(self.fc1(out))
        out = self.drop(out)
        out = F.relu(self.fc2(out))
        return self.fc3(out)


@register("cnn")
class FashionCNN(nn.Module):
    """Listing 5-9: two conv/BN/ReLU/max-pool blocks, then three linear layers.

    As in the chapter, fc1..fc3 have no activation between them. fc1's width (64*6*6 for
    28x28 input) is measured by running the conv blocks once on a dummy input, so a
    different input size needs no arithmetic by hand.
    """

    def __init__(self, input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = 10):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.layer1 = nn.Sequential(
            nn.Conv2d(in_channels=input_shape[0], out_channels=32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.layer2 = nn.Sequential(
            nn.Conv2d(in_channels=32, out_channels=64, kernel_size=3),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        with torch.no_grad():
            features = self.layer2(self.layer1(torch.zeros(1, *input_shape)))
        self.fc1 = nn.Linear(in_features=features[0].numel(), out_features=600)
        # The chapter applies Dropout2d to flat (N, 600) features; kept so the model prints as in
        # the book. torch warns about the 2-D input on every call: pipeline.jobs silences it.
        self.drop = nn.Dropout2d(0.25)
        self.fc2 = nn.Linear(in_features=600, out_features=120)
        self.fc3 = nn.Linear(in_features=120, out_features=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer1(x)
        out = self.layer2(out)
        out = out.flatten(1)
        out = self.fc1(out)
        out = self.drop(out)
        out = self.fc2(out)
        return self.fc3(out)


def conv_pool_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv, 2x2 max-pool, then batch norm and ReLU on the pooled map.

    Pooling first runs batch norm and ReLU, which are memory-bound, on a quarter of the pixels:
    a training step takes about a third less time than conv -> BN -> ReLU -> pool here. Max-pooling
    commutes with ReLU, and with batch norm wherever its scale is positive, so the block computes
    much the same function; on the validation split it reached the same accuracy per epoch.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),  # the BN shifts
        nn.MaxPool2d(2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def whitening_filters(images: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """The principal directions of the images' patches, as conv filters: (C*kh*kw, C, kh, kw), the
    direction of most variance first (the eigenvectors of the patches' second-moment matrix).

    airbench (Keller Jordan's CIFAR-10 speed records) starts its first convolution from these; a
    batch norm normalises each channel after it, so their scale does not matter and is left at 1.
    """
    moments, count = 0, 0
    for start in range(0, len(images), 1_000):  # patches are 9 floats per pixel: a thousand images at a time
        patches = F.unfold(images[start : start + 1_000].float(), kernel_size).transpose(1, 2).flatten(0, 1)
        moments, count = moments + patches.T @ patches, count + len(patches)
    _, vectors = torch.linalg.eigh(moments / count)  # eigenvalues ascending
    return vectors.T.flip(0).reshape(-1, images.shape[1], *kernel_size).contiguous()


@register("cnn_plus")
class FashionCNNPlus(nn.Module):
    """The chapter CNN's two conv blocks, both padded (28 -> 14 -> 7), without conv bias and with
    batch norm after the pooling, then one hidden layer of 256 with a ReLU and dropout: 0.83M
    parameters against the chapter CNN's 1.5M.

    Two things airbench does carry over (docs/recipe.md):
    - The first convolution starts from the training images: `initialise_from(images)` sets 18 of
      its 32 filters to the 9 principal directions of the 3x3 patches and their negatives, and
      they stay fixed (their gradient is zeroed); the other 14 are trained as usual.
    - In eval mode the logits are the mean of those of each image and of its mirror (flip
      test-time augmentation). It is part of the model, so the exported ONNX graph computes it and
      predict, the served model and the parity check see what evaluation measured. `single_view`
      turns it off for what looks inside one forward pass (feature maps, Grad-CAM).

    Chosen on the validation split (docs/recipe.md): a third conv block with global
    average pooling instead of the hidden layer trained slower and reached less in 5 epochs,
    batch norm before the pooling reached the same accuracy per epoch at 1.5x the time per step,
    a first conv of only the whitening filters, frozen, trained a step in 0.85 of the time
    but reached less, with or without that time spent on more epochs or width, and GELU or
    squeeze-and-excitation gates gained less than the seeds' spread for a fifth to a third more time.
    Trained with its own recipe (pipeline.config.RECIPES["cnn_plus"]).
    """

    widths: tuple[int, ...] = (32, 64)
    hidden: int = 256
    dropout: float = 0.25
    flip_averaged: bool = True  # eval mode: the mean of the logits of the image and its mirror

    def __init__(self, input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = 10):
        super().__init__()
        self.input_shape = tuple(input_shape)
        channels = [input_shape[0], *self.widths]
        self.features = nn.Sequential(*(conv_pool_bn_relu(c_in, c_out) for c_in, c_out in pairwise(channels)))
        with torch.no_grad():  # the flat width from the blocks themselves, as FashionCNN's fc1
            flat = self.features(torch.zeros(1, *input_shape))[0].numel()
        self.classifier = nn.Sequential(
            nn.Linear(flat, self.hidden), nn.ReLU(), nn.Dropout(self.dropout), nn.Linear(self.hidden, num_classes)
        )
        first = self.first_conv
        self.fixed_filters = min(first.out_channels, 2 * first.weight[0].numel())  # each direction and its negative
        first.weight.register_hook(self._keep_fixed_filters)

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.features[0][0]

    def _keep_fixed_filters(self, grad: torch.Tensor) -> torch.Tensor:
        # Zeroed, not excluded from the optimizer: one weight tensor keeps the conv one oneDNN call,
        # and the export and checkpoints see a plain Conv2d. The recipe's AdamW decays weights apart
        # from the gradient, so it only scales them, which the batch norm after the pooling undoes;
        # --optimizer adam or sgd with --weight-decay adds the decay inside the optimizer, after this
        # hook, and they drift.
        return torch.cat([torch.zeros_like(grad[: self.fixed_filters]), grad[self.fixed_filters :]])

    @torch.no_grad()
    def initialise_from(self, images: torch.Tensor) -> None:
        """Start the first convolution from `images` (N, C, H, W) of the training set (see the class)."""
        first = self.first_conv
        directions = whitening_filters(images.to(first.weight.device), first.kernel_size)
        filters = torch.cat([directions, -directions])[: self.fixed_filters]
        # At the spread torch's own initialisation gave the filters, so the first steps see the usual scale.
        first.weight[: self.fixed_filters] = filters * first.weight.std() / filters.std()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.flip_averaged:
            return self.logits(x)
        both = self.logits(torch.cat([x, x.flip(-1)]))  # one batch of twice the images: one call per layer
        return both.unflatten(0, (2, -1)).mean(0)


@contextmanager
def single_view(model: nn.Module) -> Iterator[nn.Module]:
    """`model` without test-time augmentation for the duration: one forward pass per image, for
    what hooks into the layers (feature maps, Grad-CAM). A model without it is left as it is."""
    averaged = getattr(model, "flip_averaged", None)
    if averaged is None:
        yield model
        return
    model.flip_averaged = False
    try:
        yield model
    finally:
        model.flip_averaged = averaged
