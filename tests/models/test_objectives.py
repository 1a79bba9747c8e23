"""Tests for models.objectives: the bounds' exact identities, stability, and the gradients.

The bounds are checked against identities that hold for any log-weights (K=1 IWAE is the
ELBO, a shift of log w shifts every bound, Jensen) and against values worked out by hand for
extreme weights. The gradient tests compare estimators in expectation over thousands of draws
on a tiny float64 model, with a tolerance of 5 standard errors of the mean difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.distributions import Bernoulli, Normal
from torch.func import functional_call

from models.config import TrainConfig
from models.networks import IWAEModel
from models.objectives import (
    backward,
    ciwae_bound,
    dreg_encoder_surrogate,
    elbo,
    iwae_bound,
    miwae_bound,
    surrogates,
    vr_iwae_bound,
)
from tests.models.linear_gaussian import LinearGaussianModel
from tests.models.test_estimators import LinearGaussian

pytestmark = pytest.mark.usefixtures("one_thread")


def log_weights(k: int, b: int = 3, seed: int = 0, scale: float = 2.0) -> Tensor:
    """Random log-weights [K, B] in float64."""
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(k, b, generator=generator, dtype=torch.float64) - 5.0


def naive_iwae(log_w: Tensor) -> Tensor:
    """log mean_k exp(log w_k) the obvious way; fine for moderate float64 values."""
    return torch.log(torch.exp(log_w).mean(0))


# --- bounds -------------------------------------------------------------------------------


def test_elbo_and_iwae_match_their_definitions() -> None:
    log_w = log_weights(6)

    torch.testing.assert_close(elbo(log_w), log_w.sum(0) / 6, rtol=0, atol=1e-12)
    torch.testing.assert_close(iwae_bound(log_w), naive_iwae(log_w), rtol=0, atol=1e-12)


def test_iwae_with_one_sample_is_the_elbo() -> None:
    log_w = log_weights(1, b=5)

    torch.testing.assert_close(iwae_bound(log_w), elbo(log_w), rtol=0, atol=1e-12)
    torch.testing.assert_close(iwae_bound(log_w), log_w[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("c", [-1e4, -3.5, 0.0, 7.25, 1e3])
def test_shifting_log_weights_by_c_shifts_every_bound_by_c(c: float) -> None:
    log_w = log_weights(12)
    bounds: dict[str, Callable[[Tensor], Tensor]] = {
        "elbo": elbo,
        "iwae": iwae_bound,
        "miwae(m=3)": lambda w: miwae_bound(w, 3),
        "ciwae(beta=0.3)": lambda w: ciwae_bound(w, 0.3),
        "vr-iwae(alpha=0.4)": lambda w: vr_iwae_bound(w, 0.4),
    }
    for name, bound in bounds.items():
        torch.testing.assert_close(bound(log_w + c), bound(log_w) + c, rtol=0, atol=1e-9, msg=name)


def test_iwae_is_at_least_the_elbo_and_tightens_with_k() -> None:
    log_w = log_weights(64, b=50, scale=3.0)

    assert (iwae_bound(log_w) > elbo(log_w)).all()  # strict: the weights are not all equal
    # Averaged over disjoint groups, the bound with more samples per group is higher
    # (Burda et al., theorem 1): MIWAE with fewer, larger groups is closer to IWAE.
    by_group_size = [miwae_bound(log_w, m).mean().item() for m in (64, 16, 4, 1)]  # K/M: 1..64
    assert by_group_size == sorted(by_group_size)
    assert len(set(by_group_size)) == 4
    assert by_group_size[0] == pytest.approx(elbo(log_w).mean().item(), abs=1e-12)
    assert by_group_size[-1] == pytest.approx(iwae_bound(log_w).mean().item(), abs=1e-12)


def test_miwae_limits_and_groups() -> None:
    log_w = log_weights(12)

    torch.testing.assert_close(miwae_bound(log_w, 1), iwae_bound(log_w), rtol=0, atol=1e-12)
    torch.testing.assert_close(miwae_bound(log_w, 12), elbo(log_w), rtol=0, atol=1e-12)
    # M=3 groups of 4 consecutive samples along the K axis.
    groups = [naive_iwae(log_w[4 * i : 4 * i + 4]) for i in range(3)]
    torch.testing.assert_close(miwae_bound(log_w, 3), sum(groups) / 3, rtol=0, atol=1e-12)


def test_ciwae_limits_and_mixture() -> None:
    log_w = log_weights(8)

    torch.testing.assert_close(ciwae_bound(log_w, 1.0), elbo(log_w), rtol=0, atol=1e-12)
    torch.testing.assert_close(ciwae_bound(log_w, 0.0), iwae_bound(log_w), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        ciwae_bound(log_w, 0.25),
        0.25 * elbo(log_w) + 0.75 * iwae_bound(log_w),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 7, 100_000])
def test_equal_log_weights_give_exactly_that_value(k: int, dtype: torch.dtype) -> None:
    for c in (-1e4, 0.0, 30.0):
        log_w = torch.full((k, 2), c, dtype=dtype)
        expected = torch.full((2,), c, dtype=dtype)
        for value in (elbo(log_w), iwae_bound(log_w), ciwae_bound(log_w, 0.5)):
            assert torch.isfinite(value).all()
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
        if k % 4 == 0:
            torch.testing.assert_close(miwae_bound(log_w, 4), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixed_extreme_log_weights_are_finite_and_exact(dtype: torch.dtype) -> None:
    k = 100_000
    half = torch.cat([torch.zeros(k // 2, 1), torch.full((k // 2, 1), -1e4)]).to(dtype)
    one_alive = torch.full((k, 1), -1e4, dtype=dtype)
    one_alive[17] = 0.0

    # mean of (1, ..., 1, e^-1e4, ...) = 1/2, and mean of one 1 among K zeros = 1/K.
    assert iwae_bound(half).item() == pytest.approx(math.log(0.5), abs=1e-5)
    assert elbo(half).item() == pytest.approx(-5e3, rel=1e-6)
    assert iwae_bound(one_alive).item() == pytest.approx(-math.log(k), abs=1e-5)
    assert elbo(one_alive).item() == pytest.approx(-1e4 * (k - 1) / k, rel=1e-6)
    # MIWAE with 2 groups of K/2: the first holds the surviving weight, the second has none.
    two_groups = 0.5 * (-math.log(k / 2)) + 0.5 * (-1e4)
    assert miwae_bound(one_alive, 2).item() == pytest.approx(two_groups, rel=1e-6)
    for value in (iwae_bound(half), ciwae_bound(one_alive, 0.5), miwae_bound(half, 2)):
        assert torch.isfinite(value).all()


def test_iwae_gradient_is_finite_for_extreme_log_weights() -> None:
    log_w = torch.full((1000, 2), -1e4, dtype=torch.float32)
    log_w[3, 0] = 0.0
    log_w.requires_grad_(True)

    iwae_bound(log_w).sum().backward()

    # d/d log w_k of logsumexp is the normalized weight: all of it on the survivor in column 0,
    # spread evenly in column 1.
    assert torch.isfinite(log_w.grad).all()
    assert log_w.grad[3, 0].item() == pytest.approx(1.0)
    assert log_w.grad[:, 0].sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(log_w.grad[:, 1], torch.full((1000,), 1e-3))


def test_dreg_encoder_surrogate_value_and_gradient() -> None:
    # w = (1, 3): normalized weights (1/4, 3/4).
    log_w = torch.tensor([[0.0], [math.log(3.0)]], dtype=torch.float64, requires_grad=True)

    value = dreg_encoder_surrogate(log_w)
    value.sum().backward()

    assert value.item() == pytest.approx((3 / 4) ** 2 * math.log(3.0))
    # The normalized weights are held constant: the gradient is their square.
    torch.testing.assert_close(log_w.grad, torch.tensor([[1 / 16], [9 / 16]], dtype=torch.float64))


def test_dreg_encoder_surrogate_is_stable_for_extreme_log_weights() -> None:
    log_w = torch.full((100_000, 1), -1e4, dtype=torch.float32)
    log_w[0] = 0.0

    # All the normalized weight sits on w_0 = 1 (log w_0 = 0); the rest contribute e^-1e4 * ...
    assert dreg_encoder_surrogate(log_w).item() == pytest.approx(0.0, abs=1e-3)
    assert torch.isfinite(dreg_encoder_surrogate(torch.full((100_000, 2), -1e4))).all()


# --- surrogates by objective name ---------------------------------------------------------


def config(objective: str, **options: object) -> TrainConfig:
    return TrainConfig(objective=objective, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("objective", "samples", "bound"),
    [
        ("vae", 4, elbo),
        ("iwae", 4, iwae_bound),
        ("iwae-stl", 4, iwae_bound),
        ("iwae-dreg", 4, iwae_bound),
        ("miwae", 8, lambda w: miwae_bound(w, 2)),
        ("ciwae", 4, lambda w: ciwae_bound(w, 0.3)),
        ("piwae", 8, iwae_bound),
        ("vr-iwae", 4, lambda w: vr_iwae_bound(w, 0.5)),  # alpha: its default
        ("vr-iwae-dreg", 4, lambda w: vr_iwae_bound(w, 0.5)),
    ],
)
def test_surrogates_report_the_bound_of_their_objective(
    model64: IWAEModel,
    x_binary: Tensor,
    objective: str,
    samples: int,
    bound: Callable[[Tensor], Tensor],
) -> None:
    """The reported bound is the named bound of K (M*K for miwae/piwae) fresh log-weights."""
    cfg = config(objective, k=4, m=2, beta=0.3)

    s = surrogates(model64, x_binary, cfg, torch.Generator().manual_seed(5))
    log_w = model64.log_weights(x_binary, samples, torch.Generator().manual_seed(5))

    assert s.bound.shape == (4,)
    assert not s.bound.requires_grad
    torch.testing.assert_close(s.bound, bound(log_w), rtol=0, atol=1e-12)


# --- gradients in expectation -------------------------------------------------------------

GROUPS = 100  # gradient estimates compared
REPLICAS = 50  # independent draws averaged into each estimate: 5000 draws in all


def flat_grads(params: list[torch.nn.Parameter]) -> Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else p.new_zeros(p.numel())
                      for p in params])  # fmt: skip


def gradient_draws(
    model: IWAEModel, x: Tensor, cfg: TrainConfig, seed: int = 11
) -> tuple[Tensor, Tensor]:
    """GROUPS estimates of `cfg.objective`'s gradient at x [B, D]: ([G, P_enc], [G, P_dec]).

    Each estimate averages REPLICAS independent draws: x is repeated along the batch axis,
    and every row gets its own importance samples. The same seed gives the same samples to
    objectives that draw the same number of them, so comparisons are paired.
    """
    x_rep = x.repeat(REPLICAS, 1)  # [R*B, D]
    generator = torch.Generator().manual_seed(seed)
    encoder, decoder = [], []
    for _ in range(GROUPS):
        model.zero_grad(set_to_none=True)
        backward(model, surrogates(model, x_rep, cfg, generator))
        encoder.append(flat_grads(list(model.encoder_parameters())))
        decoder.append(flat_grads(list(model.decoder_parameters())))
    model.zero_grad(set_to_none=True)
    return torch.stack(encoder), torch.stack(decoder)


def z_scores(a: Tensor, b: Tensor) -> Tensor:
    """|mean difference| / (its standard error + 1e-8/5), per parameter: [G, P] x2 -> [P]."""
    diff = a - b  # [G, P]
    se = diff.std(0) / math.sqrt(len(diff))
    return diff.mean(0).abs() / (se + 2e-9)


def assert_same_expectation(a: Tensor, b: Tensor, what: str) -> None:
    """|mean(a) - mean(b)| < 5 SE + 1e-8 for every parameter."""
    z = z_scores(a, b)
    assert (z < 5).all(), f"{what}: max |diff| / SE = {z.max():.2f}"


@pytest.mark.parametrize("objective", ["iwae-dreg", "iwae-stl"])
def test_dreg_and_stl_decoder_gradients_equal_iwae_in_expectation(
    model64: IWAEModel, x_binary: Tensor, objective: str
) -> None:
    # With paired samples the decoder gradients even agree draw by draw: stopping q's
    # parameters changes nothing that depends on the decoder.
    _, decoder_iwae = gradient_draws(model64, x_binary, config("iwae", k=5))
    _, decoder = gradient_draws(model64, x_binary, config(objective, k=5))

    assert_same_expectation(decoder, decoder_iwae, f"{objective} decoder")


def test_dreg_encoder_gradient_equals_iwae_in_expectation(
    model64: IWAEModel, x_binary: Tensor
) -> None:
    encoder_iwae, _ = gradient_draws(model64, x_binary, config("iwae", k=5))
    encoder_dreg, _ = gradient_draws(model64, x_binary, config("iwae-dreg", k=5))
    encoder_vae, _ = gradient_draws(model64, x_binary, config("vae", k=5))

    assert_same_expectation(encoder_dreg, encoder_iwae, "iwae-dreg encoder")
    # The test can tell different expectations apart: the ELBO's encoder gradient is not
    # the IWAE bound's.
    assert z_scores(encoder_vae, encoder_iwae).max() > 10
    # DReG is the low-variance estimator of the two.
    assert encoder_dreg.var(0).sum() < encoder_iwae.var(0).sum()


def test_piwae_gradients_are_iwae_for_the_decoder_and_miwae_for_the_encoder(
    model64: IWAEModel, x_binary: Tensor
) -> None:
    # Paired samples again: PIWAE's M*K log-weights are the ones IWAE(M*K) and MIWAE(M, K) see.
    encoder_piwae, decoder_piwae = gradient_draws(model64, x_binary, config("piwae", k=3, m=2))
    _, decoder_iwae = gradient_draws(model64, x_binary, config("iwae", k=6))
    encoder_miwae, _ = gradient_draws(model64, x_binary, config("miwae", k=3, m=2))

    assert_same_expectation(decoder_piwae, decoder_iwae, "piwae decoder vs iwae with M*K")
    assert_same_expectation(encoder_piwae, encoder_miwae, "piwae encoder vs miwae")


def test_backward_routes_each_surrogate_to_its_own_network(
    model64: IWAEModel, x_binary: Tensor
) -> None:
    """DReG: encoder gradients come from the DReG surrogate only, decoder ones from the bound."""
    s = surrogates(model64, x_binary, config("iwae-dreg", k=5), torch.Generator().manual_seed(2))
    encoder, decoder = list(model64.encoder_parameters()), list(model64.decoder_parameters())
    expected_encoder = torch.autograd.grad(-s.encoder.mean(), encoder, retain_graph=True)
    expected_decoder = torch.autograd.grad(-s.decoder.mean(), decoder, retain_graph=True)

    model64.zero_grad(set_to_none=True)
    backward(model64, s)

    for p, g in zip(encoder + decoder, expected_encoder + expected_decoder, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in expected_encoder)


# --- STL and DReG against closed forms and independent recomputations ---------------------

X_LG = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)  # one observation of the model


def encoder_grad(model: torch.nn.Module, x: Tensor, cfg: TrainConfig, seed: int) -> Tensor:
    """One draw of `cfg.objective`'s encoder gradient: [P_enc]."""
    model.zero_grad(set_to_none=True)
    backward(model, surrogates(model, x, cfg, torch.Generator().manual_seed(seed)))
    return flat_grads(list(model.encoder_parameters()))


