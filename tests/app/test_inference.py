"""What the API computes with a served model (app.inference), called directly: numpy in and
out, seeded draws that repeat, the K=1 bound that is the ELBO, observed pixels kept."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from app import inference
from app.registry import ModelRegistry, ServedModel
from models.storage import FileStorage

D = 784


@pytest.fixture
def served(home: Path, tiny_model: str) -> ServedModel:
    return ModelRegistry(FileStorage(home)).load(tiny_model)


@pytest.fixture
def digit() -> np.ndarray:
    return (np.random.default_rng(0).random(D) < 0.2).astype(np.float32)  # [784] in {0, 1}


def test_bits_per_dim_is_the_negative_log_likelihood_over_784_ln_2() -> None:
    score = inference.Score(
        log_likelihood=-100.0, std_error=0.0, elbo=-101.0, ess=1.0, pareto_k=None
    )
    assert score.bits_per_dim == 100.0 / (D * math.log(2.0))


def test_samples_are_bernoulli_means_that_a_seed_repeats(served: ServedModel) -> None:
    first = inference.sample(served, 3, seed=5)
    assert first.shape == (3, D) and first.dtype == np.float32
    assert ((first >= 0) & (first <= 1)).all()
    assert np.array_equal(first, inference.sample(served, 3, seed=5))
    assert not np.array_equal(first, inference.sample(served, 3, seed=6))


def test_a_reconstruction_is_one_digit_of_means(served: ServedModel, digit: np.ndarray) -> None:
    image = inference.reconstruct(served, digit)
    assert image.shape == (D,)
    assert ((image >= 0) & (image <= 1)).all()


def test_with_one_sample_the_bound_is_the_elbo(served: ServedModel, digit: np.ndarray) -> None:
    score = inference.score(served, digit, 1, seed=0)
    assert score.log_likelihood == pytest.approx(score.elbo, abs=1e-5)
    assert score.pareto_k is None  # too few weights to fit
    assert score.ess == pytest.approx(1.0)


def test_a_seeded_score_repeats_and_reports_each_chunk(
    served: ServedModel, digit: np.ndarray
) -> None:
    done: list[int] = []
    score = inference.score(
        served, digit, 50, chunk_size=20, seed=3, on_chunk=lambda p: done.append(p.done)
    )
    assert done == [20, 40]  # samples drawn, after every chunk but the last
    assert score == inference.score(served, digit, 50, chunk_size=20, seed=3)
    assert score.pareto_k is not None
    assert 1.0 <= score.ess <= 50.0


def test_imputation_keeps_the_observed_pixels(served: ServedModel, digit: np.ndarray) -> None:
    missing = np.zeros(D, dtype=bool)
    missing[: D // 2] = True  # the top half
    result = inference.impute(served, digit, missing, k=20, n=4, seed=1)
    assert result.single.shape == (D,) and result.draws.shape == (4, D)
    assert np.array_equal(result.single[~missing], digit[~missing])
    assert np.array_equal(result.draws[:, ~missing], np.tile(digit[~missing], (4, 1)))
    assert set(np.unique(result.draws)) <= {0.0, 1.0}
    assert math.isfinite(result.observed_log_likelihood)
