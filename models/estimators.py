"""Estimators and diagnostics: log-likelihood and its PSIS/ESS diagnostics, active units,
gradient signal-to-noise ratio.

All values are per example in nats unless they say otherwise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import Tensor

from models.config import MIN_SNR_DRAWS, TrainConfig
from models.fastpath import fast_path
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
    """Per-example estimates, [B] each, in nats (except `ess` and `pareto_k`).

    `log_px` is the IWAE bound log (1/K) sum_k w_k, a stochastic lower bound on log p(x)
    that tightens as K grows; `std_error` is its delta-method standard error,
    sqrt(Var(w) / K) / mean(w); `elbo` is the mean of the K log-weights. `ess` is the
    effective sample size (sum w)^2 / sum w^2, between 1 and K. `top_log_w` [M+1, B] holds
    the largest log-weights, from which `pareto_k` is fitted when first read.
    """

    log_px: Tensor
    std_error: Tensor
    elbo: Tensor
    ess: Tensor
    top_log_w: Tensor

    @functools.cached_property
    def pareto_k(self) -> Tensor:
        """PSIS k-hat of the largest weights, [B] (`pareto_k_hat`): above 0.7 the weights'
        variance is not finite in practice, and `std_error` (which assumes it is)
        understates the real error. NaN when K <= 20: a tail of fewer than 5 weights cannot
        be fitted."""
        if len(self.top_log_w) - 1 < _MIN_TAIL:
            return torch.full_like(self.log_px, math.nan)
        return pareto_k_hat(self.top_log_w)


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

    A streaming logsumexp of the weights and of their squares, and a running top-M of the
    log-weights for the Pareto fit, keep memory at one chunk however large K is.
    `on_chunk(samples_done)` runs after every chunk but the last; an exception it raises
    stops the estimate there (a caller's deadline or cancellation). An `IWAEModel` that the
    fast path covers (`models.fastpath`) draws its log-weights there on a CPU: the same
    draws and values, up to rounding.
    """
    # On a GPU the reference is the faster one: an H200 scored 10,000 images at k=5000 in
    # 3.6 s with it, 4.8 to 10.3 s with the fast path (bench/gpu_check.py).
    if isinstance(model, IWAEModel) and not x.is_cuda:
        model = fast_path(model) or model
    batch, dim = x.shape
    chunk_size = chunk_size or max(1, _CHUNK_ELEMENTS // (batch * dim))
    tail = psis_tail_length(k)
    lse_w = x.new_full((batch,), -math.inf)  # log sum_k w_k
    lse_w2 = x.new_full((batch,), -math.inf)  # log sum_k w_k^2
    sum_log_w = x.new_zeros(batch)
    top = x.new_full((0, batch), -math.inf)  # the largest log-weights so far, [<=M+1, B]
    for start in range(0, k, chunk_size):
        log_w = model.log_weights(x, min(chunk_size, k - start), generator)  # [c, B]
        lse_w = torch.logaddexp(lse_w, torch.logsumexp(log_w, 0))
        lse_w2 = torch.logaddexp(lse_w2, torch.logsumexp(2.0 * log_w, 0))
        sum_log_w += log_w.sum(0)
        both = torch.cat([top, log_w])  # [<=M+1+c, B]
        top = both.topk(min(tail + 1, len(both)), dim=0).values
        done = start + log_w.shape[0]
        if on_chunk is not None and done < k:
            on_chunk(done)
    # Var(w) / mean(w)^2 = K sum w^2 / (sum w)^2 - 1, in logs for stability.
    relative_var = torch.expm1(math.log(k) + lse_w2 - 2.0 * lse_w).clamp_min(0.0)
    return LogLikelihood(
        log_px=lse_w - math.log(k),
        std_error=torch.sqrt(relative_var / k),
        elbo=sum_log_w / k,
        ess=torch.exp(2.0 * lse_w - lse_w2),
        top_log_w=top,
    )


# --- Pareto smoothed importance sampling diagnostic ---------------------------------------

_MIN_TAIL = 5  # fewer tail weights than this cannot be fitted (as in ArviZ's psislw)


def psis_tail_length(k: int) -> int:
    """M = ceil(min(K / 5, 3 sqrt(K))) largest weights enter the fit (Vehtari et al., 2024,
    "Pareto smoothed importance sampling", JMLR 25, with relative efficiency 1)."""
    return math.ceil(min(0.2 * k, 3.0 * math.sqrt(k)))


def pareto_k_hat(top_log_w: Tensor) -> Tensor:
    """PSIS k-hat from the M+1 largest log-weights of each example: [M+1, B] -> [B].

    The M weights above the smallest of them, the threshold u, are fitted with a generalized
    Pareto distribution; k-hat is its shape (Vehtari et al., 2024). Values above 0.7 mean the
    importance-sampling estimate is unreliable; above 0.5 the weights' variance is infinite
    in theory. NaN where the tail is degenerate (all M weights equal u).
    """
    top = top_log_w.double()
    top_sorted = top.sort(dim=0).values  # ascending, [M+1, B]
    threshold = top_sorted[0]  # [B]
    peak = top_sorted[-1]  # [B]
    # exp(log w - max) - exp(u - max): the exceedances, scaled by 1/max w (k is scale-free).
    exceedances = torch.exp(top_sorted[1:] - peak) - torch.exp(threshold - peak)  # [M, B]
    k_hat = _gpd_shape(exceedances.T)  # [B]
    degenerate = exceedances[-1] <= 0
    return torch.where(degenerate, math.nan, k_hat).to(top_log_w.dtype)


def _gpd_shape(x: Tensor) -> Tensor:
    """Shape k of a generalized Pareto fit to the ascending positive rows of x [B, n] -> [B].

    Zhang & Stephens (2009), "A new and efficient estimation method for the generalized
    Pareto distribution", Technometrics 51(3): the posterior mean of theta = -k/sigma over a
    grid of m = 30 + sqrt(n) values, weighted by the profile likelihood, then k from theta;
    finally the weak prior of Vehtari et al. (2024) that shrinks k toward 0.5
    with the weight of 10 observations. Written in the sign convention where k > 0 is a
    heavy tail, as ArviZ's `_gpdfit`.
    """
    n = x.shape[-1]
    m = 30 + int(math.sqrt(n))
    j = torch.arange(1, m + 1, dtype=x.dtype, device=x.device)  # [m]
    quartile = x[:, int(n / 4 + 0.5) - 1]  # [B], first quartile of the sorted sample
    theta = 1.0 / x[:, -1:] + (1.0 - torch.sqrt(m / (j - 0.5))) / (3.0 * quartile[:, None])
    k = torch.log1p(-theta[:, :, None] * x[:, None, :]).mean(-1)  # [B, m]
    profile = n * (torch.log(-theta / k) - k - 1.0)  # [B, m], the profile log-likelihood
    weights = torch.softmax(torch.nan_to_num(profile, nan=-math.inf), dim=-1)
    theta_post = (weights * theta).sum(-1, keepdim=True)  # [B, 1]
    k_post = torch.log1p(-theta_post * x).mean(-1)  # [B]
    return (n * k_post + 10 * 0.5) / (n + 10)


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


class _Stopped(Exception):
    """`on_progress` asked to stop in the middle of a batch."""


def evaluate(
    model: IWAEModel,
    x: Tensor,
    k: int = 5000,
    *,
    batch_size: int = 100,
    generator: torch.Generator | None = None,
    on_progress: Callable[[int, int], bool | None] | None = None,
) -> EvalMetrics | None:
    """Mean log-likelihood bound over x [N, D] with K samples per image, its diagnostics,
    and active units.

    `on_progress(done, total)` runs after each batch, and with the same `done` after each
    chunk of samples within one (a wide network's batch at k=5000 can take minutes: a
    worker's stall detector must still hear from it); returning True stops the evaluation,
    and then the result is None.
    """

    def each_chunk(done: int) -> Callable[[int], None]:
        def on_chunk(_: int) -> None:
            if on_progress is not None and on_progress(done, len(x)):
                raise _Stopped

        return on_chunk

    estimates = []
    try:
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size]
            estimates.append(
                log_likelihood(model, batch, k, generator=generator, on_chunk=each_chunk(start))
            )
            if on_progress is not None and on_progress(start + len(batch), len(x)):
                return None
    except _Stopped:
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


