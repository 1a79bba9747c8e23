"""models.cost: the importance samples a training config asks for, counted exactly."""

from __future__ import annotations

import pytest

from models.config import ModelConfig, TrainConfig
from models.cost import TRAIN_IMAGES, network_macs, train_cost
from models.networks import IWAEModel


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
    cost = train_cost(TrainConfig(k=50, epochs=3280))
    assert cost.train_samples == 9_840_000_000
    assert cost.train_flops == 6 * 3280 * 60_000 * (216_800 + 50 * 206_800)  # 1.25e16


@pytest.mark.parametrize(
    "model",
    [
        ModelConfig(),
        ModelConfig(hidden_dim=4096),
        ModelConfig(layers=2),
        ModelConfig(layers=2, hidden_dim=200, z1_dim=100, hidden2_dim=100),
    ],
)
def test_multiply_adds_are_the_networks_weights(model: ModelConfig) -> None:
    """Every weight is one multiply-add per row: per image for the first encoder block,
    per sample for the rest."""
    per_image, per_sample = network_macs(model)
    network = IWAEModel(model)
    assert per_image == sum(p.numel() for p in network.encoders[0].parameters() if p.ndim == 2)
    weights = sum(p.numel() for p in network.parameters() if p.ndim == 2)
    assert per_image + per_sample == weights


def test_flops_grow_with_the_square_of_the_width() -> None:
    narrow = train_cost(TrainConfig(k=50, model=ModelConfig(hidden_dim=200)))
    wide = train_cost(TrainConfig(k=50, model=ModelConfig(hidden_dim=4096)))
    assert narrow.samples_per_step == wide.samples_per_step
    assert wide.step_flops > 90 * narrow.step_flops
    assert narrow.step_flops == 6 * (100 * 216_800 + 5000 * 206_800)


@pytest.mark.parametrize("schedule", ["linear", "ess"])
def test_a_k_schedule_is_counted_at_its_largest_k(schedule: str) -> None:
    scheduled = train_cost(TrainConfig(k=50, k_schedule=schedule, k_min=5, epochs=4))
    assert scheduled == train_cost(TrainConfig(k=50, epochs=4))
