"""Tests for models.run.train_and_evaluate on a tiny synthetic MNIST (6-pixel images)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint, load_model
from models.config import TrainConfig
from models.data import Mnist, binarized_test_images
from models.evaluation import evaluate
from models.imputation import imputation_metrics
from models.progress import Progress
from models.run import CHECKPOINT_NAME, METRICS_NAME, train_and_evaluate
from models.snr import gradient_snr

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_KEYS = {"train_seconds", "epochs", "steps", "k_per_epoch"}
TRAIN_KEYS |= {"seconds_per_epoch", "images_per_s"}
EVAL_KEYS = {
    "test_loglik",
    "test_loglik_std_error",
    "active_units",
    "eval_k",
    "eval_size",
    "imputation",
}
EVAL_KEYS |= {"test_elbo", "test_gap", "mc_std_error_mean", "ess_mean"}
EVAL_KEYS |= {"pareto_k_mean", "pareto_k_above_0_7"}


@pytest.fixture
def config(train_config: TrainConfig) -> TrainConfig:
    """One epoch of 4 steps, then 8 test images scored with K=20."""
    return train_config.with_changes(epochs=1, eval_size=8, eval_k=20)


class Recorder:
    """Records every Progress; asks to stop at the first one of phase `stop_in`."""

    def __init__(self, stop_in: str | None = None) -> None:
        self.seen: list[Progress] = []
        self.stop_in = stop_in

    def __call__(self, progress: Progress) -> bool:
        self.seen.append(progress)
        return progress.phase == self.stop_in

    def phase(self, name: str) -> list[Progress]:
        return [p for p in self.seen if p.phase == name]


def test_writes_the_checkpoint_and_the_documented_metrics(
    config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    recorder = Recorder()

    result = train_and_evaluate(config, synthetic_mnist, out, callbacks=[recorder])

    assert not result.stopped
    assert result.checkpoint == out / CHECKPOINT_NAME == out / "model.safetensors"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.safetensors"]
    metrics = json.loads((out / METRICS_NAME).read_text())
    assert metrics == result.metrics
    assert metrics.keys() == TRAIN_KEYS | EVAL_KEYS
    assert (metrics["epochs"], metrics["steps"]) == (1, 4)
    assert (metrics["eval_k"], metrics["eval_size"]) == (20, 8)
    assert metrics["train_seconds"] > 0
    # One epoch of the 40 training images.
    assert metrics["seconds_per_epoch"] == metrics["train_seconds"]
    assert metrics["images_per_s"] == pytest.approx(40 / metrics["train_seconds"])
    assert len(metrics["active_units"]) == 1 and 0 <= metrics["active_units"][0] <= 2
    # A bound on the probability of 6 binary pixels: negative, and not absurdly so.
    assert -15 < metrics["test_loglik"] < 0
    assert metrics["test_loglik_std_error"] > 0
    gap = metrics["test_loglik"] - metrics["test_elbo"]
    assert metrics["test_gap"] == pytest.approx(gap, abs=1e-5)  # fp32 means
    assert 1 <= metrics["ess_mean"] <= 20 and metrics["mc_std_error_mean"] >= 0
    assert metrics["pareto_k_mean"] is None  # eval_k = 20: too few weights for a tail fit
    assert len(recorder.phase("train")) == 4
    assert [(p.done, p.total, p.epoch) for p in recorder.phase("eval")] == [(8, 8, 1)]
    # The imputation metric: 8 test images at K=1, then at the job's K=3.
    assert [(p.done, p.total) for p in recorder.phase("impute")] == [(8, 16), (16, 16)]
    imputation = metrics["imputation"]
    assert (imputation["pattern"], imputation["images"]) == ("top-half", 8)
    assert imputation["missing_pixels"] == 8 * 3
    assert sorted(imputation["model"]) == ["1", "3"]
    assert imputation.keys() == {"pattern", "images", "missing_pixels", "zero", "mean", "model"}
    assert recorder.phase("snr") == []  # snr_draws = 0


def test_snr_draws_measure_the_gradient_snr_at_the_trained_parameters(
    config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    config = config.with_changes(snr_draws=10)
    recorder = Recorder()

    result = train_and_evaluate(config, synthetic_mnist, tmp_path, callbacks=[recorder])

    assert result.metrics is not None
    assert result.metrics.keys() == TRAIN_KEYS | EVAL_KEYS | {"gradient_snr"}
    assert [(p.done, p.total) for p in recorder.phase("snr")] == [(i, 10) for i in range(1, 11)]
    assert recorder.seen[-1].phase == "snr"
    # The same measurement, repeated from the checkpoint: the trained parameters, the first
    # (here: all 8) binarized test images and a generator seeded from the job's seed.
    model, _ = load_model(result.checkpoint)
    again = gradient_snr(
        model,
        binarized_test_images(synthetic_mnist.test_images[:8]),
        config,
        draws=10,
        generator=torch.Generator().manual_seed(config.seed),
    )
    assert again is not None
    assert result.metrics["gradient_snr"] == again.to_dict()
    for network in ("encoder", "decoder"):
        summary = result.metrics["gradient_snr"][network]
        assert summary["median"] >= 0 and summary["parameters"] > 0


def test_seconds_per_epoch_and_images_per_s_count_every_epoch(
    train_config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    config = train_config.with_changes(epochs=3, batch_size=7, train_size=30)
    metrics = train_and_evaluate(config, synthetic_mnist, tmp_path).metrics

    assert metrics is not None
    assert metrics["seconds_per_epoch"] == pytest.approx(metrics["train_seconds"] / 3)
    assert metrics["images_per_s"] == pytest.approx(3 * 30 / metrics["train_seconds"])


def test_the_ess_schedules_held_out_batch_is_not_counted_as_trained(
    train_config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    config = train_config.with_changes(epochs=1, k_schedule="ess")
    metrics = train_and_evaluate(config, synthetic_mnist, tmp_path).metrics

    assert metrics is not None  # 40 images, one batch of 10 held out
    assert metrics["images_per_s"] == pytest.approx(30 / metrics["train_seconds"])


def test_metrics_describe_the_saved_model_on_the_fixed_test_binarization(
    config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    result = train_and_evaluate(config, synthetic_mnist, tmp_path)

    model, saved_config = load_model(result.checkpoint)
    again = evaluate(
        model,
        binarized_test_images(synthetic_mnist.test_images[:8]),
        20,
        generator=torch.Generator().manual_seed(config.seed),
    )

    imputation = imputation_metrics(
        model,
        binarized_test_images(synthetic_mnist.test_images[:8]),
        synthetic_mnist.train_images.mean(0),
        [1, config.k],
        generator=torch.Generator().manual_seed(config.seed),
    )

    assert saved_config == config
    assert again is not None and result.metrics is not None
    assert again.test_loglik == result.metrics["test_loglik"]
    assert again.active_units == result.metrics["active_units"]
    assert imputation == result.metrics["imputation"]


def test_eval_size_zero_skips_evaluation(
    config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    recorder = Recorder()

    result = train_and_evaluate(
        config.with_changes(eval_size=0), synthetic_mnist, tmp_path, callbacks=[recorder]
    )

    assert result.metrics is not None and result.metrics.keys() == TRAIN_KEYS
    assert json.loads((tmp_path / METRICS_NAME).read_text()) == result.metrics
    assert recorder.phase("eval") == []


@pytest.mark.parametrize("phase", ["eval", "impute", "snr"])
def test_a_stop_during_evaluation_returns_stopped_without_metrics(
    config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path, phase: str
) -> None:
    config = config.with_changes(snr_draws=8)
    result = train_and_evaluate(config, synthetic_mnist, tmp_path, callbacks=[Recorder(phase)])

    assert result.stopped and result.metrics is None
    assert not (tmp_path / METRICS_NAME).exists()
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).state.epoch == 1  # training finished

    # Running again evaluates without training again.
    recorder = Recorder()
    rerun = train_and_evaluate(config, synthetic_mnist, tmp_path, callbacks=[recorder])
    assert not rerun.stopped and rerun.metrics is not None
    assert recorder.phase("train") == []
    assert rerun.metrics["steps"] == 4


def test_a_stop_during_training_returns_stopped_without_metrics(
    config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    result = train_and_evaluate(config, synthetic_mnist, tmp_path, callbacks=[Recorder("train")])

    assert result.stopped and result.metrics is None
    assert list(tmp_path.iterdir()) == []


def test_rerunning_a_finished_run_does_not_retrain(
    config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    first = train_and_evaluate(config, synthetic_mnist, tmp_path)
    weights = load_checkpoint(tmp_path / CHECKPOINT_NAME).model_state
    recorder = Recorder()

    second = train_and_evaluate(config, synthetic_mnist, tmp_path, callbacks=[recorder])

    assert recorder.phase("train") == []
    assert first.metrics is not None and second.metrics is not None
    assert second.metrics["steps"] == first.metrics["steps"] == 4
    assert second.metrics["train_seconds"] == first.metrics["train_seconds"]
    assert second.metrics["test_loglik"] == first.metrics["test_loglik"]
    after = load_checkpoint(tmp_path / CHECKPOINT_NAME).model_state
    assert all(torch.equal(after[name], tensor) for name, tensor in weights.items())