@dataclass
class SNRSummary:
    """Signal-to-noise ratios |E[g]| / std[g] of a P-parameter gradient estimator.

    `median`: the median over parameters of each one's bias-corrected SNR; `rms`: the root
    of the mean over parameters of the bias-corrected SNR^2, which resolves smaller SNRs
    than the median because it averages the estimates before clipping them at 0;
    `direction`: the SNR of the whole gradient projected on its mean direction, E[u.g] /
    std[u.g] with u = E[g] / |E[g]|, the signal that a step along the mean sees.
    `parameters` counts the parameters whose gradient varies (the others carry no noise).
    """

    median: float
    rms: float
    direction: float
    parameters: int


class SNRAccumulator:
    """Streams M draws g_1..g_M of a gradient [P] into `SNRSummary` with memory O(P).

    Rainforth et al. (2018) define SNR = |E g| / std g per parameter; its plug-in
    estimate |mean| / sd has a floor: at true SNR 0 it averages sqrt(2 / (pi M)). Here,
    with mean m and unbiased variance v of M draws, for Gaussian draws
    E[m^2 / v] = (SNR^2 + 1/M) (M - 1) / (M - 3), so (M - 3) / (M - 1) m^2 / v - 1/M is an
    unbiased estimate of SNR^2; it is clipped at 0 only after averaging (`rms`) or as a
    monotone map under the median. The direction u is estimated from the first half of the
    draws and the projections u.g measured on the second half, so that u's own noise does
    not inflate the signal. Where the per-parameter SNRs are below ~1/sqrt(M/2), u itself is
    noisy and `direction` is the SNR along that perturbed direction (lower, for isotropic
    noise, than along the true mean).
    """

    def __init__(self, draws: int) -> None:
        if draws < MIN_SNR_DRAWS:
            raise ValueError(f"the SNR needs at least {MIN_SNR_DRAWS} draws")
        self.draws, self.seen = draws, 0
        self._sum: Tensor | None = None  # [P], float64
        self._sum_sq: Tensor | None = None
        self._direction: Tensor | None = None  # unit mean of the first half, [P]
        self._projections: list[Tensor] = []

    def add(self, g: Tensor) -> None:
        """One draw [P]."""
        g = g.detach().double()
        if self._sum is None:
            self._sum, self._sum_sq = torch.zeros_like(g), torch.zeros_like(g)
        if self._direction is not None:
            self._projections.append(self._direction @ g)
        self._sum += g
        self._sum_sq += g.square()
        self.seen += 1
        if self.seen == self.draws // 2:
            norm = self._sum.norm()
            self._direction = self._sum / norm if norm > 0 else torch.zeros_like(g)

    def summary(self) -> SNRSummary:
        if self.seen != self.draws:
            raise ValueError(f"expected {self.draws} draws, got {self.seen}")
        mean = self._sum / self.draws  # [P]
        var = (self._sum_sq - self.draws * mean.square()) / (self.draws - 1)  # [P]
        varying = var > 0
        snr2 = _unbiased_snr2(mean[varying], var[varying], self.draws)  # [P']
        projections = torch.stack(self._projections)  # [M - M/2]
        direction2 = _unbiased_snr2(projections.mean(), projections.var(), len(projections))
        return SNRSummary(
            median=float(snr2.clamp_min(0).sqrt().median()) if len(snr2) else 0.0,
            rms=float(snr2.mean().clamp_min(0).sqrt()) if len(snr2) else 0.0,
            direction=float(direction2.clamp_min(0).sqrt()) if projections.var() > 0 else 0.0,
            parameters=int(varying.sum()),
        )


