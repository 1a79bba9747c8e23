"""Tests for models.training: callbacks, stopping, checkpoints, exact resumption, schedules.

Most tests train the 6-pixel model (float32, as training does) on 40 synthetic images for two
epochs of 4 steps. One test trains on a small subset of real MNIST.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.checkpoint import load_checkpoint
from models.config import ModelConfig, TrainConfig
from models.data import Mnist, binarized_test_images
from models.estimators import log_likelihood
from models.files import write_atomic
from models.progress import Progress
from models.training import (
    binarize,
    burda_epochs,
    init_model,
    learning_rate,
    resolve_device,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder:
    """A callback that records every Progress and asks to stop at (epoch, step) `stop_at`."""

    def __init__(self, stop_at: tuple[int, int] | None = None) -> None:
        self.seen: list[Progress] = []
        self.stop_at = stop_at

    def __call__(self, progress: Progress) -> bool:
        self.seen.append(progress)
        return (progress.epoch, progress.done) == self.stop_at

    @property
    def steps(self) -> list[tuple[int, int]]:
        return [(p.epoch, p.done) for p in self.seen]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- the loop and its callbacks -------------------------------------------------------------


def test_callbacks_see_every_step(train_config: TrainConfig, synthetic_mnist: Mnist) -> None:
    recorder = Recorder()

    result = train(train_config, synthetic_mnist.train_images, callbacks=[recorder])

    assert recorder.steps == [(e, s) for e in (1, 2) for s in (1, 2, 3, 4)]
    assert all(p.phase == "train" and p.epochs == 2 and p.total == 4 for p in recorder.seen)
    assert all(p.images_per_s > 0 for p in recorder.seen)
    assert all(p.loss is None or math.isfinite(p.loss) for p in recorder.seen)
    epoch_ends = [p for p in recorder.seen if p.done == 4]
    assert all(p.loss is not None for p in epoch_ends)  # each epoch reports its loss
    assert recorder.seen[-1].eta_s == 0
    assert (result.stopped, result.epochs_done, result.steps) == (False, 2, 8)
    assert result.train_seconds > 0
    assert not result.model.training


def test_returning_true_stops_within_that_step(
    train_config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    stopper, watcher = Recorder(stop_at=(1, 2)), Recorder()
    path = tmp_path / "model.safetensors"

    result = train(
        train_config,
        synthetic_mnist.train_images,
        checkpoint_path=path,
        callbacks=[stopper, watcher],
    )

    assert (result.stopped, result.epochs_done, result.steps) == (True, 0, 2)
    assert stopper.steps == watcher.steps == [(1, 1), (1, 2)]  # every callback sees every step
    assert not path.exists()  # no epoch finished, so no checkpoint


def test_a_checkpoint_is_written_at_every_epoch_end(
    train_config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    states_seen = []

    def read_checkpoint(progress: Progress) -> None:
        if progress.done == 1:
            states_seen.append(load_checkpoint(path).state if path.exists() else None)

    train(
        train_config,
        synthetic_mnist.train_images,
        checkpoint_path=path,
        callbacks=[read_checkpoint],
    )

    assert states_seen[0] is None
    assert (states_seen[1].epoch, states_seen[1].step) == (1, 4)
    final = load_checkpoint(path)
    assert (final.state.epoch, final.state.step) == (2, 8)
    assert final.config == train_config


def test_stopping_mid_epoch_does_not_advance_the_checkpoint(
    train_config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    after_one = train(train_config.with_changes(epochs=1), synthetic_mnist.train_images)

    result = train(
        train_config,
        synthetic_mnist.train_images,
        checkpoint_path=path,
        callbacks=[Recorder(stop_at=(2, 3))],
    )

    assert (result.stopped, result.epochs_done, result.steps) == (True, 1, 7)
    checkpoint = load_checkpoint(path)
    assert (checkpoint.state.epoch, checkpoint.state.step) == (1, 4)
    assert_same_weights(checkpoint.model_state, weights(after_one.model))


# --- exact resumption -----------------------------------------------------------------------


def test_resuming_after_epoch_one_gives_the_uninterrupted_weights(
    train_config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    images = synthetic_mnist.train_images
    straight = train(train_config, images, checkpoint_path=tmp_path / "a.safetensors")
    path = tmp_path / "b.safetensors"
    train(train_config.with_changes(epochs=1), images, checkpoint_path=path)
    recorder = Recorder()

    resumed = train(train_config, images, checkpoint_path=path, callbacks=[recorder])

    assert recorder.steps == [(2, 1), (2, 2), (2, 3), (2, 4)]  # only the second epoch ran
    assert (resumed.epochs_done, resumed.steps) == (2, 8)
    assert_same_weights(weights(resumed.model), weights(straight.model))
    a, b = load_checkpoint(tmp_path / "a.safetensors"), load_checkpoint(path)
    assert torch.equal(a.generator_state, b.generator_state)
    for index, values in a.optimizer_state["state"].items():
        for key, value in values.items():
            assert torch.equal(b.optimizer_state["state"][index][key], value)


def test_resuming_after_a_stop_mid_epoch_two_gives_the_uninterrupted_weights(
    train_config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    images = synthetic_mnist.train_images
    straight = train(train_config, images)
    path = tmp_path / "model.safetensors"
    stopped = train(train_config, images, checkpoint_path=path, callbacks=[Recorder((2, 2))])

    resumed = train(train_config, images, checkpoint_path=path)

    assert stopped.stopped and not resumed.stopped
    assert resumed.steps == 8
    assert_same_weights(weights(resumed.model), weights(straight.model))


def test_resuming_a_checkpoint_of_another_device_type_reseeds_the_generator(
    train_config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    images = synthetic_mnist.train_images
    path = tmp_path / "model.safetensors"
    train(train_config.with_changes(epochs=1), images, checkpoint_path=path)
    # What a CUDA run leaves: a 16-byte generator state (a CPU one is 5056 bytes).
    tensors, metadata = load_file(path), safe_open(path, "pt").metadata()
    tensors["rng.generator"] = torch.zeros(16, dtype=torch.uint8)
    save_file(tensors, path, metadata=metadata)

    first = train(train_config, images, checkpoint_path=path)
    save_file(tensors, path, metadata=metadata)
    second = train(train_config, images, checkpoint_path=path)

    assert (first.epochs_done, first.steps) == (2, 8)
    assert_same_weights(weights(first.model), weights(second.model))  # reseeded, reproducibly
    assert load_checkpoint(path).generator_state.numel() == 5056


def test_a_refused_write_keeps_the_previous_checkpoint(
    train_config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    allowed = [True]
    seen: list[Path] = []

    def fenced_write(target: Path, data: bytes) -> None:
        seen.append(target)
        if not allowed.pop(0):
            raise RuntimeError("lease lost")
        write_atomic(target, data)

    allowed.append(False)
    with pytest.raises(RuntimeError, match="lease lost"):
        train(train_config, synthetic_mnist.train_images, checkpoint_path=path, write=fenced_write)

    assert seen == [path, path]
    assert load_checkpoint(path).state.epoch == 1  # the second epoch's write was refused
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_training_is_seeded(train_config: TrainConfig, synthetic_mnist: Mnist) -> None:
    images = synthetic_mnist.train_images
    init = weights(init_model(train_config, torch.device("cpu")))

    a, b = train(train_config, images), train(train_config, images)
    c = train(train_config.with_changes(seed=8), images)

    assert_same_weights(weights(a.model), weights(b.model))
    name = "decoders.0.4.bias"
    assert not torch.equal(weights(a.model)[name], weights(c.model)[name])
    assert not torch.equal(weights(a.model)[name], init[name])  # training moved the weights


def test_resuming_with_another_architecture_is_refused(
    train_config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    train(train_config.with_changes(epochs=1), synthetic_mnist.train_images, checkpoint_path=path)
    other = train_config.with_changes(model=ModelConfig(layers=1, latent_dim=3, x_dim=6))

    with pytest.raises(ValueError, match="checkpoint"):
        train(other, synthetic_mnist.train_images, checkpoint_path=path)


def test_init_model_is_seeded_and_leaves_the_global_rng_alone(train_config: TrainConfig) -> None:
    before = torch.get_rng_state()

    a = init_model(train_config, torch.device("cpu"))
    b = init_model(train_config, torch.device("cpu"))

    assert torch.equal(torch.get_rng_state(), before)
    assert_same_weights(weights(a), weights(b))
    assert next(a.parameters()).dtype == torch.float32


# --- schedules, options, errors -------------------------------------------------------------


def test_constant_learning_rate() -> None:
    config = TrainConfig(learning_rate=3e-4)

    assert [learning_rate(config, epoch) for epoch in (0, 1, 100, 5000)] == [3e-4] * 4


@pytest.mark.parametrize(
    ("epochs", "stage"),
    [
        ((0,), 0),
        ((1, 2, 3), 1),
        ((4, 12), 2),
        ((13, 39), 3),
        ((40, 120), 4),
        ((121, 363), 5),
        ((364, 1092), 6),
        ((1093, 3279, 3280, 10_000), 7),  # the last stage lasts
    ],
)
def test_burda_schedule_stages(epochs: tuple[int, ...], stage: int) -> None:
    """Stage i lasts 3^i epochs at lr * 10^(-i/7); stage i starts at epoch (3^i - 1) / 2."""
    config = TrainConfig(learning_rate=1e-3, schedule="burda")

    for epoch in epochs:
        assert learning_rate(config, epoch) == pytest.approx(1e-3 * 10 ** (-stage / 7), rel=1e-12)


def test_burda_schedule_length() -> None:
    assert burda_epochs() == 3280 == (3**8 - 1) // 2


def test_the_optimizer_uses_the_scheduled_learning_rate(
    train_config: TrainConfig, synthetic_mnist: Mnist, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    config = train_config.with_changes(schedule="burda", learning_rate=2e-3)

    train(config.with_changes(epochs=1), synthetic_mnist.train_images, checkpoint_path=path)
    lr_epoch_1 = load_checkpoint(path).optimizer_state["param_groups"][0]["lr"]
    train(config, synthetic_mnist.train_images, checkpoint_path=path)
    lr_epoch_2 = load_checkpoint(path).optimizer_state["param_groups"][0]["lr"]

    assert lr_epoch_1 == pytest.approx(2e-3)
    assert lr_epoch_2 == pytest.approx(2e-3 * 10 ** (-1 / 7))


def test_bf16_training_runs_with_finite_loss(
    train_config: TrainConfig, synthetic_mnist: Mnist
) -> None:
    recorder = Recorder()

    result = train(
        train_config.with_changes(precision="bf16"),
        synthetic_mnist.train_images,
        callbacks=[recorder],
    )

    losses = [p.loss for p in recorder.seen if p.loss is not None]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert all(
        torch.isfinite(p).all() and p.dtype == torch.float32 for p in result.model.parameters()
    )


def test_train_size_selects_the_first_images(
    train_config: TrainConfig, synthetic_mnist: Mnist
) -> None:
    recorder = Recorder()

    result = train(
        train_config.with_changes(train_size=25), synthetic_mnist.train_images, callbacks=[recorder]
    )

    assert recorder.seen[0].total == 3  # 25 images in batches of 10
    assert result.steps == 6


def test_train_size_larger_than_the_data_is_refused(
    train_config: TrainConfig, synthetic_mnist: Mnist
) -> None:
    with pytest.raises(ValueError, match="train_size"):
        train(train_config.with_changes(train_size=41), synthetic_mnist.train_images)


def test_resolve_device_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    with pytest.raises(ValueError, match="cuda"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


# --- real data ------------------------------------------------------------------------------


def test_training_lowers_the_loss_on_real_mnist(real_mnist_data: Mnist) -> None:
    """1000 training images, a small one-layer model, 3 epochs of 10 steps at K=5."""
    config = TrainConfig(
        k=5,
        epochs=3,
        batch_size=100,
        learning_rate=3e-3,
        model=ModelConfig(latent_dim=10, hidden_dim=100),
        train_size=1000,
        eval_size=0,
        device="cpu",
    )
    test_x = binarized_test_images(real_mnist_data.test_images[:200])
    before = init_model(config, torch.device("cpu"))
    recorder = Recorder()

    result = train(config, real_mnist_data.train_images, callbacks=[recorder])

    losses = [p.loss for p in recorder.seen if p.done == p.total]  # mean over each epoch
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] < losses[0] - 20
    held_out = [
        log_likelihood(model, test_x, 20, generator=torch.Generator().manual_seed(0)).log_px.mean()
        for model in (before, result.model)
    ]
    # From ~ -543 nats (784 coin flips) to well below that in 30 steps.
    assert held_out[0] < -500
    assert held_out[1] > held_out[0] + 50


# --- Burda's initialisation -----------------------------------------------------------------


def test_burda_init_sets_the_output_bias_from_the_training_images(
    train_config: TrainConfig, synthetic_mnist: Mnist
) -> None:
    config = train_config.with_changes(init="burda", epochs=1)
    images = synthetic_mnist.train_images  # [40, 6]
    pixel_mean = images.mean(0).clamp(0.001, 0.999)

    model = init_model(config, torch.device("cpu"), images.mean(0))
    torch_init = init_model(config.with_changes(init="torch"), torch.device("cpu"), images.mean(0))

    expected = torch.log(pixel_mean / (1 - pixel_mean))
    torch.testing.assert_close(model.decoders[0][-1].bias, expected)
    assert not torch.equal(torch_init.decoders[0][-1].bias, expected)
    assert (model.encoders[0].net[0].bias == 0).all()
    # train() passes the mean of the images it trains on: step 0 starts from these weights.
    assert train(config, images).model.decoders[0][-1].bias.sub(expected).abs().max() < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binarize_draws_what_bernoulli_draws(dtype: torch.dtype) -> None:
    """The same pixels and the same generator state after, so runs stay as they were."""
    p = torch.rand(100, 784, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ours, theirs = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)

    x = binarize(p, ours)

    assert x.dtype == dtype
    assert torch.equal(x, torch.bernoulli(p, generator=theirs))
    assert 0.4 < x.mean().item() < 0.6  # binary draws of p, not a constant
    assert torch.equal(ours.get_state(), theirs.get_state())
