"""Tests for models.curve: when points are due, what a point is, and a resumed run's curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.config import ModelConfig
from models.curve import CurveRecorder, CurveSpec, curve_point, read_curve
from models.estimators import log_likelihood
from models.networks import IWAEModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model() -> IWAEModel:
    torch.manual_seed(0)
    return IWAEModel(ModelConfig(x_dim=6, hidden_dim=5, latent_dim=2))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.bernoulli(torch.full((8, 6), 0.4), generator=torch.Generator().manual_seed(1))


def test_points_come_after_the_first_epoch_every_few_and_the_last() -> None:
    spec = CurveSpec(every=5, size=10, k=3)
    assert [e for e in range(1, 13) if spec.due(e, 12)] == [1, 5, 10, 12]
    for bad in ({"every": 0}, {"size": 1}, {"k": 0}):
        with pytest.raises(ValueError, match="learning curve"):
            CurveSpec(**bad)


def test_a_point_is_the_iwae_bound_with_its_standard_error_over_images(
    model: IWAEModel, x: torch.Tensor
) -> None:
    point = curve_point(model, x, k=7, seed=3)

    log_px = log_likelihood(model, x, 7, generator=torch.Generator().manual_seed(3)).log_px
    assert point["test_bound"] == pytest.approx(float(log_px.mean()))
    assert point["std_error"] == pytest.approx(float(log_px.std() / len(x) ** 0.5))
    assert (point["k"], point["images"]) == (7, 8)
    # The same draws at every point: the curve moves only when the model does.
    assert curve_point(model, x, k=7, seed=3) == point


def test_a_resumed_run_replaces_the_points_after_its_checkpoint(
    tmp_path: Path, model: IWAEModel, x: torch.Tensor
) -> None:
    path = tmp_path / "curve.json"
    spec = CurveSpec(every=2, size=8, k=2)
    first = CurveRecorder(spec, x, 0, path)
    for epoch in (1, 2, 3, 4):
        first(model, epoch, 6)
    assert [p["epoch"] for p in read_curve(path)] == [1, 2, 4]

    with torch.no_grad():  # the run resumed from its epoch-2 checkpoint trains differently
        next(model.parameters()).add_(0.5)
    resumed = CurveRecorder(spec, x, 0, path)
    for epoch in (3, 4, 5, 6):
        resumed(model, epoch, 6)

    points = json.loads(path.read_text())
    assert [p["epoch"] for p in points] == [1, 2, 4, 6]
    assert points[2]["test_bound"] != first.points[2]["test_bound"]
    assert read_curve(tmp_path / "none.json") == []
