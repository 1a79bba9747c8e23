"""Tests for models.estimators (and the PSIS figures of models.evaluation) against models
whose log p(x) is known exactly.

`log_likelihood` accepts any object with `log_weights(x, k, generator)`, so the oracles here
are small models written in the test, in float64:

- a linear-Gaussian model, p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I), whose marginal
  log p(x) = log N(x; b, W W^T + s^2 I) and posterior are closed-form;
- a 1-D latent model with a Bernoulli likelihood, whose log p(x) comes from dense quadrature;
- a replay model that hands out fixed log-weights, for the streaming arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.distributions import Bernoulli, MultivariateNormal, Normal

from models.estimators import log_likelihood
from models.evaluation import evaluate
from models.progress import Progress

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class LinearGaussian:
    """p(z) = N(0, I_d), p(x|z) = N(Wz + b, s^2 I_D) with d=2, D=3; q(z|x) a Gaussian.

    q is the exact posterior N(mu(x), S) with S = (I + W^T W / s^2)^-1 and
    mu(x) = S W^T (x - b) / s^2, moved by `shift` and with its covariance scaled by `scale`^2.
    """

    def __init__(self, shift: float = 0.0, scale: float = 1.0) -> None:
        self.W = torch.tensor([[1.0, -0.5], [0.3, 2.0], [-1.2, 0.7]], dtype=F64)  # [D, d]
        self.b = torch.tensor([0.2, -0.4, 1.0], dtype=F64)
        self.s = 0.7
        self.shift, self.scale = shift, scale
        posterior_cov = torch.linalg.inv(torch.eye(2, dtype=F64) + self.W.T @ self.W / self.s**2)
        self.posterior_cov = posterior_cov  # [d, d]
        self.q_tril = scale * torch.linalg.cholesky(posterior_cov)  # [d, d]

    def log_px(self, x: Tensor) -> Tensor:
        """The closed form: [B, D] -> [B]."""
        cov = self.W @ self.W.T + self.s**2 * torch.eye(3, dtype=F64)
        return MultivariateNormal(self.b, cov).log_prob(x)

    def posterior_mean(self, x: Tensor) -> Tensor:
        return (x - self.b) @ self.W @ self.posterior_cov / self.s**2  # [B, d]

    def log_weights(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        mu_q = self.posterior_mean(x) + self.shift  # [B, d]
        eps = torch.randn((k, *mu_q.shape), generator=generator, dtype=F64)  # [K, B, d]
        z = mu_q + eps @ self.q_tril.T  # [K, B, d]
        # log q(z) = log N(eps; 0, I) - log |det L|, as z = mu + L eps.
        log_q = -0.5 * (eps.square().sum(-1) + 2 * math.log(2 * math.pi))
        log_q = log_q - self.q_tril.diagonal().log().sum()
        log_prior = -0.5 * (z.square().sum(-1) + 2 * math.log(2 * math.pi))
        residual = (x - z @ self.W.T - self.b) / self.s  # [K, B, D]
        log_lik = -0.5 * (residual.square().sum(-1) + 3 * math.log(2 * math.pi * self.s**2))
        return log_prior + log_lik - log_q  # [K, B]

    def posterior_means(self, x: Tensor, k: int = 100, generator=None) -> list[Tensor]:
        """What `active_units` reads: E_q[z|x] for the one stochastic layer."""
        return [self.posterior_mean(x) + self.shift]


class BernoulliLatent1D:
    """z ~ N(0, 1), x_j | z ~ Bernoulli(sigmoid(a_j z + c_j)) for D=3; q(z|x) = N(0.3, 1.3^2).

    q is wider than the prior, and the likelihood is at most 1, so the weights are bounded.
    """

    a = torch.tensor([2.0, -1.5, 3.0], dtype=F64)
    c = torch.tensor([0.5, 0.0, -1.0], dtype=F64)
    q_mean, q_std = 0.3, 1.3

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z): x [B, D], z [..., B] -> [..., B]."""
        logits = z[..., None] * self.a + self.c  # [..., B, D]
        return Normal(0.0, 1.0).log_prob(z) + Bernoulli(logits=logits).log_prob(
            x.expand_as(logits)
        ).sum(-1)

    def log_px(self, x: Tensor) -> Tensor:
        """Trapezoidal quadrature over z in [-12, 12] with 120,001 nodes: [B, D] -> [B]."""
        z = torch.linspace(-12.0, 12.0, 120_001, dtype=F64)
        log_f = self.log_joint(x, z[:, None].expand(-1, len(x)))  # [Z, B]
        trapezoid = torch.full_like(z, z[1] - z[0])
        trapezoid[[0, -1]] /= 2
        return torch.logsumexp(log_f + trapezoid.log()[:, None], 0)

    def log_weights(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        z = self.q_mean + self.q_std * torch.randn(k, len(x), generator=generator, dtype=F64)
        log_q = Normal(self.q_mean, self.q_std).log_prob(z)
        return self.log_joint(x, z) - log_q  # [K, B]


class Replay:
    """Hands out the rows of a fixed log_w [K, B] in order, recording each request's k."""

    def __init__(self, log_w: Tensor) -> None:
        self.log_w, self.used, self.requests = log_w, 0, []

    def log_weights(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        self.requests.append(k)
        self.used += k
        return self.log_w[self.used - k : self.used]


X3 = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0], [-2.0, 1.0, 1.0]], dtype=F64)
ALL_BINARY_3 = torch.tensor(
    [[(i >> j) & 1 for j in range(3)] for i in range(8)], dtype=F64
)  # every x in {0, 1}^3: [8, 3]


