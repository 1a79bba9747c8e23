"""The compute a training run asks for, counted in importance samples, before it runs.

Every step of every objective draws `k` importance samples per image (`m` groups of `k` for
`miwae` and `piwae`, Rainforth et al. 2018), and each sample costs one pass of the
decoder (784 logits) forward and backward. So the memory of a step grows with the samples
it draws at once, and the run's time with the samples it draws in all; both are pure
functions of the `TrainConfig`, so a service can refuse a run before a worker starts it.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import TrainConfig

TRAIN_IMAGES = 60_000  # MNIST's training set; `train_size=None` trains on all of it
# Objectives that draw `m` groups of `k` samples per image; the others draw `k`.
GROUPED_OBJECTIVES = ("miwae", "piwae")


@dataclass(frozen=True)
class TrainCost:
    """Importance samples a run draws: per image per step, per step, and in all."""

    k: int
    groups: int  # m for the grouped objectives, 1 for the others
    batch_size: int  # images per step (the data set, when it is smaller than a batch)
    images: int  # images per epoch
    epochs: int

    @property
    def samples_per_image(self) -> int:
        return self.k * self.groups

    @property
    def samples_per_step(self) -> int:
        """k * m * batch_size: the rows the decoder sees at once (bounds a step's memory)."""
        return self.samples_per_image * self.batch_size

    @property
    def train_samples(self) -> int:
        """epochs * images * k * m: samples drawn by the whole run (bounds its time)."""
        return self.samples_per_image * self.images * self.epochs


def train_cost(config: TrainConfig) -> TrainCost:
    """What `config` costs to train (the final evaluation, at most 10,000 x `eval_k`
    samples without gradients, is not counted). Under a K schedule (`linear`, `ess`) an
    epoch uses at most `k`, so the counts are upper bounds, as a budget needs."""
    images = min(config.train_size or TRAIN_IMAGES, TRAIN_IMAGES)
    return TrainCost(
        k=config.k,
        groups=config.m if config.objective in GROUPED_OBJECTIVES else 1,
        batch_size=min(config.batch_size, images),
        images=images,
        epochs=config.epochs,
    )
