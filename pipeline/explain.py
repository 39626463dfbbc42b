"""What a trained model learned: its first-layer filters, its feature maps, and where it looks.

Layers are found by walking the module (every nn.Conv2d and every 2-D pooling layer, in the
order `named_modules` lists them, which is the order they were defined), never by name, so a
model added to the registry later gets the same figures.

Explanations are Captum's (PyTorch's own attribution library): Grad-CAM (Selvaraju et al.,
ICCV 2017) on the last convolution for a model that has one, the plain gradient saliency map
(Simonyan et al., 2014) for one that has none (the DNN). A map is (H, W) per image, the input's
size, for the class the model predicted (why it said what it said). A model that averages its
logits over views of the image (cnn_plus: the image and its mirror) is looked into one view at a
time, the image as it is (models.single_view): one activation per image and layer.

The sanity check of Adebayo et al. (NeurIPS 2018, "Sanity checks for saliency maps"): an
explanation of a model must depend on the model. Re-initialise the weights and explain the same
images again; if the maps stay alike (high Spearman rank correlation), the method shows the
input's edges, not what the model learned.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.models import single_view

POOLING = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.LPPool2d,
    nn.FractionalMaxPool2d,
)
# The sanity check passes when the median Spearman correlation between a trained model's maps and
# a re-initialised model's maps, image by image, is below this. Maps that carry the model's
# weights come out near 0 (Adebayo et al.'s Grad-CAM and gradient rows); a method that only sees
# the input (an edge detector) scores exactly 1, whatever the weights. 0.5 is far from both:
# half of the maps may agree on a little more than a coin-flip ordering of the pixels, none may
# share most of it.
SANITY_THRESHOLD = 0.5


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def feature_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every convolution and every 2-D pooling layer, in definition order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, *POOLING))]


def first_filters(model: nn.Module) -> np.ndarray | None:
    """The first convolution's weights (out, in, kh, kw) as float32; None for a model without one."""
    convs = conv_layers(model)
    return convs[0][1].weight.detach().float().cpu().numpy() if convs else None


@dataclass
class FeatureMaps:
    layer: str  # the module's path in the model, e.g. layer1.0
    kind: str  # Conv2d, MaxPool2d, ...
    maps: np.ndarray  # (N, C, H, W) float32: the layer's output for each image

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.maps.shape[1:])


def feature_maps(model: nn.Module, inputs: torch.Tensor) -> list[FeatureMaps]:
    """The output of every convolution and pooling layer for `inputs` (N, 1, H, W), one forward pass,
    in the order the forward pass runs them; a module called twice (one `self.pool` after each
    convolution) gives two entries.

    Forward hooks, not Captum's LayerActivation: measured on such a model, LayerActivation returns only
    the last output of a module used twice and orders outputs as listed, not as run.
    """
    found: list[FeatureMaps] = []
    hooks = []

    def keep(name: str, module: nn.Module) -> Callable:
        def hook(_module, _inputs, output) -> None:
            found.append(FeatureMaps(name, type(module).__name__, output.detach().float().cpu().numpy()))

        return hook

    for name, module in feature_layers(model):
        hooks.append(module.register_forward_hook(keep(name, module)))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), single_view(model):  # one map per image, not one per view
            model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return found


def method_name(model: nn.Module) -> str:
    convs = conv_layers(model)
    return f"Grad-CAM on {convs[-1][0]}" if convs else "gradient saliency"


def explain(model: nn.Module, inputs: torch.Tensor, targets: np.ndarray, batch_size: int = 100) -> np.ndarray:
    """(N, H, W) float32 maps for `inputs` (N, 1, H, W) and the classes `targets`, not normalised.

    Grad-CAM on the last convolution (ReLU of the gradient-weighted channels, upsampled
    bilinearly to the input's size), or |d logit / d pixel| for a model without convolutions.
    """
    from captum.attr import LayerAttribution, LayerGradCam, Saliency

    convs = conv_layers(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        # One pass per image: Grad-CAM reads one activation of its layer per image, not one per view.
        with single_view(model):
            for start in range(0, len(inputs), batch_size):
                x = inputs[start : start + batch_size].detach().clone()
                target = torch.as_tensor(np.asarray(targets[start : start + batch_size]), dtype=torch.long)
                if convs:
                    cam = LayerGradCam(model, convs[-1][1]).attribute(x, target=target, relu_attributions=True)
                    maps = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")
                else:
                    maps = Saliency(model).attribute(x.requires_grad_(), target=target, abs=True)
                out.append(maps.detach().sum(dim=1).float().cpu().numpy())  # one channel for either method
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, *inputs.shape[-2:]), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


def normalised(maps: np.ndarray) -> np.ndarray:
    """Each map scaled to [0, 1] by its own maximum (an all-zero map stays zero), for drawing."""
    maps = np.asarray(maps, dtype=np.float32)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return np.divide(maps - low, span, out=np.zeros_like(maps), where=span > 0)


# --------------------------------------------------------------------------- sanity check


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of `model` with every layer's parameters (and batch-norm statistics) re-initialised."""
    copied = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in copied.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
    return copied


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (as Spearman's correlation needs them)."""
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return (upper - (counts - 1) / 2.0)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two arrays, flattened; 0 when either is constant."""
    ra, rb = average_ranks(np.ravel(a)), average_ranks(np.ravel(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else 0.0


Explainer = Callable[[nn.Module, torch.Tensor, np.ndarray], np.ndarray]


@dataclass
class SanityCheck:
    correlations: np.ndarray  # (N,) Spearman, trained model's map against the random model's, per image
    threshold: float

    @property
    def median(self) -> float:
        return float(np.median(self.correlations))

    @property
    def passed(self) -> bool:
        return self.median < self.threshold


def model_randomisation_check(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: np.ndarray,
    explainer: Explainer = explain,
    threshold: float = SANITY_THRESHOLD,
    seed: int = 0,
) -> SanityCheck:
    """Adebayo et al.'s model-randomisation test: `explainer`'s maps of `model` and of a re-initialised
    copy, for the same images and target classes, compared image by image."""
    trained = explainer(model, inputs, targets)
    random = explainer(randomized(model, seed), inputs, targets)
    correlations = np.array([spearman(a, b) for a, b in zip(trained, random, strict=True)])
    return SanityCheck(correlations, threshold)