# --- the linear-Gaussian oracle -------------------------------------------------------------


def test_with_the_exact_posterior_every_log_weight_is_log_px() -> None:
    model = LinearGaussian()
    truth = model.log_px(X3)

    log_w = model.log_weights(X3, 500, generator(0))
    result = log_likelihood(model, X3, 5000, generator=generator(1))

    assert log_w.shape == (500, 3)
    torch.testing.assert_close(log_w, truth.expand(500, 3), rtol=0, atol=1e-9)
    torch.testing.assert_close(result.log_px, truth, rtol=0, atol=1e-9)
    torch.testing.assert_close(result.elbo, truth, rtol=0, atol=1e-9)
    assert (result.std_error < 1e-6).all()


def test_estimate_converges_to_the_closed_form_with_a_mismatched_q() -> None:
    model = LinearGaussian(shift=0.5, scale=1.5)
    truth = model.log_px(X3)

    result = log_likelihood(model, X3, 100_000, generator=generator(1))

    assert (result.std_error > 0).all()
    assert (result.std_error < 0.05).all()
    error = (result.log_px - truth).abs()
    assert (error < 4 * result.std_error + 1e-3).all(), (error, result.std_error)
    # The ELBO of a mismatched q sits well below log p(x).
    assert (result.elbo < truth - 0.5).all()


def mean_bound_by_k(
    model: LinearGaussian | BernoulliLatent1D, x: Tensor, ks: tuple[int, ...], repeats: int
) -> tuple[list[float], list[float]]:
    """Mean of the K-sample bound over `repeats` independent runs and all rows of x, per K,
    and its standard error."""
    x_rep = x.repeat(repeats, 1)  # each row gets its own samples
    means, errors = [], []
    for i, k in enumerate(ks):
        estimates = log_likelihood(model, x_rep, k, generator=generator(100 + i)).log_px
        gap = estimates - model.log_px(x).repeat(repeats)  # [R*B]
        means.append(gap.mean().item())
        errors.append(gap.std().item() / math.sqrt(len(gap)))
    return means, errors


@pytest.mark.parametrize(
    ("model", "repeats"),
    [(LinearGaussian(shift=0.5, scale=1.5), 2000), (BernoulliLatent1D(), 1000)],
    ids=["linear-gaussian", "bernoulli-1d"],
)
def test_the_bound_rises_with_k_toward_log_px(
    model: LinearGaussian | BernoulliLatent1D, repeats: int
) -> None:
    x = X3 if isinstance(model, LinearGaussian) else ALL_BINARY_3
    gaps, errors = mean_bound_by_k(model, x, (1, 10, 100, 1000), repeats)

    # E[bound_K] - log p(x) rises with K, to within noise of 0 from below.
    for k_index in range(3):
        rise = gaps[k_index + 1] - gaps[k_index]
        noise = math.hypot(errors[k_index + 1], errors[k_index])
        assert rise > 2 * noise, (gaps, errors)
    assert gaps[0] < -1.0
    assert gaps[-1] < 3 * errors[-1]


