"""Tests for models.missing: the masks, the observed-pixel likelihood, and training on them."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import models.training
from models.config import TrainConfig
from models.distributions import bernoulli_log_prob
from models.missing import draw_observed, eval_observed, top_half_missing
from models.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_mcar_drops_each_pixel_with_the_rate() -> None:
    observed = draw_observed("mcar", 0.3, 200, 784, generator())

    assert observed.shape == (200, 784) and observed.dtype == torch.float32
    assert set(observed.unique().tolist()) == {0.0, 1.0}
    # 156,800 Bernoulli(0.3) pixels: the missing fraction is within 5 standard errors.
    assert abs(float(1 - observed.mean()) - 0.3) < 5 * (0.3 * 0.7 / observed.numel()) ** 0.5


def test_masks_come_from_the_generator() -> None:
    a = draw_observed("random-square", 0.5, 8, 784, generator(1))
    b = draw_observed("random-square", 0.5, 8, 784, generator(1))
    c = draw_observed("random-square", 0.5, 8, 784, generator(2))

    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_half_removes_the_first_14_rows_of_a_fraction_of_the_images() -> None:
    observed = draw_observed("top-half", 0.4, 1000, 784, generator())

    images = observed.view(1000, 28, 28)
    hit = images[:, 0, 0] == 0
    assert (images[hit, :14] == 0).all() and (images[hit, 14:] == 1).all()
    assert (images[~hit] == 1).all()
    assert 0.4 - 0.08 < float(hit.float().mean()) < 0.4 + 0.08  # 5 standard errors


def test_random_square_removes_one_14x14_square_per_hit_image() -> None:
    observed = draw_observed("random-square", 0.9, 300, 784, generator())

    corners = set()
    for image in observed.view(300, 28, 28):
        missing = (image == 0).nonzero()
        if len(missing) == 0:
            continue
        (top, left), (bottom, right) = missing.min(0).values, missing.max(0).values
        assert (bottom - top, right - left) == (13, 13)
        assert len(missing) == 14 * 14  # the whole square, nothing else
        corners.add((int(top), int(left)))
    assert 250 < sum(1 for image in observed if (image == 0).any()) <= 300
    assert len(corners) > 50  # positions vary over the 15 x 15 possible corners


def test_the_metric_mask_is_the_top_half_of_every_image() -> None:
    observed = eval_observed(3, 784, dtype=torch.float64)

    assert observed.shape == (3, 784) and observed.dtype == torch.float64
    assert (observed[:, :392] == 0).all() and (observed[:, 392:] == 1).all()
    assert top_half_missing(6).tolist() == [True, True, True, False, False, False]


def test_square_patterns_need_square_images() -> None:
    with pytest.raises(ValueError, match="square"):
        draw_observed("random-square", 0.5, 2, 6, generator())
    with pytest.raises(ValueError, match="unknown"):
        draw_observed("bottom", 0.5, 2, 6, generator())


# --- the observed-pixel likelihood ----------------------------------------------------------


def test_observed_bernoulli_log_prob_is_the_sum_over_observed_pixels() -> None:
    """By hand: sum over observed d of x_d log s(l_d) + (1 - x_d) log(1 - s(l_d))."""
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    observed = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    logits = torch.tensor([[[0.5, -1.0, 2.0, 3.0], [1.5, 0.2, -0.7, -4.0]]], dtype=torch.float64)
    p = torch.sigmoid(logits[0])
    expected = [
        math.log(p[0, 0]) + math.log(1 - p[0, 1]) + math.log(p[0, 3]),
        math.log(1 - p[1, 1]) + math.log(p[1, 2]),
    ]

    log_p = bernoulli_log_prob(x, logits, observed)  # [1, 2]

    torch.testing.assert_close(log_p[0], torch.tensor(expected, dtype=torch.float64))
    full = bernoulli_log_prob(x, logits, torch.ones_like(x))
    torch.testing.assert_close(full, bernoulli_log_prob(x, logits), rtol=0, atol=1e-12)


def test_the_observed_pixel_likelihood_sums_out_the_missing_pixels() -> None:
    """p(x_obs | z) = sum over the 2^3 completions x_miss of p(x_obs, x_miss | z), exactly."""
    logits = torch.randn(5, 1, 6, dtype=torch.float64, generator=generator(3))  # [K, 1, D]
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    observed = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    completions = []
    for bits in itertools.product([0.0, 1.0], repeat=3):
        full = x.clone()
        full[0, [1, 2, 4]] = torch.tensor(bits, dtype=torch.float64)
        completions.append(bernoulli_log_prob(full, logits))  # [K, 1]

    marginal = torch.logsumexp(torch.stack(completions), 0)

    torch.testing.assert_close(
        bernoulli_log_prob(x, logits, observed), marginal, rtol=0, atol=1e-12
    )


def test_observed_bernoulli_log_prob_gradient_matches_autograd() -> None:
    g = generator(5)
    x = torch.bernoulli(torch.full((3, 5), 0.5, dtype=torch.float64), generator=g)
    observed = torch.bernoulli(torch.full((3, 5), 0.6, dtype=torch.float64), generator=g)
    logits = torch.randn(4, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    x.requires_grad_(True)

    assert torch.autograd.gradcheck(lambda a, b: bernoulli_log_prob(a, b, observed), (x, logits))


def test_log_weights_over_observed_pixels_by_hand(make_tiny_model) -> None:
    """The encoder sees x with missing pixels zeroed; p(x|z) counts observed pixels only."""
    model = make_tiny_model(layers=1)
    x = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    observed = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)

    log_w = model.log_weights(x, 3, generator(4), observed=observed)  # [K, 1]

    x_seen = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    mu, logvar = model.encoders[0].net(x_seen).chunk(2, dim=-1)
    eps = torch.randn((3, 1, 2), generator=generator(4), dtype=torch.float64)
    z = mu + torch.exp(0.5 * logvar) * eps  # [K, 1, d]
    log_q = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    log_prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
    pixels = Bernoulli(logits=model.decoders[0](z)).log_prob(x.expand(3, 1, 6))  # [K, 1, D]
    log_lik = pixels[..., [1, 2, 4, 5]].sum(-1)
    torch.testing.assert_close(log_w, log_prior + log_lik - log_q, rtol=0, atol=1e-10)


def test_missing_pixel_values_do_not_matter(model64, x_binary: torch.Tensor) -> None:
    observed = torch.bernoulli(torch.full_like(x_binary, 0.5), generator=generator(2))
    flipped = torch.where(observed.bool(), x_binary, 1 - x_binary)

    a = model64.log_weights(x_binary, 4, generator(0), observed=observed)
    b = model64.log_weights(flipped, 4, generator(0), observed=observed)
    everything = model64.log_weights(x_binary, 4, generator(0), observed=torch.ones_like(x_binary))

    assert torch.equal(a, b)
    torch.testing.assert_close(
        everything, model64.log_weights(x_binary, 4, generator(0)), rtol=0, atol=1e-12
    )


# --- training on incomplete images ------------------------------------------------------------


class MaskRecorder:
    """Wraps `draw_observed` as models.training calls it and keeps every mask it draws."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        mask = draw_observed(*args, **kwargs)
        self.masks.append(mask.clone())
        return mask


