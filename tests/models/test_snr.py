"""Tests for models.snr: the bias-corrected SNR on synthetic gradients of known SNR, and
Rainforth et al.'s slopes on the linear-Gaussian model."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import Tensor

from models.config import TrainConfig
from models.networks import IWAEModel
from models.snr import (
    GradientSNR,
    gradient_snr,
    loglog_slope,
    pool_sweeps,
    snr_slopes,
    snr_summary,
    snr_sweep,
)
from models.study.results import SNR_SUMMARY
from tests.models.linear_gaussian import LinearGaussianModel
from tests.models.test_estimators import F64, generator

pytestmark = pytest.mark.usefixtures("one_thread")


def plug_in_snr(grads: Tensor) -> float:
    """The estimator this module used to have: mean over parameters of |mean| / sd."""
    return float((grads.mean(0).abs() / grads.std(0)).mean())


@pytest.mark.parametrize("true_snr", [0.0, 0.1, 0.5, 2.0])
def test_snr_summary_recovers_a_known_snr_without_a_noise_floor(true_snr: float) -> None:
    """Synthetic gradients g = mu + sigma * N(0, 1) with mu = SNR * sigma for every one of
    P parameters, sigma spread over six orders of magnitude: every summary is scale-free."""
    draws, params = 400, 500
    g = generator(20)
    sigma = torch.exp(3.0 * torch.randn(params, generator=g, dtype=F64))  # [P]
    grads = true_snr * sigma + sigma * torch.randn(draws, params, generator=g, dtype=F64)

    summary = snr_summary(grads)

    assert summary.parameters == params
    # The per-parameter estimates have sd ~ 1/sqrt(M) = 0.05; the median of 500 much less.
    assert summary.median == pytest.approx(true_snr, abs=0.03 + 0.05 * true_snr)
    assert summary.rms == pytest.approx(true_snr, abs=0.02 + 0.05 * true_snr)
    if true_snr == 0.0:
        assert summary.median == 0.0 and summary.direction < 0.1
        # The plug-in estimate sits at its floor sqrt(2 / (pi M)) = 0.04 instead.
        assert plug_in_snr(grads) == pytest.approx(math.sqrt(2 / (math.pi * draws)), rel=0.1)


@pytest.mark.parametrize("true_snr", [0.0, 0.5, 2.0])
def test_snr_along_the_mean_direction_of_isotropic_gradients(true_snr: float) -> None:
    """With mu = SNR * sigma * 1 and noise sigma * I, u.g ~ N(SNR sigma sqrt(P), sigma^2):
    the whole vector's SNR along its mean is SNR * sqrt(P)."""
    draws, params = 400, 100
    g = generator(21)
    grads = 0.01 * (true_snr + torch.randn(draws, params, generator=g, dtype=F64))

    direction = snr_summary(grads).direction

    assert direction == pytest.approx(true_snr * math.sqrt(params), abs=0.15, rel=0.1)


def test_snr_needs_enough_draws_and_ignores_noiseless_parameters() -> None:
    with pytest.raises(ValueError, match="at least 8"):
        snr_summary(torch.zeros(7, 3, dtype=F64))
    grads = torch.randn(50, 4, generator=generator(22), dtype=F64)
    grads[:, 0] = 3.0  # a parameter whose gradient never varies: no noise, no SNR to estimate

    assert snr_summary(grads).parameters == 3


def test_gradient_snr_of_a_tiny_model_is_finite(model64: IWAEModel, x_binary: Tensor) -> None:
    for objective in ("iwae", "iwae-dreg", "vae"):
        snr = gradient_snr(
            model64, x_binary, TrainConfig(k=5, objective=objective), draws=30,
            generator=generator(13),
        )  # fmt: skip

        for summary in (snr.encoder, snr.decoder):
            values = (summary.median, summary.rms, summary.direction)
            assert all(math.isfinite(v) and v >= 0 for v in values)
            assert summary.rms > 0
    assert all(p.grad is None for p in model64.parameters())


