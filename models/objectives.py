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

from models.config import VR_OBJECTIVES, TrainConfig
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


def vr_iwae_bound(log_w: Tensor, alpha: float) -> Tensor:
    """The VR-IWAE bound 1/(1-alpha) log (1/K) sum_k w_k^(1-alpha): [K, B] -> [B].

    Daudel, Benton, Shi & Doucet (2023), "Alpha-divergence variational inference meets
    importance weighted auto-encoders", JMLR, the VR-IWAE bound L^(N,alpha) (their N is our
    K). alpha = 0 is the IWAE bound (bit for bit here); it falls as alpha grows (a power mean
    of the weights with exponent 1-alpha) and tends to the ELBO as alpha -> 1. alpha in [0, 1).
    """
    scale = 1.0 - alpha
    return (torch.logsumexp(scale * log_w, 0) - math.log(log_w.shape[0])) / scale


def dreg_encoder_surrogate(log_w: Tensor, alpha: float = 0.0) -> Tensor:
    """sum_k stopgrad(alpha v_k + (1-alpha) v_k^2) log w_k: [K, B] -> [B].

    v = softmax((1-alpha) log w) are the normalised w^(1-alpha). Its gradient through the
    reparameterised z (with q's parameters stopped inside log q) is the doubly reparameterised
    estimator of the encoder gradient of `vr_iwae_bound`; alpha = 0 is IWAE's DReG (Tucker et
    al., 2019, eq. 5), bit for bit. Derivation: d/dphi of the bound is sum_k v_k (path_k -
    score_k), and for the score term E[v_k d/dphi log q(z_k)] = E[d v_k/dz_k dz_k/dphi] (the
    reparameterisation identity applied to v_k as a function of z_k), where
    d v_k / d log w_k = (1-alpha) v_k (1 - v_k); so the gradient is sum_k (v_k - (1-alpha)
    v_k (1 - v_k)) path_k = sum_k (alpha v_k + (1-alpha) v_k^2) path_k: the weights of
    Daudel et al.'s (2023) doubly reparameterised VR-IWAE gradient, as also used by the
    public code of their Gaussian experiment (`vr_iwae_dreg_loss`).
    """
    normalized = torch.softmax((1.0 - alpha) * log_w.detach(), 0)  # [K, B]
    weights = alpha * normalized + (1.0 - alpha) * normalized.square()  # [K, B]
    return (weights * log_w).sum(0)


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
    k: int | None = None,
    observed: Tensor | None = None,
) -> Surrogates:
    """Draw importance samples for x [B, D] and build the surrogates of `config.objective`.

    `k` overrides `config.k` (the K of the current epoch under a `k_schedule`). With
    `observed` ([B, D], 1 = observed) every bound counts observed pixels only; with the
    `iwae` objective that is Mattei & Frellsen's (2019) MIWAE bound for missing data.
    """
    draws, stop_q = sampling_plan(config, k)
    log_w = model.log_weights(x, draws, generator, stop_q_params=stop_q, observed=observed)
    return surrogates_of(log_w, config)


def sampling_plan(config: TrainConfig, k: int | None = None) -> tuple[int, bool]:
    """(samples per image, whether log q stops q's parameters) of `config.objective`.

    `miwae` and `piwae` draw M groups of K; STL and the DReG estimators evaluate log q with
    the inference network's parameters stopped (`IWAEModel.log_weights(stop_q_params=True)`).
    """
    k = k or config.k
    if config.objective in ("miwae", "piwae"):
        return config.m * k, False
    return k, config.objective in ("iwae-stl", "iwae-dreg", "vr-iwae-dreg")


def surrogates_of(log_w: Tensor, config: TrainConfig) -> Surrogates:
    """The surrogates of `config.objective` from log-weights drawn by `sampling_plan`:
    [K, B] (M*K for `miwae` and `piwae`) -> `Surrogates` of [B] each."""
    name = config.objective
    if name in ("miwae", "piwae"):
        grouped = miwae_bound(log_w, config.m)  # log_w: [M*K, B]
        if name == "miwae":
            return _shared(grouped)
        # PIWAE: encoder on MIWAE(M, K), decoder on IWAE with all M*K samples.
        bound = iwae_bound(log_w)
        return Surrogates(encoder=grouped, decoder=bound, bound=bound.detach())
    # IWAE is VR-IWAE at alpha = 0: one path serves both families.
    alpha = config.alpha if name in VR_OBJECTIVES else 0.0
    if name in ("iwae-stl", "iwae-dreg", "vr-iwae-dreg"):  # log_w with q's parameters stopped
        bound = vr_iwae_bound(log_w, alpha)  # alpha = 0: iwae_bound, bit for bit
        if name == "iwae-stl":
            return _shared(bound)
        return Surrogates(
            encoder=dreg_encoder_surrogate(log_w, alpha), decoder=bound, bound=bound.detach()
        )
    if name == "vae":
        return _shared(elbo(log_w))
    if name == "ciwae":
        return _shared(ciwae_bound(log_w, config.beta))
    if name == "vr-iwae":
        return _shared(vr_iwae_bound(log_w, alpha))
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
