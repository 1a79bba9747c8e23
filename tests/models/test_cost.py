"""models.cost: the importance samples a training config asks for, counted exactly."""

from __future__ import annotations

import pytest

from models.config import TrainConfig
from models.cost import TRAIN_IMAGES, train_cost


def test_iwae_draws_k_samples_per_image() -> None:
    cost = train_cost(TrainConfig(k=50, batch_size=100, epochs=3))
    assert cost.samples_per_step == 50 * 100
    assert cost.train_samples == 3 * TRAIN_IMAGES * 50


@pytest.mark.parametrize("objective", ["miwae", "piwae"])
def test_grouped_objectives_draw_m_groups_of_k(objective: str) -> None:
    cost = train_cost(TrainConfig(k=5, m=4, objective=objective, batch_size=20, train_size=1000))
    assert cost.samples_per_step == 5 * 4 * 20
    assert cost.train_samples == 1 * 1000 * 5 * 4


@pytest.mark.parametrize("objective", ["iwae", "vae", "ciwae", "iwae-dreg"])
def test_m_is_ignored_by_the_other_objectives(objective: str) -> None:
    assert train_cost(TrainConfig(k=5, m=64, objective=objective)).samples_per_image == 5


def test_a_batch_is_never_larger_than_the_data() -> None:
    cost = train_cost(TrainConfig(k=10, batch_size=10_000, train_size=30, epochs=2))
    assert cost.samples_per_step == 10 * 30
    assert cost.train_samples == 2 * 30 * 10


def test_burdas_full_run_at_k50() -> None:
    """3280 epochs over the 60,000 images at K=50: the default total budget admits it."""
    assert train_cost(TrainConfig(k=50, epochs=3280)).train_samples == 9_840_000_000


@pytest.mark.parametrize("schedule", ["linear", "ess"])
def test_a_k_schedule_is_counted_at_its_largest_k(schedule: str) -> None:
    scheduled = train_cost(TrainConfig(k=50, k_schedule=schedule, k_min=5, epochs=4))
    assert scheduled == train_cost(TrainConfig(k=50, epochs=4))
