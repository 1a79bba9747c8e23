"""Estimators and diagnostics: log-likelihood, active units, gradient signal-to-noise ratio.

All values are per example in nats unless they say otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import Tensor

from models.config import TrainConfig
from models.networks import IWAEModel
from models.objectives import backward, surrogates

# Elements of one chunk of decoder logits ([chunk, B, D]); bounds memory for any K.
_CHUNK_ELEMENTS = 1 << 23


class ImportanceModel(Protocol):
    def log_weights(
        self, x: Tensor, k: int, generator: torch.Generator | None = None
    ) -> Tensor: ...


@dataclass
class LogLikelihood:
    """Per-example estimates, [B] each, in nats.

    `log_px` is the IWAE bound log (1/K) sum_k w_k, a stochastic lower bound on log p(x)
    that tightens as K grows; `std_error` is its delta-method standard error,
    sqrt(Var(w) / K) / mean(w); `elbo` is the mean of the K log-weights.
    """

    log_px: Tensor
    std_error: Tensor
    elbo: Tensor


@torch.inference_mode()
def log_likelihood(
    model: ImportanceModel,
    x: Tensor,
    k: int = 5000,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> LogLikelihood:
    """Estimate log p(x) for x [B, D] with K importance samples, drawn in chunks.

    A streaming logsumexp of the weights and of their squares keeps memory at one chunk
    however large K is. `on_chunk(samples_done)` runs after every chunk but the last; an
    exception it raises stops the estimate there (a caller's deadline or cancellation).
    """
    batch, dim = x.shape
    chunk_size = chunk_size or max(1, _CHUNK_ELEMENTS // (batch * dim))
    lse_w = x.new_full((batch,), -math.inf)  # log sum_k w_k
    lse_w2 = x.new_full((batch,), -math.inf)  # log sum_k w_k^2
    sum_log_w = x.new_zeros(batch)
    for start in range(0, k, chunk_size):
        log_w = model.log_weights(x, min(chunk_size, k - start), generator)  # [c, B]
        lse_w = torch.logaddexp(lse_w, torch.logsumexp(log_w, 0))
        lse_w2 = torch.logaddexp(lse_w2, torch.logsumexp(2.0 * log_w, 0))
        sum_log_w += log_w.sum(0)
        done = start + log_w.shape[0]
        if on_chunk is not None and done < k:
            on_chunk(done)
    # Var(w) / mean(w)^2 = K sum w^2 / (sum w)^2 - 1, in logs for stability.
    relative_var = torch.expm1(math.log(k) + lse_w2 - 2.0 * lse_w).clamp_min(0.0)
    return LogLikelihood(
        log_px=lse_w - math.log(k),
        std_error=torch.sqrt(relative_var / k),
        elbo=sum_log_w / k,
    )


@torch.inference_mode()
def active_units(
    model: IWAEModel,
    x: Tensor,
    *,
    threshold: float = 0.01,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Burda et al.'s active units, per stochastic layer (bottom first).

    Unit u is active when A_u = Cov_x(E_{q(u|x)}[u]) > `threshold` (0.01 in the paper): its
    posterior mean varies with the input, so the decoder can use it.
    """
    chunks = [
        model.posterior_means(x[i : i + batch_size], generator=generator)
        for i in range(0, len(x), batch_size)
    ]
    counts = []
    for layer in range(len(chunks[0])):
        means = torch.cat([c[layer] for c in chunks])  # [N, d_layer]
        counts.append(int((means.var(0, correction=0) > threshold).sum()))
    return counts


@dataclass
class EvalMetrics:
    """Test-set summary: mean IWAE bound in nats per image and its standard error over images."""

    test_loglik: float
    test_loglik_std_error: float
    active_units: list[int]
    eval_k: int
    eval_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model: IWAEModel,
    x: Tensor,
    k: int = 5000,
    *,
    batch_size: int = 100,
    generator: torch.Generator | None = None,
    on_progress: Callable[[int, int], bool | None] | None = None,
) -> EvalMetrics | None:
    """Mean log-likelihood bound over x [N, D] with K samples per image, and active units.

    `on_progress(done, total)` runs after each batch; returning True stops the evaluation,
    and then the result is None.
    """
    estimates = []
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        estimates.append(log_likelihood(model, batch, k, generator=generator).log_px)
        if on_progress is not None and on_progress(start + len(batch), len(x)):
            return None
    log_px = torch.cat(estimates)  # [N]
    std_error = log_px.std() / math.sqrt(len(log_px)) if len(log_px) > 1 else log_px.new_zeros(())
    return EvalMetrics(
        test_loglik=float(log_px.mean()),
        test_loglik_std_error=float(std_error),
        active_units=active_units(model, x, generator=generator),
        eval_k=k,
        eval_size=len(x),
    )


@dataclass
class GradientSNR:
    """Mean over parameters of |E[g]| / std[g] across draws, per network (Rainforth et al.)."""

    encoder: float
    decoder: float


def gradient_snr(
    model: IWAEModel,
    x: Tensor,
    config: TrainConfig,
    *,
    draws: int = 100,
    generator: torch.Generator | None = None,
) -> GradientSNR:
    """SNR of the gradient estimator of `config.objective` at fixed parameters and data x [B, D].

    Each of the M=`draws` estimates uses fresh importance samples for the same batch.
    """
    networks = {
        "encoder": list(model.encoder_parameters()),
        "decoder": list(model.decoder_parameters()),
    }
    samples: dict[str, list[Tensor]] = {name: [] for name in networks}
    for _ in range(draws):
        model.zero_grad(set_to_none=True)
        backward(model, surrogates(model, x, config, generator))
        for name, params in networks.items():
            samples[name].append(
                torch.cat([_grad_or_zeros(p).flatten() for p in params])  # [P]
            )
    model.zero_grad(set_to_none=True)
    snr = {}
    for name, grads in samples.items():
        stacked = torch.stack(grads)  # [M, P]
        mean, std = stacked.mean(0), stacked.std(0)
        varying = std > 0  # parameters with no gradient noise carry no SNR information
        snr[name] = float((mean[varying].abs() / std[varying]).mean())
    return GradientSNR(**snr)


def _grad_or_zeros(p: Tensor) -> Tensor:
    return p.grad.detach() if p.grad is not None else torch.zeros_like(p)