@pytest.mark.parametrize("k", [1, 5])
def test_stl_encoder_gradient_is_exactly_zero_per_draw_at_the_exact_posterior(k: int) -> None:
    """With q = p(z|x), log p(x, z) - log q(z|x) = log p(x) for every z, so its path
    derivative, STL's encoder gradient, is zero draw by draw (Roeder et al., 2017); IWAE's
    keeps the score term, which is zero only in expectation."""
    model = LinearGaussianModel()
    for seed in range(3):
        stl = encoder_grad(model, X_LG, config("iwae-stl", k=k), seed)
        iwae = encoder_grad(model, X_LG, config("iwae", k=k), seed)

        assert stl.abs().max() < 1e-12
        assert iwae.abs().max() > 0.1


def test_stl_encoder_gradient_is_iwaes_at_k1_and_biased_beyond() -> None:
    """Tucker et al. (2019): STL is unbiased for the ELBO (K=1) but for K > 1 its
    encoder gradient does not have IWAE's expectation."""
    model = LinearGaussianModel(shift=0.5, log_scale=0.3)  # q is not the posterior

    def draws(objective: str, k: int) -> Tensor:
        x = X_LG.repeat(REPLICAS * 40, 1)  # each draw averages 2000 independent gradients
        return torch.stack([encoder_grad(model, x, config(objective, k=k), seed)
                            for seed in range(20)])  # fmt: skip

    assert_same_expectation(draws("iwae-stl", 1), draws("iwae", 1), "stl vs iwae at K=1")
    assert z_scores(draws("iwae-stl", 10), draws("iwae", 10)).max() > 50