def _unbiased_snr2(mean: Tensor, var: Tensor, m: int) -> Tensor:
    """Unbiased estimate of SNR^2 from the mean and unbiased variance of m Gaussian draws."""
    return (m - 3) / (m - 1) * mean.square() / var - 1.0 / m


def snr_summary(grads: Tensor) -> SNRSummary:
    """`SNRSummary` of M draws of a P-parameter gradient held in one tensor [M, P]."""
    accumulator = SNRAccumulator(len(grads))
    for g in grads:
        accumulator.add(g)
    return accumulator.summary()


@dataclass
class GradientSNR:
    """The SNR of the encoder's and of the decoder's gradient estimator."""

    encoder: SNRSummary
    decoder: SNRSummary

    def to_dict(self) -> dict:
        return asdict(self)


def gradient_snr(
    model: IWAEModel,
    x: Tensor,
    config: TrainConfig,
    *,
    draws: int = 1000,
    generator: torch.Generator | None = None,
    on_progress: Callable[[int, int], bool | None] | None = None,
) -> GradientSNR | None:
    """SNR of the gradient estimator of `config.objective` at fixed parameters and data x [B, D].

    Each of the M=`draws` estimates is the gradient of the batch-mean surrogate with fresh
    importance samples for the same x; Rainforth et al. (2018) measure it with B=1.
    `on_progress(done, draws)` runs after each draw; returning True stops the measurement,
    and then the result is None.
    """
    networks = {
        "encoder": list(model.encoder_parameters()),
        "decoder": list(model.decoder_parameters()),
    }
    accumulators = {name: SNRAccumulator(draws) for name in networks}
    for draw in range(draws):
        model.zero_grad(set_to_none=True)
        backward(model, surrogates(model, x, config, generator))
        for name, params in networks.items():
            accumulators[name].add(
                torch.cat([_grad_or_zeros(p).flatten() for p in params])  # [P]
            )
        if on_progress is not None and on_progress(draw + 1, draws):
            model.zero_grad(set_to_none=True)
            return None
    model.zero_grad(set_to_none=True)
    return GradientSNR(**{name: acc.summary() for name, acc in accumulators.items()})