@pytest.fixture
def missing_config(train_config: TrainConfig) -> TrainConfig:
    return train_config.with_changes(missing_rate=0.5, missing_pattern="mcar")


def test_training_draws_fresh_masks_every_step_and_epoch(
    missing_config: TrainConfig, synthetic_mnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = MaskRecorder()
    monkeypatch.setattr(models.training, "draw_observed", recorder)

    complete = train(missing_config.with_changes(missing_rate=0.0), synthetic_mnist.train_images)
    assert recorder.masks == []  # complete images draw nothing, as before the option existed
    incomplete = train(missing_config, synthetic_mnist.train_images)

    assert len(recorder.masks) == 8 and all(m.shape == (10, 6) for m in recorder.masks)
    assert len({tuple(m.flatten().tolist()) for m in recorder.masks}) == 8
    name = "decoders.0.4.bias"
    assert not torch.equal(complete.model.state_dict()[name], incomplete.model.state_dict()[name])


@pytest.mark.parametrize("pattern", ["mcar", "top-half"])
def test_resuming_missing_data_training_is_bit_identical(
    missing_config: TrainConfig,
    synthetic_mnist,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pattern: str,
) -> None:
    """Stopped mid-epoch two and resumed from the epoch-one checkpoint: same masks, weights."""
    config = missing_config.with_changes(missing_pattern=pattern)
    images = synthetic_mnist.train_images
    straight_masks, resumed_masks = MaskRecorder(), MaskRecorder()
    monkeypatch.setattr(models.training, "draw_observed", straight_masks)
    straight = train(config, images)
    path = tmp_path / "model.safetensors"
    stop = lambda p: (p.epoch, p.done) == (2, 2)  # noqa: E731
    monkeypatch.setattr(models.training, "draw_observed", resumed_masks)
    assert train(config, images, checkpoint_path=path, callbacks=[stop]).stopped

    resumed = train(config, images, checkpoint_path=path)

    assert resumed.steps == 8
    # 4 + 2 masks before the stop, then epoch two again from its checkpoint: the same 4.
    redone = resumed_masks.masks[6:]
    assert all(torch.equal(a, b) for a, b in zip(redone, straight_masks.masks[4:], strict=True))
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
