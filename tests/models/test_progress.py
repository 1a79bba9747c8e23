"""The one progress event type: every phase has a unit, every callback sees every event,
and a callback's True stops each computation the way `models.progress` says."""

from __future__ import annotations

import typing

import pytest
import torch

from models.estimators import log_likelihood
from models.progress import UNITS, Phase, Progress, Stopped, after_training, notify
from tests.models.test_estimators import F64, Replay


def test_every_phase_names_its_unit() -> None:
    assert set(UNITS) == set(typing.get_args(Phase))
    assert Progress("snr", 3, 10).unit == "draw"


def test_every_callback_sees_the_event_even_after_one_asks_to_stop() -> None:
    seen: list[str] = []
    progress = Progress("eval", 1, 2)

    stop = notify([lambda p: seen.append("a") or True, lambda p: seen.append("b")], progress)

    assert stop is True and seen == ["a", "b"]
    assert notify([lambda p: None], progress) is False


def test_after_training_stamps_the_epochs_trained() -> None:
    seen: list[Progress] = []
    [stamped] = after_training([seen.append], 3, 5)

    stamped(Progress("snr", 4, 10, images_per_s=2.0))

    assert seen == [Progress("snr", 4, 10, epoch=3, epochs=5, images_per_s=2.0)]


def test_a_callback_that_returns_true_stops_log_likelihood_with_stopped() -> None:
    replay = Replay(torch.zeros(30, 2, dtype=F64))
    with pytest.raises(Stopped):
        log_likelihood(
            replay, torch.zeros(2, 4, dtype=F64), 30, chunk_size=7, callbacks=[lambda p: True]
        )
    assert replay.requests == [7]