def test_snr_slopes_on_the_linear_gaussian_model_follow_rainforth() -> None:
    """Rainforth et al. (2018), theorem 1: IWAE's encoder SNR falls like K^-1/2 and its
    decoder's rises like K^1/2; DReG's encoder SNR does not fall (Tucker et al., 2019).
    Measured with one observation (B=1) of the linear-Gaussian model with a mismatched q.
    (3000 draws give encoder SNRs 0.93, 0.37, 0.09 at K = 1, 10, 100: slope -0.52.)"""
    model = LinearGaussianModel(shift=0.5, log_scale=0.3)
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)
    ks = [1, 10, 100]

    def snr(objective: str, k: int, draws: int) -> GradientSNR:
        config = TrainConfig(k=k, objective=objective)
        return gradient_snr(model, x, config, draws=draws, generator=generator(23))

    iwae = snr_slopes(ks, [snr("iwae", k, 400) for k in ks])

    for summary in ("median", "rms", "direction"):
        assert -0.7 < iwae["encoder"][summary] < -0.3, summary
        assert 0.2 < iwae["decoder"][summary] < 0.9, summary
    assert snr("iwae-dreg", 100, 200).encoder.median > snr("iwae-dreg", 1, 200).encoder.median


def test_loglog_slope_of_a_power_law_and_of_degenerate_inputs() -> None:
    assert loglog_slope([1, 10, 100], [2.0, 2.0 * 10**-0.5, 0.2]) == pytest.approx(-0.5)
    assert loglog_slope([1, 10, 100], [0.0, 0.0, 3.0]) is None  # one positive value
    assert loglog_slope([1, 10, 100], [0.0, 1.0, 10.0]) == pytest.approx(1.0)  # zero skipped


def test_at_100_draws_the_rms_summary_reads_a_small_snr_that_the_median_reads_low() -> None:
    """The study's summary (`models.study.results.SNR_SUMMARY`, "rms"): averaging the unbiased
    SNR^2 estimates before the square root keeps a true SNR of 0.1 at 0.1 with 100 draws,
    where the median of the clipped per-parameter square roots reads about a quarter of it."""
    draws, params = 100, 2000
    g = generator(24)
    sigma = torch.exp(torch.randn(params, generator=g, dtype=F64))  # [P]
    grads = 0.1 * sigma + sigma * torch.randn(draws, params, generator=g, dtype=F64)

    summary = snr_summary(grads)

    assert summary.rms == pytest.approx(0.1, abs=0.02)
    assert summary.median < 0.06
    assert SNR_SUMMARY == "rms"


def test_a_sweep_fits_one_slope_per_image_and_pools_them_over_models() -> None:
    """Rainforth et al.'s measurement image by image on the linear-Gaussian model: every
    image's IWAE encoder slope is near -1/2, and pooling two models' sweeps averages
    their per-K summaries and spreads the slopes over all four images."""
    model = LinearGaussianModel(shift=0.5, log_scale=0.3)
    x = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]], dtype=F64)
    ks = [1, 10, 100]
    sweeps = [
        snr_sweep(model, x, TrainConfig(objective="iwae"), ks, draws=400, generator=generator(s))
        for s in (25, 26)
    ]

    image_slopes = sweeps[0].image_slopes()
    assert len(image_slopes) == 2
    assert all(-0.8 < s["encoder"]["rms"] < -0.2 for s in image_slopes)
    first = sweeps[0].to_dict()
    assert (first["ks"], first["draws"], first["images"]) == (ks, 400, 2)
    mean_rms = (sweeps[0].per_image[0][1].encoder.rms + sweeps[0].per_image[1][1].encoder.rms) / 2
    assert first["snr"][1]["encoder"]["rms"] == pytest.approx(mean_rms)

    pooled = pool_sweeps([s.to_dict() for s in sweeps])

    assert (pooled["models"], pooled["images"]) == (2, 4)
    all_slopes = [s["encoder"]["rms"] for sweep in sweeps for s in sweep.image_slopes()]
    assert pooled["slopes"]["encoder"]["rms"]["mean"] == pytest.approx(statistics.fmean(all_slopes))
    assert pooled["slopes"]["encoder"]["rms"]["sd"] == pytest.approx(statistics.stdev(all_slopes))
    both = [s.to_dict()["snr"][0]["decoder"]["median"] for s in sweeps]
    assert pooled["snr"]["decoder"]["median"][0]["mean"] == pytest.approx(statistics.fmean(both))
