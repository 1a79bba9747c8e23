"""Which pixels are missing: the masks of training on incomplete images and of its metric.

A mask is `observed: [B, D]` in {0, 1} (1 = observed), in the dtype of the images it masks.
Images are row-major squares (D = side^2, 28x28 for MNIST) for the structured patterns.
Training masks are drawn from the job's generator, so a resumed run draws the same ones
(Mattei & Frellsen, 2019, train on data missing completely at random; the structured
patterns are the occlusions a user of `/impute` brings).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The metric's fixed pattern: every held-out digit loses its top half.
EVAL_PATTERN = "top-half"


def draw_observed(
    pattern: str,
    rate: float,
    batch: int,
    dim: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A fresh training mask `[B, D]`, 1 = observed.

    `mcar`: each pixel is missing independently with probability `rate`. `top-half`: each
    image loses its first D/2 pixels (the top rows) with probability `rate`.
    `random-square`: each image, with probability `rate`, loses a square of half the side at a
    uniformly random position.
    """
    device = generator.device
    if pattern == "mcar":
        return (torch.rand(batch, dim, generator=generator, device=device) >= rate).to(dtype)
    hit = torch.rand(batch, 1, generator=generator, device=device) < rate  # [B, 1]
    if pattern == "top-half":
        missing = hit & top_half_missing(dim, device)  # [B, D]
    elif pattern == "random-square":
        side = _side(dim)
        size = side // 2
        corner = torch.randint(0, side - size + 1, (batch, 2), generator=generator, device=device)
        index = torch.arange(side, device=device)  # [side]
        rows = (index >= corner[:, :1]) & (index < corner[:, :1] + size)  # [B, side]
        cols = (index >= corner[:, 1:]) & (index < corner[:, 1:] + size)  # [B, side]
        missing = hit & (rows[:, :, None] & cols[:, None, :]).reshape(batch, dim)  # [B, D]
    else:
        raise ValueError(f"unknown missing pattern {pattern!r}")
    return (~missing).to(dtype)


def top_half_missing(dim: int, device: torch.device | str = "cpu") -> Tensor:
    """The first half of the pixels, row-major (the top rows of an image): `[D]` bool."""
    return torch.arange(dim, device=device) < dim // 2


def eval_observed(
    batch: int, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """The metric's fixed mask (`EVAL_PATTERN`): `[B, D]`, the top half missing in every image."""
    return (~top_half_missing(dim, device)).to(dtype).expand(batch, dim)


def _side(dim: int) -> int:
    side = math.isqrt(dim)
    if side * side != dim:
        raise ValueError(f"a square pattern needs square images, got D={dim}")
    return side
