"""Tests for models.distributions against torch.distributions, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal

from models.distributions import (
    bernoulli_log_prob,
    gaussian_log_prob,
    gaussian_log_prob_at_noise,
    gaussian_log_prob_of_noise,
    standard_normal_log_prob,
)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_gaussian_log_prob_matches_torch_normal() -> None:
    z = randn(5, 3, 4, seed=0)  # [K, B, d]
    mu = randn(3, 4, seed=1)  # [B, d], broadcast over K
    logvar = randn(3, 4, seed=2)

    expected = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)  # [K, B]

    actual = gaussian_log_prob(z, mu, logvar)
    assert actual.shape == (5, 3)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


def test_gaussian_log_prob_of_one_point_by_hand() -> None:
    # d=1: log N(2; 1, e^2) = -0.5 * (log 2 pi + 2 + 1 / e^2).
    actual = gaussian_log_prob(
        torch.tensor([2.0], dtype=torch.float64),
        torch.tensor([1.0], dtype=torch.float64),
        torch.tensor([2.0], dtype=torch.float64),
    )
    assert actual.item() == pytest.approx(-0.5 * (math.log(2 * math.pi) + 2.0 + math.exp(-2.0)))


def test_standard_normal_log_prob_matches_torch_normal() -> None:
    z = randn(7, 2, 5, seed=3)

    expected = Normal(0.0, 1.0).log_prob(z).sum(-1)

    torch.testing.assert_close(standard_normal_log_prob(z), expected, rtol=0, atol=1e-12)
    # At the origin in d dimensions: -d/2 log 2 pi.
    assert standard_normal_log_prob(torch.zeros(5, dtype=torch.float64)).item() == pytest.approx(
        -2.5 * math.log(2 * math.pi)
    )


def test_bernoulli_log_prob_broadcasts_x_against_k_logits() -> None:
    generator = torch.Generator().manual_seed(4)
    x = torch.bernoulli(torch.full((3, 6), 0.5, dtype=torch.float64), generator=generator)
    logits = 3.0 * randn(5, 3, 6, seed=5)  # [K, B, D]

    expected = Bernoulli(logits=logits).log_prob(x.expand(5, 3, 6)).sum(-1)  # [K, B]

    actual = bernoulli_log_prob(x, logits)
    assert actual.shape == (5, 3)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


def test_bernoulli_log_prob_by_hand() -> None:
    # x = (1, 0), p = (sigmoid(0), sigmoid(log 3)) = (1/2, 3/4): log(1/2) + log(1/4).
    x = torch.tensor([1.0, 0.0], dtype=torch.float64)
    logits = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64)

    assert bernoulli_log_prob(x, logits).item() == pytest.approx(math.log(0.5 * 0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_log_prob_is_finite_and_exact_for_huge_logits(dtype: torch.dtype) -> None:
    x = torch.tensor([[1.0], [0.0], [1.0], [0.0]], dtype=dtype)  # four 1-pixel images
    logits = torch.tensor([[1e4], [1e4], [-1e4], [-1e4]], dtype=dtype)

    actual = bernoulli_log_prob(x, logits)

    assert torch.isfinite(actual).all()
    # A confident right answer costs nothing; a confident wrong one costs |logit| nats.
    torch.testing.assert_close(
        actual, torch.tensor([0.0, -1e4, -1e4, 0.0], dtype=dtype), rtol=0, atol=1e-6
    )
    expected = Bernoulli(logits=logits.double()).log_prob(x.double()).sum(-1)
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=1e-6)


def test_bernoulli_log_prob_gradient_is_finite_for_huge_logits() -> None:
    logits = torch.tensor([1e4, -1e4, 1e4, -1e4], dtype=torch.float32, requires_grad=True)
    x = torch.tensor([1.0, 1.0, 0.0, 0.0])

    bernoulli_log_prob(x, logits).backward()

    # d/dl [x l - softplus(l)] = x - sigmoid(l).
    torch.testing.assert_close(logits.grad, torch.tensor([0.0, 1.0, -1.0, 0.0]))


def test_bernoulli_gradients_match_autograd_of_the_formula():
    """The hand-written backward against autograd through x * l - softplus(l), x broadcast."""
    generator = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(4, 3, 7, generator=generator, dtype=torch.float64)).requires_grad_()
    x = torch.rand(3, 7, generator=generator, dtype=torch.float64).requires_grad_()
    weights = torch.randn(4, 3, generator=generator, dtype=torch.float64)

    (bernoulli_log_prob(x, logits) * weights).sum().backward()
    ours = (x.grad.clone(), logits.grad.clone())
    x.grad = logits.grad = None
    ((x * logits - torch.nn.functional.softplus(logits)).sum(-1) * weights).sum().backward()

    torch.testing.assert_close(ours[0], x.grad)
    torch.testing.assert_close(ours[1], logits.grad)
    assert torch.autograd.gradcheck(bernoulli_log_prob, (x.detach().requires_grad_(), logits))


# --- numerics at extreme scales -----------------------------------------------------------


def test_log_prob_of_noise_is_the_density_at_the_reparameterised_point() -> None:
    mu, logvar, eps = randn(3, 4, seed=6), randn(3, 4, seed=7), randn(5, 3, 4, seed=8)
    z = mu + torch.exp(0.5 * logvar) * eps  # [K, B, d]

    expected = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)

    torch.testing.assert_close(
        gaussian_log_prob_of_noise(eps, logvar), expected, rtol=0, atol=1e-12
    )


def test_log_prob_of_noise_keeps_its_precision_when_sigma_is_tiny_against_mu() -> None:
    """sigma = 3e-7 around mu = 1e4: in fp32, z - mu keeps no digit of sigma * eps."""
    mu = torch.full((1, 4), 1e4)
    logvar = torch.full((1, 4), -30.0)
    eps = randn(1, 4, seed=9).float()
    z = mu + torch.exp(0.5 * logvar) * eps  # fp32: z == mu

    exact = gaussian_log_prob_of_noise(eps.double(), logvar.double())

    torch.testing.assert_close(
        gaussian_log_prob_of_noise(eps, logvar).double(), exact, rtol=1e-6, atol=0
    )
    # The formula in z is off by sum(eps^2) / 2 nats here, as z - mu rounded to 0.
    assert (gaussian_log_prob(z, mu, logvar).double() - exact).abs().item() > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("logvar_value", [-100.0, -200.0, -1000.0, 300.0])
def test_gaussian_log_prob_is_finite_at_extreme_log_variances(
    dtype: torch.dtype, logvar_value: float
) -> None:
    """Written as (z - mu)^2 * exp(-logvar), z == mu gave 0 * inf = NaN below logvar = -88
    (fp32); the standardised residual is capped instead."""
    mu = torch.zeros(2, 3, dtype=dtype)
    logvar = torch.full((2, 3), logvar_value, dtype=dtype)

    at_mean = gaussian_log_prob(mu, mu, logvar)  # [2]

    expected = -1.5 * (math.log(2 * math.pi) + logvar_value)
    torch.testing.assert_close(at_mean, torch.full((2,), expected, dtype=dtype))
    assert torch.isfinite(gaussian_log_prob_of_noise(torch.ones(2, 3, dtype=dtype), logvar)).all()
    if logvar_value < 0:  # a near point mass at mu: points away from mu have density ~0
        assert (gaussian_log_prob(mu + 1.0, mu, logvar) < -1e30).all()


def test_log_prob_at_noise_has_the_noise_value_and_the_formula_gradient() -> None:
    mu, logvar, eps = randn(3, 4, seed=10), randn(3, 4, seed=11), randn(5, 3, 4, seed=12)
    z = (mu + torch.exp(0.5 * logvar) * eps).requires_grad_()
    mu, logvar = mu.requires_grad_(), logvar.requires_grad_()

    value = gaussian_log_prob_at_noise(z, mu, logvar, eps)
    formula = gaussian_log_prob(z, mu, logvar)

    assert torch.equal(value, gaussian_log_prob_of_noise(eps, logvar))
    torch.testing.assert_close(value, formula, rtol=0, atol=1e-12)
    ours = torch.autograd.grad(value.sum(), (z, mu, logvar))
    expected = torch.autograd.grad(formula.sum(), (z, mu, logvar))
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