def dreg_encoder_gradient_by_hand(
    model: IWAEModel, x: Tensor, k: int, seed: int, *, z1_path: bool = True
) -> Tensor:
    """DReG's encoder gradient for the two-layer model, written from Tucker et al. (2019),
    eq. 5, independently of `models.networks`: z is drawn with the encoder's parameters
    `sampling`, log q is scored with a detached copy, and the gradient of
    sum_k stopgrad(w~_k)^2 log w_k is taken with respect to `sampling`. z1 reaches log w
    through p(x|z1), p(z1|z2), q(z1|x) and, as the input of q(z2|z1), through log q(z2|z1):
    `z1_path=False` cuts that last path, the mistake this oracle must tell apart."""
    sampling = {n: p for n, p in model.encoders.named_parameters()}
    frozen = {n: p.detach() for n, p in sampling.items()}
    generator = torch.Generator().manual_seed(seed)

    def gaussian(params: dict[str, Tensor], i: int, h: Tensor) -> tuple[Tensor, Tensor]:
        prefix = f"{i}.net."
        own = {n.removeprefix(prefix): p for n, p in params.items() if n.startswith(prefix)}
        mu, logvar = functional_call(model.encoders[i].net, own, (h,)).chunk(2, -1)
        return mu, torch.exp(0.5 * logvar)

    mu1, sd1 = gaussian(sampling, 0, x)
    z1 = mu1 + sd1 * torch.randn((k, *mu1.shape), generator=generator, dtype=x.dtype)
    mu2, sd2 = gaussian(sampling, 1, z1)
    z2 = mu2 + sd2 * torch.randn(mu2.shape, generator=generator, dtype=x.dtype)
    q1_mu, q1_sd = gaussian(frozen, 0, x)
    q2_mu, q2_sd = gaussian(frozen, 1, z1 if z1_path else z1.detach())
    log_q = Normal(q1_mu, q1_sd).log_prob(z1).sum(-1) + Normal(q2_mu, q2_sd).log_prob(z2).sum(-1)
    p1_mu, p1_logvar = model.decoders[1](z2)
    log_p = (
        Normal(0.0, 1.0).log_prob(z2).sum(-1)
        + Normal(p1_mu, torch.exp(0.5 * p1_logvar)).log_prob(z1).sum(-1)
        + Bernoulli(logits=model.decoders[0](z1)).log_prob(x.expand(k, *x.shape)).sum(-1)
    )
    log_w = log_p - log_q  # [K, B]
    surrogate = (torch.softmax(log_w.detach(), 0).square() * log_w).sum(0).mean()
    grads = torch.autograd.grad(-surrogate, list(sampling.values()))
    return torch.cat([g.flatten() for g in grads])


