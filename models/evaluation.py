"""Test-set evaluation: the mean log-likelihood bound, its diagnostics, active units.

All values are in nats per image unless they say otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from models.estimators import log_likelihood
from models.networks import IWAEModel
from models.progress import Callback, PhaseClock, Stopped, notify


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
    """Test-set summary, in nats per image unless said otherwise.

    `test_loglik` is the mean IWAE bound (k=`eval_k`) and `test_loglik_std_error` its
    standard error over images; `test_elbo` the mean ELBO of the same draws; `test_gap`
    = test_loglik - test_elbo estimates log p(x) - ELBO = KL(q(z|x) || p(z|x)) averaged over
    images, the quality of inference (Rainforth et al., 2018, section 5); as test_loglik is
    itself a lower bound, the estimate errs low.
    `mc_std_error_mean` is the mean of the per-image delta-method Monte Carlo errors,
    `ess_mean` the mean effective sample size, `pareto_k_mean` the mean PSIS k-hat and
    `pareto_k_above_0_7` the share of images whose k-hat exceeds 0.7, where the per-image
    error is not to be trusted (both None when eval_k <= 20).
    """

    test_loglik: float
    test_loglik_std_error: float
    active_units: list[int]
    eval_k: int
    eval_size: int
    test_elbo: float
    test_gap: float
    mc_std_error_mean: float
    ess_mean: float
    pareto_k_mean: float | None
    pareto_k_above_0_7: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model: IWAEModel,
    x: Tensor,
    k: int = 5000,
    *,
    batch_size: int = 100,
    generator: torch.Generator | None = None,
    callbacks: Sequence[Callback] = (),
) -> EvalMetrics | None:
    """Mean log-likelihood bound over x [N, D] with K samples per image, its diagnostics,
    and active units.

    `callbacks` see an "eval" `Progress` (images scored) after each batch, and a "loglik"
    one (samples drawn of K) after each chunk within a batch: a wide network's batch at
    k=5000 can take minutes, and a worker's stall detector must still hear from it. When one
    returns True the evaluation stops, and then the result is None.
    """
    estimates = []
    clock = PhaseClock("eval")
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        try:
            estimates.append(
                log_likelihood(model, batch, k, generator=generator, callbacks=callbacks)
            )
        except Stopped:
            return None
        if notify(callbacks, clock.event(start + len(batch), len(x))):
            return None
    log_px, elbo_, std_error, ess, pareto_k = (
        torch.cat([getattr(e, name) for e in estimates])  # [N]
        for name in ("log_px", "elbo", "std_error", "ess", "pareto_k")
    )
    fitted = pareto_k[~pareto_k.isnan()]
    return EvalMetrics(
        test_loglik=float(log_px.mean()),
        test_loglik_std_error=float(_std_error_of_mean(log_px)),
        active_units=active_units(model, x, generator=generator),
        eval_k=k,
        eval_size=len(x),
        test_elbo=float(elbo_.mean()),
        test_gap=float((log_px - elbo_).mean()),
        mc_std_error_mean=float(std_error.mean()),
        ess_mean=float(ess.mean()),
        pareto_k_mean=float(fitted.mean()) if len(fitted) else None,
        pareto_k_above_0_7=float((fitted > 0.7).double().mean()) if len(fitted) else None,
    )


def _std_error_of_mean(values: Tensor) -> Tensor:
    if len(values) < 2:
        return values.new_zeros(())
    return values.std() / math.sqrt(len(values))
