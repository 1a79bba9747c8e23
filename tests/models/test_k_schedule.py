"""Tests for models.k_schedule and the K schedules in training: rules, records, exact resumption.

The training tests use the 6-pixel model on 40 synthetic images (conftest's `train_config`);
under `ess` the last batch of 10 is held out, leaving 3 steps per epoch.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.config import TrainConfig
from models.data import Mnist
from models.k_schedule import ess_k, initial_k, linear_k, normalized_ess
from models.progress import Progress
from models.run import train_and_evaluate
from models.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the rules ------------------------------------------------------------------------------


def test_linear_goes_from_k_min_to_k() -> None:
    config = TrainConfig(k=50, k_schedule="linear", k_min=1, epochs=5)

    # round(1 + 49 e / 4) for e = 0..4 (25.5 rounds to the even 26).
    assert [linear_k(config, e) for e in range(5)] == [1, 13, 26, 38, 50]
    assert initial_k(config) == 1
    assert linear_k(config.with_changes(epochs=1), 0) == 50


def test_fixed_starts_and_stays_at_k() -> None:
    assert initial_k(TrainConfig(k=7)) == 7


def test_ess_rule_doubles_below_the_target_and_halves_above_within_bounds() -> None:
    config = TrainConfig(k=50, k_schedule="ess", k_min=3, ess_target=0.2)

    assert [ess_k(config, k, 0.1) for k in (3, 10, 25, 40, 50)] == [6, 20, 50, 50, 50]
    assert [ess_k(config, k, 0.3) for k in (50, 20, 6, 5, 3)] == [25, 10, 3, 3, 3]
    assert ess_k(config, 12, 0.2) == 12


def test_normalized_ess_oracles() -> None:
    equal = torch.zeros(8, 1, dtype=torch.float64)
    one_alive = torch.full((1000, 1), -1e4)
    one_alive[5] = 0.0
    # w = (1, 3): (1 + 3)^2 / (2 (1 + 9)) = 0.8
    pair = torch.tensor([[0.0], [math.log(3.0)]], dtype=torch.float64)

    assert normalized_ess(equal).item() == pytest.approx(1.0)
    assert normalized_ess(one_alive).item() == pytest.approx(1e-3)
    assert normalized_ess(pair).item() == pytest.approx(0.8)
    assert normalized_ess(pair + 1e4).item() == pytest.approx(0.8)  # scale-free, stable


# --- in training ----------------------------------------------------------------------------


class KRecorder:
    """Records (epoch, step, k) of every training step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int | None]] = []

    def __call__(self, progress: Progress) -> None:
        self.seen.append((progress.epoch, progress.done, progress.k))


def test_linear_schedule_trains_each_epoch_with_its_k(
    train_config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    config = train_config.with_changes(k=7, k_schedule="linear", k_min=1, epochs=3)
    recorder = KRecorder()
    path = tmp_path / "model.safetensors"

    result = train(config, synthetic_mnist.train_images, checkpoint_path=path, callbacks=[recorder])

    assert recorder.seen == [(e, s, k) for e, k in ((1, 1), (2, 4), (3, 7)) for s in (1, 2, 3, 4)]
    assert result.k_history == [1, 4, 7]
    assert result.ess_history == []
    state = load_checkpoint(path).state
    assert state.k_history == [1, 4, 7]


def test_the_k_in_use_changes_the_samples_drawn(
    train_config: TrainConfig, synthetic_mnist: Mnist
) -> None:
    """A linear schedule from 3 to 3 is fixed K=3, bit for bit; from 1 it is not."""
    images = synthetic_mnist.train_images
    fixed = train(train_config, images).model.state_dict()
    flat = train(train_config.with_changes(k_schedule="linear", k_min=3), images)
    rising = train(train_config.with_changes(k_schedule="linear", k_min=1), images)

    assert all(torch.equal(fixed[n], t) for n, t in flat.model.state_dict().items())
    assert not torch.equal(
        fixed["decoders.0.4.bias"], rising.model.state_dict()["decoders.0.4.bias"]
    )


def test_ess_schedule_follows_its_rule_on_the_measured_ess(
    train_config: TrainConfig, synthetic_mnist: Mnist
) -> None:
    # The target that makes K go both up and down was found with PyTorch's initialisation.
    config = train_config.with_changes(
        k=8, k_schedule="ess", k_min=1, epochs=5, ess_target=0.85, init="torch"
    )
    recorder = KRecorder()

    result = train(config, synthetic_mnist.train_images, callbacks=[recorder])

    assert len(result.ess_history) == len(result.k_history) == 5
    assert all(0.0 < ess <= 1.0 for ess in result.ess_history)
    assert result.k_history[0] == 1
    for e in range(4):
        k, ess = result.k_history[e], result.ess_history[e]
        assert result.k_history[e + 1] == ess_k(config, k, ess)
    steps = [b - a for a, b in zip(result.k_history, result.k_history[1:], strict=False)]
    assert min(steps) < 0 < max(steps)  # K went up and down
    assert {s for _, s, _ in recorder.seen} == {1, 2, 3}  # one batch of 10 is held out
    assert [k for e, s, k in recorder.seen if s == 1] == result.k_history


def test_ess_needs_more_than_one_batch(train_config: TrainConfig, synthetic_mnist: Mnist) -> None:
    ess = train_config.with_changes(k_schedule="ess")

    with pytest.raises(ValueError, match="train_size must exceed batch_size"):
        ess.with_changes(train_size=10)
    with pytest.raises(ValueError, match="holds out one batch"):
        train(ess, synthetic_mnist.train_images[:10])  # train_size None: all 10 images


@pytest.mark.parametrize(
    "schedule", [{"k_schedule": "linear", "k_min": 1}, {"k_schedule": "ess", "ess_target": 0.6}]
)
def test_resuming_across_an_epoch_boundary_continues_the_schedule_exactly(
    train_config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path, schedule: dict
) -> None:
    config = train_config.with_changes(k=6, epochs=3, **schedule)
    images = synthetic_mnist.train_images
    straight = train(config, images, checkpoint_path=tmp_path / "a.safetensors")
    path = tmp_path / "b.safetensors"
    train(config, images, checkpoint_path=path, callbacks=[lambda p: (p.epoch, p.done) == (2, 2)])
    recorder = KRecorder()

    resumed = train(config, images, checkpoint_path=path, callbacks=[recorder])

    assert recorder.seen[0][:2] == (2, 1)  # restarted from the end of epoch 1
    assert resumed.k_history == straight.k_history
    assert resumed.ess_history == straight.ess_history
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    a, b = load_checkpoint(tmp_path / "a.safetensors"), load_checkpoint(path)
    assert (a.state.epoch, a.state.step, a.state.k) == (b.state.epoch, b.state.step, b.state.k)
    assert (a.state.k_history, a.state.ess_history) == (b.state.k_history, b.state.ess_history)
    assert torch.equal(a.generator_state, b.generator_state)


def test_metrics_record_the_k_of_every_epoch(
    train_config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    fixed = train_and_evaluate(train_config, synthetic_mnist, tmp_path / "fixed")
    ess = train_and_evaluate(
        train_config.with_changes(k_schedule="ess", ess_target=0.6), synthetic_mnist, tmp_path / "e"
    )

    assert fixed.metrics["k_per_epoch"] == [3, 3]
    assert "ess_per_epoch" not in fixed.metrics
    assert len(ess.metrics["k_per_epoch"]) == len(ess.metrics["ess_per_epoch"]) == 2