def test_dreg_two_layer_encoder_gradient_follows_z1_through_log_q_z2(
    make_tiny_model: Callable[..., IWAEModel], x_binary: Tensor
) -> None:
    model = make_tiny_model(2)
    for seed in range(3):
        ours = encoder_grad(model, x_binary, config("iwae-dreg", k=4), seed)
        right = dreg_encoder_gradient_by_hand(model, x_binary, 4, seed)
        cut = dreg_encoder_gradient_by_hand(model, x_binary, 4, seed, z1_path=False)

        torch.testing.assert_close(ours, right, rtol=0, atol=1e-12)
        # The missing path moves the gradient by far more than the tolerance above.
        assert (cut - right).abs().max() > 1e-3


# --- VR-IWAE (Daudel, Benton, Shi & Doucet, 2023) -----------------------------------------


def test_vr_iwae_at_alpha_zero_is_the_iwae_bound_bit_for_bit() -> None:
    log_w = log_weights(9, b=4).requires_grad_(True)
    vr = vr_iwae_bound(log_w, 0.0)
    (vr_grad,) = torch.autograd.grad(vr.sum(), log_w)
    iwae = iwae_bound(log_w)
    (iwae_grad,) = torch.autograd.grad(iwae.sum(), log_w)

    assert torch.equal(vr, iwae)
    assert torch.equal(vr_grad, iwae_grad)


