"""Log-densities of the distributions the models use, summed over the event axis (last).

All functions broadcast over leading axes, so `x: [B, D]` scores against `logits: [K, B, D]`
without materialising K copies of x.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(logvar))): [..., d] -> [...]."""
    return -0.5 * (_LOG_2PI + logvar + (z - mu).square() * torch.exp(-logvar)).sum(-1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I): [..., d] -> [...]."""
    return -0.5 * (_LOG_2PI + z.square()).sum(-1)


def bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)): x [..., D] broadcast against logits [..., D] -> [...].

    Written as x * l - softplus(l), the stable form of binary cross-entropy with logits that
    also broadcasts (F.binary_cross_entropy_with_logits would need x expanded to K copies).
    Each term is summed before subtracting, which saves a pass over the [K, B, D] logits.
    """
    return (x * logits).sum(-1) - F.softplus(logits).sum(-1)
