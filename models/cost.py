"""The compute a training run asks for, counted before it runs.

Every step of every objective draws `k` importance samples per image (`m` groups of `k` for
`miwae` and `piwae`, Rainforth et al. 2018). The first encoder block runs once per image;
everything after it (the decoder, and the upper encoder blocks of a two-layer model) once
per sample. Its cost in floating-point operations grows with the square of the network's
width, so samples alone would admit a `hidden_dim` of 4096 at 400 times the cost of Burda's
200: the budgets count FLOPs, 2 per multiply-add of each linear layer, three passes (forward,
and backward for the inputs and for the weights). The memory of a step grows with the
samples it draws at once (and the width: bounded by both budgets per step). All are pure
functions of the `TrainConfig`, so a service can refuse a run before a worker starts it.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import ModelConfig, TrainConfig

TRAIN_IMAGES = 60_000  # MNIST's training set; `train_size=None` trains on all of it
# Objectives that draw `m` groups of `k` samples per image; the others draw `k`.
GROUPED_OBJECTIVES = ("miwae", "piwae")
# FLOPs per multiply-add of a training step: 2 forward, 4 backward (inputs and weights).
TRAIN_FLOPS_PER_MAC = 6


def _mlp_macs(d_in: int, hidden: int, d_out: int) -> int:
    """Multiply-adds per row of `models.networks._mlp(d_in, hidden, d_out)`."""
    return d_in * hidden + hidden * hidden + hidden * d_out


def network_macs(model: ModelConfig) -> tuple[int, int]:
    """Multiply-adds per image (the first encoder block, x -> z1) and per importance
    sample (every other block), as `models.networks.IWAEModel` builds them."""
    widths = (model.x_dim, *model.latent_dims)
    hidden = model.hidden_dims
    per_image = _mlp_macs(widths[0], hidden[0], 2 * widths[1])
    per_sample = _mlp_macs(widths[1], hidden[0], widths[0])  # p(x | z1)
    for i in range(1, model.layers):
        per_sample += _mlp_macs(widths[i], hidden[i], 2 * widths[i + 1])  # q(z_i+1 | z_i)
        per_sample += _mlp_macs(widths[i + 1], hidden[i], 2 * widths[i])  # p(z_i | z_i+1)
    return per_image, per_sample


@dataclass(frozen=True)
class TrainCost:
    """Importance samples a run draws (per image per step, per step, in all), and FLOPs."""

    k: int
    groups: int  # m for the grouped objectives, 1 for the others
    batch_size: int  # images per step (the data set, when it is smaller than a batch)
    images: int  # images per epoch
    epochs: int
    image_macs: int  # multiply-adds per image of a step (`network_macs`)
    sample_macs: int  # multiply-adds per importance sample of a step

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

    @property
    def step_flops(self) -> int:
        """6*(batch*image_macs + k*m*batch*sample_macs): one training step (its time)."""
        macs = self.batch_size * self.image_macs + self.samples_per_step * self.sample_macs
        return TRAIN_FLOPS_PER_MAC * macs

    @property
    def train_flops(self) -> int:
        """6*epochs*images*(image_macs + k*m*sample_macs): the whole run (its time)."""
        per_image = self.image_macs + self.samples_per_image * self.sample_macs
        return TRAIN_FLOPS_PER_MAC * self.epochs * self.images * per_image


def train_cost(config: TrainConfig) -> TrainCost:
    """What `config` costs to train (the final evaluation, at most 10,000 x `eval_k`
    samples without gradients, is not counted). Under a K schedule (`linear`, `ess`) an
    epoch uses at most `k`, so the counts are upper bounds, as a budget needs."""
    images = min(config.train_size or TRAIN_IMAGES, TRAIN_IMAGES)
    image_macs, sample_macs = network_macs(config.model)
    return TrainCost(
        k=config.k,
        groups=config.m if config.objective in GROUPED_OBJECTIVES else 1,
        batch_size=min(config.batch_size, images),
        images=images,
        epochs=config.epochs,
        image_macs=image_macs,
        sample_macs=sample_macs,
    )
