"""Light augmentation of whole training batches, on tensors: random crop with padding, horizontal flip.

Done per batch on the decoded tensors (one gather), never per sample through PIL, so it costs a
fraction of a training step. Draws come from the caller's generator, so a seeded run repeats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment_batch(images: torch.Tensor, crop_pad: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """(N, C, H, W) images, each shifted by up to `crop_pad` pixels each way and, with `hflip`,
    mirrored left-right with probability 1/2.

    A shift is a crop of the zero-padded image, torchvision's RandomCrop(padding=crop_pad) with
    a black border (Fashion-MNIST's background). Returns a new tensor; `images` is untouched.
    """
    n, _, height, width = images.shape
    out = images
    if crop_pad:
        # One offset per image, drawn on the CPU generator; the gather runs where the images are.
        dy, dx = torch.randint(0, 2 * crop_pad + 1, (2, n, 1), generator=generator).to(images.device)
        padded = F.pad(images, (crop_pad, crop_pad, crop_pad, crop_pad))
        rows = (dy + torch.arange(height, device=images.device))[:, None, :, None]  # (N, 1, H, 1)
        cols = (dx + torch.arange(width, device=images.device))[:, None, None, :]  # (N, 1, 1, W)
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        out = padded[batch, channel, rows, cols]
    if hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)[:, None, None, None]
        out = torch.where(flip, out.flip(-1), out)
    return out
