"""Tests for models.evaluation: the test-set summary against the linear-Gaussian oracle of
tests/models/test_estimators.py, and active units on hand-set encoders."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from models.config import ModelConfig
from models.evaluation import active_units, evaluate
from models.networks import IWAEModel
from models.progress import Progress
from tests.models.test_estimators import F64, LinearGaussian, generator

pytestmark = pytest.mark.usefixtures("one_thread")


def test_evaluate_with_the_exact_posterior_gives_the_exact_mean_and_its_error() -> None:
    model = LinearGaussian()
    x = torch.randn(7, 3, generator=generator(9), dtype=F64)
    truth = model.log_px(x)
    calls = []

    def on_progress(progress: Progress) -> bool:
        calls.append((progress.done, progress.total))
        return False

    metrics = evaluate(model, x, 50, batch_size=3, callbacks=[on_progress])  # type: ignore[arg-type]

    assert metrics is not None
    assert metrics.test_loglik == pytest.approx(truth.mean().item(), abs=1e-9)
    assert metrics.test_loglik_std_error == pytest.approx(truth.std().item() / math.sqrt(7))
    assert (metrics.eval_k, metrics.eval_size) == (50, 7)
    assert calls == [(3, 7), (6, 7), (7, 7)]
    # Both posterior-mean coordinates vary strongly with x.
    assert metrics.active_units == [2]
    # Every weight is p(x): ELBO = log p(x), no gap, no Monte Carlo error, ESS = K.
    assert metrics.test_elbo == pytest.approx(metrics.test_loglik, abs=1e-9)
    assert metrics.test_gap == pytest.approx(0.0, abs=1e-9)
    assert metrics.mc_std_error_mean == pytest.approx(0.0, abs=1e-6)
    assert metrics.ess_mean == pytest.approx(50.0)


def test_evaluate_stops_when_progress_says_so() -> None:
    calls = []

    def stop_after_second(progress: Progress) -> bool:
        calls.append(progress.done)
        return len(calls) == 2

    x = torch.zeros(9, 3, dtype=F64)
    result = evaluate(LinearGaussian(), x, 10, batch_size=2, callbacks=[stop_after_second])  # type: ignore[arg-type]

    assert result is None
    assert calls == [2, 4]


def test_evaluate_reports_between_chunks_so_a_slow_batch_still_shows_life() -> None:
    """A batch whose k spans three chunks reports twice inside it ("loglik": samples drawn),
    and a stop asked there stops it: a wide network's batch at k=5000 can take minutes."""
    x = torch.zeros(2, 3, dtype=F64)
    chunk = (1 << 23) // (2 * 3)  # log_likelihood's chunk for a [2, 3] batch
    calls = []

    def on_progress(progress: Progress) -> bool:
        calls.append((progress.phase, progress.done, progress.total))
        return False

    k = 2 * chunk + 1
    metrics = evaluate(LinearGaussian(), x, k, batch_size=2, callbacks=[on_progress])  # type: ignore[arg-type]
    assert metrics is not None
    assert calls == [("loglik", chunk, k), ("loglik", 2 * chunk, k), ("eval", 2, 2)]

    stopped = evaluate(LinearGaussian(), x, k, batch_size=2, callbacks=[lambda p: True])  # type: ignore[arg-type]
    assert stopped is None


def test_encoder_ignoring_x_has_no_active_units(
    make_tiny_model: Callable[..., IWAEModel],
) -> None:
    x = torch.bernoulli(torch.full((50, 6), 0.5, dtype=F64), generator=generator(10))
    for layers in (1, 2):
        model = make_tiny_model(layers)
        with torch.no_grad():
            for encoder in model.encoders:
                encoder.net[0].weight.zero_()  # every layer's input is ignored

        counts = active_units(model, x, generator=generator(11))

        assert counts == [0] * layers


def test_active_units_counts_exactly_the_units_whose_mean_varies() -> None:
    """Hand-set encoder on 6 pixels, 4 latent units: u0 = 2 h0, u2 = -3 h1, u1 = 0.05 h2, u3 = 1.

    h_j = tanh(3 tanh(3 x_j)) is ~0 or ~0.99, so over random binary images u0 and u2 vary
    (variance ~1 and ~2.2), u1 barely (~6e-4 < 0.01) and u3 not at all.
    """
    model = IWAEModel(ModelConfig(latent_dim=4, hidden_dim=6, x_dim=6)).double()
    first, second, last = (model.encoders[0].net[i] for i in (0, 2, 4))
    with torch.no_grad():
        for layer in (first, second, last):
            layer.weight.zero_()
            layer.bias.zero_()
        first.weight.copy_(3 * torch.eye(6))
        second.weight.copy_(3 * torch.eye(6))
        last.weight[0, 0], last.weight[2, 1], last.weight[1, 2] = 2.0, -3.0, 0.05
        last.bias[3] = 1.0
        last.bias[4:] = -1.0  # log-variances
    x = torch.bernoulli(torch.full((200, 6), 0.5, dtype=F64), generator=generator(12))

    assert active_units(model, x) == [2]
    assert active_units(model, x, batch_size=7) == [2]  # chunked over images: same count
    assert active_units(model, x, threshold=1e-4) == [3]