def test_reported_std_error_matches_the_spread_of_estimates() -> None:
    model = LinearGaussian(shift=0.5, scale=1.5)
    x_rep = X3.repeat(2000, 1)

    result = log_likelihood(model, x_rep, 1000, generator=generator(3))

    spread = result.log_px.view(2000, 3).std(0)  # [B]
    reported = result.std_error.view(2000, 3).mean(0)
    assert ((spread / reported - 1).abs() < 0.1).all(), (spread, reported)


def test_chunked_and_unchunked_estimates_agree() -> None:
    model = LinearGaussian(shift=0.5, scale=1.5)

    default = log_likelihood(model, X3, 10_000, generator=generator(4))
    chunked = log_likelihood(model, X3, 10_000, generator=generator(5), chunk_size=7)
    single = log_likelihood(model, X3, 2_000, generator=generator(6), chunk_size=1)

    for a, b in ((default, chunked), (default, single)):
        diff = (a.log_px - b.log_px).abs()
        assert (diff < 4 * torch.hypot(a.std_error, b.std_error)).all()
    assert torch.isfinite(single.log_px).all()


# --- the quadrature oracle ------------------------------------------------------------------


def test_quadrature_oracle_is_a_distribution() -> None:
    log_px = BernoulliLatent1D().log_px(ALL_BINARY_3)

    assert torch.logsumexp(log_px, 0).item() == pytest.approx(0.0, abs=1e-10)


def test_estimate_converges_to_the_quadrature() -> None:
    model = BernoulliLatent1D()
    truth = model.log_px(ALL_BINARY_3)

    result = log_likelihood(model, ALL_BINARY_3, 100_000, generator=generator(0))

    error = (result.log_px - truth).abs()
    assert (error < 4 * result.std_error + 1e-3).all(), (error, result.std_error)
    assert (result.std_error < 0.01).all()


# --- streaming arithmetic -------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 30, 1000])
def test_streaming_sums_equal_the_direct_formulas(chunk_size: int | None) -> None:
    log_w = torch.randn(30, 2, generator=generator(8), dtype=F64) * 2 - 3  # [K, B]
    w = log_w.exp()
    replay = Replay(log_w)

    result = log_likelihood(replay, torch.zeros(2, 4, dtype=F64), 30, chunk_size=chunk_size)

    torch.testing.assert_close(result.log_px, w.mean(0).log(), rtol=0, atol=1e-12)
    torch.testing.assert_close(result.elbo, log_w.mean(0), rtol=0, atol=1e-12)
    # Delta method: sd(w) / (sqrt(K) mean(w)), with the population variance.
    expected_se = w.std(0, correction=0) / (math.sqrt(30) * w.mean(0))
    torch.testing.assert_close(result.std_error, expected_se, rtol=1e-9, atol=0)
    torch.testing.assert_close(result.ess, w.sum(0) ** 2 / w.square().sum(0), rtol=1e-9, atol=0)
    # The running top-M across chunks is the top M+1 of all K: M = ceil(min(6, 16.4)) = 6.
    torch.testing.assert_close(result.top_log_w, log_w.topk(7, 0).values, rtol=0, atol=0)
    assert sum(replay.requests) == 30
    if chunk_size == 7:
        assert replay.requests == [7, 7, 7, 7, 2]


def test_callbacks_run_between_chunks_with_the_samples_drawn() -> None:
    replay = Replay(torch.zeros(30, 2, dtype=F64))
    seen: list[int] = []
    log_likelihood(
        replay,
        torch.zeros(2, 4, dtype=F64),
        30,
        chunk_size=7,
        callbacks=[lambda p: seen.append(p.done)],
    )
    assert seen == [7, 14, 21, 28]  # not after the last chunk: the work is done


def test_an_exception_from_a_callback_stops_the_estimate_there() -> None:
    class Stop(Exception):
        pass

    def stop_after_two(progress: Progress) -> None:
        if progress.done >= 14:
            raise Stop

    replay = Replay(torch.zeros(30, 2, dtype=F64))
    with pytest.raises(Stop):
        log_likelihood(
            replay, torch.zeros(2, 4, dtype=F64), 30, chunk_size=7, callbacks=[stop_after_two]
        )
    assert replay.requests == [7, 7]


