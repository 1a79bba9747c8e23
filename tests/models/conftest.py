"""Fixtures for the model tests: tiny models and configs, a binary batch, synthetic and real data.

float64 makes the oracles in these tests exact to ~1e-12 instead of ~1e-6. The training tests
use float32, as `models.training` does, on synthetic 6-pixel images; the one test on real
MNIST reads it from IWAE_DATA_DIR or ../shared/data/mnist and skips without it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from models.config import ModelConfig, TrainConfig
from models.data import Mnist, load_mnist
from models.networks import IWAEModel
from tests.support import require_mnist

TINY_1 = ModelConfig(layers=1, latent_dim=2, hidden_dim=8, x_dim=6)
TINY_2 = ModelConfig(layers=2, latent_dim=2, hidden_dim=4, x_dim=6)
TINY_CONFIGS = {1: TINY_1, 2: TINY_2}

TinyModelFactory = Callable[..., IWAEModel]


def build_tiny_model(
    layers: int = 1, seed: int = 0, dtype: torch.dtype = torch.float64
) -> IWAEModel:
    """A randomly initialised tiny model (6 pixels, 2 latent units), weights drawn from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IWAEModel(TINY_CONFIGS[layers]).to(dtype)


@pytest.fixture
def make_tiny_model() -> TinyModelFactory:
    """`make_tiny_model(layers=1, seed=0, dtype=torch.float64)`: a fresh tiny model."""
    return build_tiny_model


@pytest.fixture(params=[1, 2], ids=["layers1", "layers2"])
def model64(request: pytest.FixtureRequest) -> IWAEModel:
    """A tiny float64 model with one or two stochastic layers."""
    return build_tiny_model(request.param)


@pytest.fixture
def x_binary() -> torch.Tensor:
    """A fixed batch of 4 binary images of 6 pixels, float64: [4, 6]."""
    generator = torch.Generator().manual_seed(1)
    return torch.bernoulli(torch.full((4, 6), 0.5, dtype=torch.float64), generator=generator)


@pytest.fixture
def train_config() -> TrainConfig:
    """Two epochs of 4 steps (40 images, batch 10) on the 6-pixel model, CPU, no evaluation."""
    return TrainConfig(
        k=3,
        epochs=2,
        batch_size=10,
        model=TINY_1,
        eval_size=0,
        eval_k=20,
        seed=7,
        device="cpu",
    )


@pytest.fixture
def synthetic_mnist() -> Mnist:
    """An `Mnist` of 40 training and 10 test images of 6 grey levels in [0, 1]."""
    generator = torch.Generator().manual_seed(3)
    return Mnist(
        train_images=torch.rand(40, 6, generator=generator),
        train_labels=torch.zeros(40, dtype=torch.int64),
        test_images=torch.rand(10, 6, generator=generator),
        test_labels=torch.zeros(10, dtype=torch.int64),
    )


@pytest.fixture(scope="session")
def real_mnist_data() -> Mnist:
    """The real MNIST split; skips the test when the files are not there."""
    return load_mnist(require_mnist())
