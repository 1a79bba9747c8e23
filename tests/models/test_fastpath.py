"""Tests for models.fastpath: the hand-written passes against the autograd reference.

With the same generator both paths draw the same noise, so their log-weights, bounds and
gradients agree to rounding: ~1e-15 in float64 on the tiny model (a wrong sign or a missing
term shows as an O(1) relative error), and to fp32 rounding at Burda's width. The objectives
are all covered; the two-layer model and bf16 fall back to the reference, explicitly.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import Tensor

from models.config import OBJECTIVES, ModelConfig, TrainConfig
from models.data import Mnist
from models.estimators import log_likelihood
from models.fastpath import FastPath, _softplus_sums, fast_path
from models.networks import IWAEModel, burda_init
from models.objectives import backward, surrogates
from models.training import train
from tests.models.conftest import TINY_1, TinyModelFactory

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def config(objective: str, model: ModelConfig = TINY_1, k: int = 5) -> TrainConfig:
    options = {"m": 2} if objective in ("miwae", "piwae") else {}
    return TrainConfig(k=k, objective=objective, model=model, **options)


def reference_gradients(
    model: IWAEModel, x: Tensor, cfg: TrainConfig, seed: int, observed: Tensor | None
) -> tuple[Tensor, list[Tensor]]:
    model.zero_grad(set_to_none=True)
    generator = torch.Generator(x.device).manual_seed(seed)
    s = surrogates(model, x, cfg, generator, observed=observed)
    backward(model, s)
    return s.bound, [p.grad.clone() for p in model.parameters()]


def fast_gradients(
    model: IWAEModel, x: Tensor, cfg: TrainConfig, seed: int, observed: Tensor | None
) -> tuple[Tensor, list[Tensor]]:
    model.zero_grad(set_to_none=True)
    generator = torch.Generator(x.device).manual_seed(seed)
    bound = FastPath(model).set_gradients(x, cfg, generator, observed=observed)
    return bound, [p.grad.clone() for p in model.parameters()]


@pytest.fixture
def observed(x_binary: Tensor) -> Tensor:
    """A fixed mask of the 4x6 batch, about a third of the pixels missing: [4, 6]."""
    generator = torch.Generator().manual_seed(2)
    return torch.bernoulli(torch.full_like(x_binary, 0.65), generator=generator)


@pytest.mark.parametrize("masked", [False, True], ids=["complete", "missing"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_bound_and_gradients_equal_the_reference(
    make_tiny_model: TinyModelFactory,
    x_binary: Tensor,
    observed: Tensor,
    objective: str,
    masked: bool,
) -> None:
    model = make_tiny_model(layers=1)
    cfg = config(objective)
    mask = observed if masked else None

    ref_bound, ref_grads = reference_gradients(model, x_binary, cfg, 3, mask)
    bound, grads = fast_gradients(model, x_binary, cfg, 3, mask)

    torch.testing.assert_close(bound, ref_bound, rtol=1e-12, atol=1e-12)
    assert not bound.requires_grad
    for (name, _), got, want in zip(model.named_parameters(), grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("objective", ["iwae", "iwae-dreg", "piwae"])
def test_fp32_at_burdas_width_equals_the_reference_to_rounding(objective: str, device: str) -> None:
    """784-200-200-50 with Burda's initialisation, a third of the pixels missing; on a GPU
    too, where both paths run other kernels (TF32 off, PyTorch's default)."""
    cfg = config(objective, model=ModelConfig(), k=10)
    generator = torch.Generator().manual_seed(0)
    pixel_mean = torch.rand(784, generator=generator)
    x = torch.bernoulli(pixel_mean.expand(8, 784), generator=generator)  # [8, 784]
    observed = torch.bernoulli(torch.full_like(x, 0.65), generator=generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = burda_init(IWAEModel(cfg.model), pixel_mean).to(device)
    x, observed = x.to(device), observed.to(device)

    ref_bound, ref_grads = reference_gradients(model, x, cfg, 4, observed)
    bound, grads = fast_gradients(model, x, cfg, 4, observed)

    torch.testing.assert_close(bound, ref_bound, rtol=1e-5, atol=1e-3)  # ~300 nats
    for (name, _), got, want in zip(model.named_parameters(), grads, ref_grads, strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * scale, msg=name)


def test_gradients_are_set_not_accumulated_into_the_same_buffers(
    make_tiny_model: TinyModelFactory, x_binary: Tensor
) -> None:
    model = make_tiny_model(layers=1)
    fast, cfg = FastPath(model), config("iwae")

    fast.set_gradients(x_binary, cfg, torch.Generator().manual_seed(5))
    first = [p.grad for p in model.parameters()]
    values = [g.clone() for g in first]
    fast.set_gradients(x_binary, cfg, torch.Generator().manual_seed(5))

    for p, buffer, value in zip(model.parameters(), first, values, strict=True):
        assert p.grad is buffer  # a static buffer, as a captured CUDA graph needs
        torch.testing.assert_close(p.grad, value, rtol=0, atol=0)


@pytest.mark.parametrize("block_rows", [4096, 8], ids=["one-block", "blocks-of-2-samples"])
def test_log_weights_equal_the_reference(
    make_tiny_model: TinyModelFactory,
    x_binary: Tensor,
    block_rows: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In one decoder block, and in blocks of 2 samples (4 images) with a shorter last."""
    monkeypatch.setattr("models.fastpath._BLOCK_ROWS", block_rows)
    model = make_tiny_model(layers=1)

    want = model.log_weights(x_binary, 7, torch.Generator().manual_seed(8))
    got = FastPath(model).log_weights(x_binary, 7, torch.Generator().manual_seed(8))

    assert got.shape == (7, 4)
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)


class HiddenType:
    """The model behind the estimator's protocol only: the estimator cannot take the fast
    path for it."""

    def __init__(self, model: IWAEModel) -> None:
        self.log_weights = model.log_weights


def test_log_likelihood_takes_the_fast_path_with_the_same_estimates(
    make_tiny_model: TinyModelFactory, x_binary: Tensor
) -> None:
    model = make_tiny_model(layers=1)

    want = log_likelihood(
        HiddenType(model), x_binary, 60, generator=torch.Generator().manual_seed(9), chunk_size=7
    )
    with mock.patch.object(IWAEModel, "log_weights", side_effect=AssertionError("reference")):
        got = log_likelihood(
            model, x_binary, 60, generator=torch.Generator().manual_seed(9), chunk_size=7
        )

    for name in ("log_px", "std_error", "elbo", "ess", "top_log_w", "pareto_k"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)


def test_two_layers_and_bf16_fall_back_to_the_reference(
    make_tiny_model: TinyModelFactory,
) -> None:
    one, two = make_tiny_model(layers=1), make_tiny_model(layers=2)

    assert isinstance(fast_path(one, config("iwae")), FastPath)
    assert fast_path(two) is None
    assert fast_path(one, config("iwae").with_changes(precision="tf32")) is not None
    assert fast_path(one, config("iwae").with_changes(precision="bf16")) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast_path(one) is None
    with pytest.raises(ValueError, match="one-layer"):
        FastPath(two)


@pytest.mark.parametrize(
    "changes",
    [{}, {"objective": "iwae-dreg", "missing_rate": 0.3}],
    ids=["iwae", "dreg-missing"],
)
def test_training_on_the_fast_path_follows_the_reference_path(
    train_config: TrainConfig, synthetic_mnist: Mnist, changes: dict
) -> None:
    """Two epochs of 4 Adam steps in fp32: the same weights to fp32 rounding."""
    cfg = train_config.with_changes(**changes)
    with mock.patch("models.training.fast_path", return_value=None):
        reference = train(cfg, synthetic_mnist.train_images).model
    with mock.patch("models.training.surrogates", side_effect=AssertionError("reference")):
        fast = train(cfg, synthetic_mnist.train_images).model

    for (name, want), got in zip(
        reference.state_dict().items(), fast.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("width", [784, 13], ids=["mnist", "prime-width"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_sums_match_softplus_for_extreme_logits(width: int, dtype: torch.dtype) -> None:
    """Logits from -200 to 200 (sigmoid(|l|) rounds to 1 beyond ~17 in fp32) and near 0."""
    generator = torch.Generator().manual_seed(6)
    logits = (torch.rand(64, width, generator=generator, dtype=torch.float64) - 0.5) * 400
    logits[::4] *= 1e-3
    logits[1::4] -= 150
    exact = torch.nn.functional.softplus(logits).sum(-1)  # float64

    got = _softplus_sums(logits.to(dtype), torch.empty(64, width, dtype=dtype), None)

    rtol = 1e-6 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(got.double(), exact, rtol=rtol, atol=1e-9)