def test_log_likelihood_is_finite_and_exact_for_extreme_log_weights() -> None:
    k = 100_000
    log_w = torch.full((k, 3), -1e4, dtype=torch.float32)
    log_w[:, 1] = -1e4 + torch.arange(k) % 2 * 1e4  # half the weights are 1, half e^-1e4
    log_w[5, 2] = 0.0  # one weight of 1 among K tiny ones

    result = log_likelihood(Replay(log_w), torch.zeros(3, 784), k, chunk_size=999)

    assert torch.isfinite(result.log_px).all() and torch.isfinite(result.std_error).all()
    expected = torch.tensor([-1e4, math.log(0.5), -math.log(k)])
    torch.testing.assert_close(result.log_px, expected, rtol=1e-6, atol=1e-4)
    # Equal weights: no spread. Half ones: sd/mean = 1. One survivor: sd/mean = sqrt(K - 1).
    expected_se = torch.tensor([0.0, 1 / math.sqrt(k), math.sqrt((k - 1) / k)])
    torch.testing.assert_close(result.std_error, expected_se, rtol=1e-3, atol=1e-6)


# --- PSIS k-hat and effective sample size ---------------------------------------------------


@pytest.mark.parametrize("shape", [0.2, 0.5, 0.9, 1.3])
def test_pareto_k_hat_recovers_the_tail_shape_of_pareto_weights(shape: float) -> None:
    """log w = -shape * log U makes w Pareto with tail index 1/shape: k-hat = shape
    (Zhang & Stephens' estimator is consistent; the tail of M = 213 of K = 5000 weights
    gives each image an sd of about 0.1, the mean of 40 images about 0.02)."""
    u = torch.rand(5000, 40, generator=generator(30), dtype=F64)
    log_w = -shape * u.log()  # [K, B]

    result = log_likelihood(Replay(log_w), torch.zeros(40, 2, dtype=F64), 5000)

    assert result.pareto_k.mean().item() == pytest.approx(shape, abs=0.06)
    assert result.pareto_k.std().item() < 0.2


def test_pareto_k_is_nan_up_to_20_samples_and_for_equal_weights() -> None:
    few = log_likelihood(Replay(torch.randn(20, 3, dtype=F64)), torch.zeros(3, 2), 20)
    enough = log_likelihood(Replay(torch.randn(21, 3, dtype=F64)), torch.zeros(3, 2), 21)
    equal = log_likelihood(Replay(torch.zeros(100, 3, dtype=F64)), torch.zeros(3, 2), 100)

    assert few.pareto_k.isnan().all()
    assert not enough.pareto_k.isnan().any()  # a tail of ceil(21 / 5) = 5 weights
    assert equal.pareto_k.isnan().all()
    torch.testing.assert_close(equal.ess, torch.full((3,), 100.0, dtype=F64))


@pytest.mark.parametrize(("scale", "heavy"), [(0.4, True), (1.5, False)])
def test_pareto_k_flags_a_proposal_narrower_than_the_posterior(scale: float, heavy: bool) -> None:
    """q = N(posterior mean, (scale * posterior sd)^2): with scale < 1/sqrt(2) the weights
    have infinite variance (k-hat above 0.5; 1 - scale^2 = 0.84 in the limit), and the
    delta-method error understates the spread of repeated estimates; with scale > 1 the
    weights are bounded and k-hat is low."""
    model = LinearGaussian(scale=scale)
    x = X3[:1].repeat(40, 1)  # 40 independent estimates of one image

    metrics = evaluate(model, x, 2000, generator=generator(31))  # type: ignore[arg-type]
    estimate = log_likelihood(model, x, 2000, generator=generator(31))

    assert metrics is not None
    assert metrics.pareto_k_above_0_7 > 0.5 if heavy else metrics.pareto_k_above_0_7 == 0.0
    assert metrics.pareto_k_mean > 0.7 if heavy else metrics.pareto_k_mean < 0.3
    assert 1 <= metrics.ess_mean <= 2000
    spread, reported = estimate.log_px.std().item(), estimate.std_error.mean().item()
    assert spread > 1.5 * reported if heavy else spread == pytest.approx(reported, rel=0.35)