def gradient_snr_per_image(
    model: IWAEModel,
    x: Tensor,
    config: TrainConfig,
    *,
    draws: int = 1000,
    generator: torch.Generator | None = None,
) -> GradientSNR:
    """`gradient_snr` of each image of x [N, D] alone (B=1, as Rainforth et al., 2018),
    each summary averaged over the N images."""
    if len(x) == 0:
        raise ValueError("the SNR needs at least one image")
    per_image = [
        gradient_snr(model, x[i : i + 1], config, draws=draws, generator=generator)
        for i in range(len(x))
    ]

    def mean(network: str) -> SNRSummary:
        summaries = [getattr(s, network) for s in per_image]
        return SNRSummary(
            median=sum(s.median for s in summaries) / len(summaries),
            rms=sum(s.rms for s in summaries) / len(summaries),
            direction=sum(s.direction for s in summaries) / len(summaries),
            parameters=max(s.parameters for s in summaries),
        )

    return GradientSNR(encoder=mean("encoder"), decoder=mean("decoder"))


def snr_slopes(
    ks: Sequence[int], snrs: Sequence[GradientSNR]
) -> dict[str, dict[str, float | None]]:
    """log-log slope of every summary of both networks against K: {"encoder": {"median":
    slope, "rms": ..., "direction": ...}, "decoder": {...}}."""
    return {
        network: {
            summary: loglog_slope(ks, [getattr(getattr(s, network), summary) for s in snrs])
            for summary in ("median", "rms", "direction")
        }
        for network in ("encoder", "decoder")
    }


def loglog_slope(ks: Sequence[int], values: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) against log(K) over the positive values; None when
    fewer than two are positive. Rainforth et al. (2018), theorem 1: about -1/2 for IWAE's
    encoder gradient and +1/2 for its decoder's."""
    points = [(math.log(k), math.log(v)) for k, v in zip(ks, values, strict=True) if v > 0]
    if len(points) < 2:
        return None
    xs, ys = torch.tensor(points, dtype=torch.float64).T
    xs = xs - xs.mean()
    if not (xs != 0).any():
        return None
    return float((xs * (ys - ys.mean())).sum() / xs.square().sum())


def _grad_or_zeros(p: Tensor) -> Tensor:
    return p.grad.detach() if p.grad is not None else torch.zeros_like(p)
