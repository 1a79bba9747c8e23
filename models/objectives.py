"""Training objectives, all derived from one tensor of log importance weights.

`log_w: [K, B]` holds log p(x, z_k) - log q(z_k|x). The bounds are per example ([B], nats);
only the training step averages over the batch. Objectives whose encoder and decoder follow
different gradient estimators (DReG, PIWAE) return two surrogates, and `backward` routes each
one to its own parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from models.config import TrainConfig
from models.networks import IWAEModel


def elbo(log_w: Tensor) -> Tensor:
    """The ELBO averaged over K samples: [K, B] -> [B]."""
    return log_w.mean(0)


def iwae_bound(log_w: Tensor) -> Tensor:
    """log (1/K) sum_k w_k, computed stably: [K, B] -> [B]."""
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def miwae_bound(log_w: Tensor, m: int) -> Tensor:
    """Mean of M IWAE bounds over disjoint groups of K/M samples: [K, B] -> [B]."""
    grouped = log_w.view(m, log_w.shape[0] // m, log_w.shape[1])  # [M, K/M, B]
    return (torch.logsumexp(grouped, 1) - math.log(grouped.shape[1])).mean(0)


def ciwae_bound(log_w: Tensor, beta: float) -> Tensor:
    """beta * ELBO + (1 - beta) * IWAE on the same samples: [K, B] -> [B]."""
    return beta * elbo(log_w) + (1.0 - beta) * iwae_bound(log_w)


def dreg_encoder_surrogate(log_w: Tensor) -> Tensor:
    """sum_k stopgrad(w~_k)^2 log w_k: [K, B] -> [B] (Tucker et al., 2019, eq. 5).

    Its gradient through the reparameterised z (with q's parameters stopped inside log q) is
    the doubly reparameterised estimator of the IWAE encoder gradient.
    """
    normalized = torch.softmax(log_w.detach(), 0)  # [K, B]
    return (normalized.square() * log_w).sum(0)


@dataclass
class Surrogates:
    """Per-example quantities whose gradients train the encoder and the decoder.

    `bound` is the detached value reported as the training objective ([B], nats).
    """

    encoder: Tensor
    decoder: Tensor
    bound: Tensor


def surrogates(
    model: IWAEModel,
    x: Tensor,
    config: TrainConfig,
    generator: torch.Generator | None = None,
    *,
    observed: Tensor | None = None,
) -> Surrogates:
    """Draw importance samples for x [B, D] and build the surrogates of `config.objective`.

    With `observed` ([B, D], 1 = observed) every bound counts observed pixels only; with the
    `iwae` objective that is Mattei & Frellsen's (2019) MIWAE bound for missing data.
    """
    name, k = config.objective, config.k
    if name in ("miwae", "piwae"):
        log_w = model.log_weights(x, config.m * k, generator, observed=observed)  # [M*K, B]
        grouped = miwae_bound(log_w, config.m)
        if name == "miwae":
            return _shared(grouped)
        # PIWAE: encoder on MIWAE(M, K), decoder on IWAE with all M*K samples.
        bound = iwae_bound(log_w)
        return Surrogates(encoder=grouped, decoder=bound, bound=bound.detach())
    if name in ("iwae-stl", "iwae-dreg"):
        log_w = model.log_weights(x, k, generator, stop_q_params=True, observed=observed)
        bound = iwae_bound(log_w)
        if name == "iwae-stl":
            return _shared(bound)
        return Surrogates(
            encoder=dreg_encoder_surrogate(log_w), decoder=bound, bound=bound.detach()
        )
    log_w = model.log_weights(x, k, generator, observed=observed)  # [K, B]
    if name == "vae":
        return _shared(elbo(log_w))
    if name == "ciwae":
        return _shared(ciwae_bound(log_w, config.beta))
    return _shared(iwae_bound(log_w))


def _shared(bound: Tensor) -> Surrogates:
    return Surrogates(encoder=bound, decoder=bound, bound=bound.detach())


def backward(model: IWAEModel, s: Surrogates) -> None:
    """Accumulate into .grad the gradients that maximise the surrogates' batch means."""
    if s.encoder is s.decoder:
        (-s.encoder.mean()).backward()
        return
    for loss, params, retain in (
        (-s.encoder.mean(), list(model.encoder_parameters()), True),
        (-s.decoder.mean(), list(model.decoder_parameters()), False),
    ):
        grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