def test_vr_iwae_matches_a_value_worked_by_hand() -> None:
    # w = (1, 3), alpha = 1/2: 2 log((1 + sqrt 3) / 2).
    log_w = torch.tensor([[0.0], [math.log(3.0)]], dtype=torch.float64)

    assert vr_iwae_bound(log_w, 0.5).item() == pytest.approx(2 * math.log((1 + 3**0.5) / 2))


def test_vr_iwae_falls_from_iwae_to_the_elbo_as_alpha_grows() -> None:
    log_w = log_weights(32, b=20, scale=3.0)
    alphas = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99]

    values = torch.stack([vr_iwae_bound(log_w, a) for a in alphas])  # [A, B]

    # A power mean of the weights with exponent 1 - alpha: strictly decreasing in alpha.
    assert (values[1:] < values[:-1]).all()
    assert (values[-1] > elbo(log_w)).all()


def test_vr_iwae_tends_to_the_elbo_at_the_rate_of_half_the_log_weight_variance() -> None:
    """log mean exp(t log w) = t mean + t^2 var / 2 + O(t^3) with t = 1 - alpha, so
    (L_alpha - ELBO) / (1 - alpha) -> Var_k(log w) / 2 as alpha -> 1."""
    log_w = log_weights(16, b=5)
    half_variance = log_w.var(0, correction=0) / 2

    for t in (1e-2, 1e-3, 1e-4):
        slope = (vr_iwae_bound(log_w, 1.0 - t) - elbo(log_w)) / t
        torch.testing.assert_close(slope, half_variance, rtol=3 * t * 10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vr_iwae_is_finite_and_exact_for_extreme_log_weights(dtype: torch.dtype) -> None:
    k = 100_000
    one_alive = torch.full((k, 1), -1e4, dtype=dtype)
    one_alive[17] = 0.0
    equal = torch.full((k, 2), 30.0, dtype=dtype)

    # mean of w^(1/2) is 1/K: the bound is 2 log(1/K).
    assert vr_iwae_bound(one_alive, 0.5).item() == pytest.approx(-2 * math.log(k), abs=1e-3)
    torch.testing.assert_close(vr_iwae_bound(equal, 0.7), torch.full((2,), 30.0, dtype=dtype))


def test_linear_gaussian_oracle_for_vr_iwae() -> None:
    """With q the exact posterior every weight is p(x): L_alpha = log p(x) for any alpha.

    With q the posterior shifted by delta, log w = log p(x) - delta^T S^-1 u - m^2/2 with
    u ~ N(0, S) and m^2 = delta^T S^-1 delta: a Gaussian of variance m^2. Then
    1/(1-alpha) log E[w^(1-alpha)] = log p(x) - alpha m^2 / 2, the K -> infinity limit of
    the VR-IWAE bound (Li & Turner's VR bound), in closed form: the leading term
    -alpha B_d^2 / 2 of the gap in Daudel et al.'s (2023) Gaussian example.
    """
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]], dtype=torch.float64)
    exact = LinearGaussian()
    log_px = exact.log_px(x)
    for alpha in (0.0, 0.5, 0.9):
        log_w = exact.log_weights(x, 10, torch.Generator().manual_seed(0))
        torch.testing.assert_close(vr_iwae_bound(log_w, alpha), log_px, rtol=0, atol=1e-10)

    shift = 0.3
    shifted = LinearGaussian(shift=shift)
    delta = torch.full((2,), shift, dtype=torch.float64)
    m2 = delta @ torch.linalg.inv(shifted.posterior_cov) @ delta
    log_w = shifted.log_weights(x, 400_000, torch.Generator().manual_seed(1))  # [K, B]
    for alpha in (0.0, 0.5, 0.9):
        expected = log_px - alpha * m2 / 2
        torch.testing.assert_close(vr_iwae_bound(log_w, alpha), expected, rtol=0, atol=0.02)
    assert m2 / 2 > 0.3  # the shift is large enough for the alphas to be told apart


