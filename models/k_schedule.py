"""Which K each epoch trains with: `fixed`, `linear` or `ess` (`TrainConfig.k_schedule`).

- `fixed`: every epoch uses `k`.
- `linear`: epoch e of E (0-based) uses round(k_min + (k - k_min) e / (E - 1)); the first
  epoch uses `k_min`, the last `k`.
- `ess`: the first epoch uses `k_min`; after each epoch, the normalised effective sample size
  ESS/K (Kong, 1992: ESS = (sum w)^2 / sum w^2) of `k` importance weights per image on a
  held-out batch decides the next K: below `ess_target`, q is a poor proposal for the
  posterior and K doubles; above it, K halves; always within `k_min..k`. The rule is ours;
  only the ESS is standard.

  ESS/K is measured with the ceiling `k`, not with the current K, on purpose: for a fixed
  model ESS/K falls as K grows (on MNIST after one epoch: 0.60, 0.34, 0.26, 0.16 at K = 2,
  5, 10, 50; see docs/science.md), and at K = 1 it is 1 by definition, so measured at the current K
  the rule would be a positive feedback that runs to `k` or `k_min` and stays there.
  Measured at `k` it tracks how well q matches the posterior, whatever K the last epoch
  trained with.

The K of the next epoch is a pure function of the config, the epoch and (for `ess`) one
measurement drawn from the training generator, so a resumed run follows the same schedule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.config import TrainConfig
from models.networks import IWAEModel

# Factor by which the `ess` schedule raises or lowers K after an epoch.
ESS_STEP = 2


def initial_k(config: TrainConfig) -> int:
    """K of the first epoch."""
    return config.k if config.k_schedule == "fixed" else config.k_min


def linear_k(config: TrainConfig, epoch: int) -> int:
    """K of 0-based `epoch` under the `linear` schedule: k_min first, k last."""
    if config.epochs == 1:
        return config.k
    fraction = min(epoch, config.epochs - 1) / (config.epochs - 1)
    return round(config.k_min + (config.k - config.k_min) * fraction)


def normalized_ess(log_w: Tensor) -> Tensor:
    """ESS / K = (sum_k w_k)^2 / (K sum_k w_k^2), in (0, 1], from log-weights: [K, B] -> [B]."""
    k = log_w.shape[0]
    return torch.exp(
        2.0 * torch.logsumexp(log_w, 0) - torch.logsumexp(2.0 * log_w, 0) - math.log(k)
    )


def ess_k(config: TrainConfig, k: int, ess: float) -> int:
    """The `ess` rule: K after an epoch trained with `k` whose held-out ESS/K was `ess`."""
    if ess < config.ess_target:
        return min(config.k, k * ESS_STEP)
    if ess > config.ess_target:
        return max(config.k_min, k // ESS_STEP)
    return k


@torch.no_grad()
def held_out_ess(
    model: IWAEModel, x: Tensor, k: int, generator: torch.Generator | None = None
) -> float:
    """Mean over the held-out binary batch x [B, D] of ESS/K with `k` fresh samples per image."""
    return float(normalized_ess(model.log_weights(x, k, generator)).mean())


def next_k(
    config: TrainConfig,
    epochs_done: int,
    k: int,
    ess: float | None,
) -> int:
    """K of the epoch after `epochs_done` epochs, the last of which used `k`.

    `ess` is the held-out ESS/K measured after that epoch (needed by `ess` only).
    """
    if config.k_schedule == "linear":
        return linear_k(config, epochs_done)
    if config.k_schedule == "ess":
        if ess is None:
            raise ValueError("the ess schedule needs the held-out ESS/K")
        return ess_k(config, k, ess)
    return config.k
