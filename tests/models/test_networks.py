"""Tests for models.networks: shapes, dtypes, seeding and the stop-gradient option."""

from __future__ import annotations

import torch

from models.networks import IWAEModel


def test_float64_model_computes_in_float64(model64: IWAEModel, x_binary: torch.Tensor) -> None:
    """A model converted with .double() must run, and keep float64, on every path."""
    log_w = model64.log_weights(x_binary, 3, torch.Generator().manual_seed(0))  # [K, B]
    assert log_w.dtype == torch.float64
    assert model64.reconstruct(x_binary).dtype == torch.float64
    assert model64.sample(2, torch.Generator().manual_seed(0)).dtype == torch.float64
    means = model64.posterior_means(x_binary, k=3, generator=torch.Generator().manual_seed(0))
    assert all(m.dtype == torch.float64 for m in means)