def test_vr_dreg_surrogate_value_and_gradient() -> None:
    # w = (1, 3), alpha = 1/2: v = (1, sqrt 3) / (1 + sqrt 3); weights alpha v + (1-alpha) v^2.
    log_w = torch.tensor([[0.0], [math.log(3.0)]], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([[1.0], [3**0.5]], dtype=torch.float64) / (1 + 3**0.5)
    weights = 0.5 * v + 0.5 * v.square()

    value = dreg_encoder_surrogate(log_w, 0.5)
    value.sum().backward()

    assert value.item() == pytest.approx(weights[1].item() * math.log(3.0))
    torch.testing.assert_close(log_w.grad, weights)


def test_vr_dreg_at_alpha_zero_is_iwae_dreg_bit_for_bit(
    model64: IWAEModel, x_binary: Tensor
) -> None:
    grads = []
    for cfg in (config("iwae-dreg", k=5), config("vr-iwae-dreg", k=5, alpha=0.0)):
        s = surrogates(model64, x_binary, cfg, torch.Generator().manual_seed(3))
        model64.zero_grad(set_to_none=True)
        backward(model64, s)
        grads.append((s, [p.grad.clone() for p in model64.parameters()]))
    (a, grads_a), (b, grads_b) = grads

    for name in ("encoder", "decoder", "bound"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert all(torch.equal(g, h) for g, h in zip(grads_a, grads_b, strict=True))


def test_vr_dreg_gradients_equal_vr_iwae_in_expectation_with_lower_encoder_variance(
    model64: IWAEModel, x_binary: Tensor
) -> None:
    encoder_vr, decoder_vr = gradient_draws(model64, x_binary, config("vr-iwae", k=5, alpha=0.5))
    encoder_dreg, decoder_dreg = gradient_draws(
        model64, x_binary, config("vr-iwae-dreg", k=5, alpha=0.5)
    )
    encoder_iwae, _ = gradient_draws(model64, x_binary, config("iwae", k=5))

    assert_same_expectation(encoder_dreg, encoder_vr, "vr-iwae-dreg encoder")
    assert_same_expectation(decoder_dreg, decoder_vr, "vr-iwae-dreg decoder")
    # The test can tell expectations apart: alpha = 1/2 is not the IWAE bound's gradient.
    assert z_scores(encoder_vr, encoder_iwae).max() > 10
    assert encoder_dreg.var(0).sum() < encoder_vr.var(0).sum()


def test_vr_dreg_surrogate_at_alpha_zero_is_tuckers_formula_bit_for_bit() -> None:
    log_w = log_weights(7, b=3).requires_grad_(True)
    tucker = (torch.softmax(log_w.detach(), 0).square() * log_w).sum(0)  # eq. 5

    assert torch.equal(dreg_encoder_surrogate(log_w, 0.0), tucker)
