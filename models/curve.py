"""A run's learning curve: its test bound on a fixed subset of test images, every few epochs.

The final evaluation (k=5000 on thousands of images) says where a run ends; the curve says
how it got there, so that two objectives can be compared at every budget (the epoch where
IWAE's bound passes the VAE's, if it does). Each point is the IWAE bound (Burda et al.,
2016, eq. 8, as `models.estimators.log_likelihood` computes it) at a small k on the first
`size` test images in the evaluation's one fixed binarization, with its standard error
over those images. The draws come from a generator seeded afresh at every point with the
run's seed, not from the training generator (the run trains as it would without a curve),
and every point of a run uses the same draws, so that the curve moves only with the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.estimators import log_likelihood
from models.files import Write, write_atomic
from models.networks import IWAEModel
from models.training import tf32_matmuls

CURVE_NAME = "curve.json"


@dataclass(frozen=True)
class CurveSpec:
    """A point after the first epoch, every `every` epochs and after the last; the bound at
    `k` samples on the first `size` test images."""

    every: int = 5
    size: int = 1000
    k: int = 100

    def __post_init__(self) -> None:
        if self.every < 1 or self.size < 2 or self.k < 1:
            raise ValueError(f"a learning curve needs every >= 1, size >= 2 and k >= 1: {self}")

    def due(self, epoch: int, epochs: int) -> bool:
        return epoch == 1 or epoch % self.every == 0 or epoch == epochs


class CurveRecorder:
    """Adds a point to `path` (a JSON list, rewritten whole through `write`) at each epoch
    end that `spec` asks for; points beyond the epoch a run resumes from are dropped."""

    def __init__(
        self,
        spec: CurveSpec,
        test_x: Tensor,
        seed: int,
        path: Path,
        write: Write = write_atomic,
    ) -> None:
        self.spec, self.test_x, self.seed, self.path, self.write = spec, test_x, seed, path, write
        self.points: list[dict[str, Any]] = read_curve(path)

    def __call__(self, model: IWAEModel, epoch: int, epochs: int) -> None:
        if not self.spec.due(epoch, epochs):
            return
        self.points = [p for p in self.points if p["epoch"] < epoch]
        self.points.append(
            {"epoch": epoch, **curve_point(model, self.test_x, self.spec.k, self.seed)}
        )
        self.write(self.path, json.dumps(self.points, indent=1).encode())


def curve_point(model: IWAEModel, x: Tensor, k: int, seed: int) -> dict[str, float]:
    """The mean IWAE bound at `k` over x [N, D] and its standard error over the N images
    (with k and N), in full fp32 products whatever the training loop set."""
    generator = torch.Generator(x.device).manual_seed(seed)
    with tf32_matmuls(False):
        log_px = log_likelihood(model, x, k, generator=generator).log_px  # [N]
    return {
        "test_bound": float(log_px.mean()),
        "std_error": float(log_px.std() / math.sqrt(len(log_px))),
        "k": k,
        "images": len(log_px),
    }


def read_curve(path: Path) -> list[dict[str, Any]]:
    """The points in `path`, [] when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else []
