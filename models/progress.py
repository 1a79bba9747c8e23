"""Progress events: what every long computation tells its callbacks, in one type.

Training, evaluation, imputation, the gradient SNR, a log-likelihood's chunks and a study's
cells all report a `Progress` whose `phase` names the event, as minGPT's trainer names its
callback events (`on_batch_end`): `done` of `total` units, the unit being the phase's own
(`UNITS`: steps, images, draws, samples or cells), so no field counts different things.

A callback is `Callable[[Progress], bool | None]`. Returning True asks to stop: the
computation ends at that event and says so (`train` returns with `stopped`, `evaluate`,
`imputation_metrics` and `gradient_snr` return None, a study leaves its later cells queued,
`log_likelihood`, which has nothing partial to return, raises `Stopped`). An exception a
callback raises stops the computation too, and reaches its caller (the API's deadline).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

# The phases of one run (`models.run`), in order: what a job's record shows.
RunPhase = Literal["train", "eval", "impute", "snr"]
Phase = Literal[RunPhase, "loglik", "cell"]

# What `done` and `total` count in each phase.
UNITS: dict[Phase, str] = {
    "train": "step",  # optimisation steps of the current epoch
    "eval": "image",  # test images scored
    "impute": "image",  # test images imputed, summed over the K values scored
    "snr": "draw",  # gradient draws
    "loglik": "sample",  # importance samples drawn
    "cell": "cell",  # a study's cells before this one (the event comes as a cell starts)
}


@dataclass(frozen=True)
class Progress:
    """One event: `done` of `total` `UNITS[phase]`.

    `epoch` of `epochs`: during "train" the epoch in progress (from 1), in the phases after
    it the epochs trained. `loss`: the latest training loss, nats. `images_per_s`: the
    throughput, images per second ("snr" and "loglik": draws or samples per second), and
    `eta_s` the seconds left at that rate. `k`: the K of the training epoch in progress.
    """

    phase: Phase
    done: int
    total: int
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    images_per_s: float = 0.0
    eta_s: float | None = None
    k: int | None = None

    @property
    def unit(self) -> str:
        return UNITS[self.phase]


Callback = Callable[[Progress], bool | None]


class Stopped(Exception):
    """A callback asked a computation with no partial result (`log_likelihood`) to stop."""


def notify(callbacks: Sequence[Callback], progress: Progress) -> bool:
    """Hand `progress` to every callback, even after one asks to stop; True if any did."""
    return any([callback(progress) for callback in callbacks])


@dataclass
class PhaseClock:
    """Times one phase from the clock's creation, for its events' rate and time left."""

    phase: Phase
    started: float = field(default_factory=time.perf_counter)

    def event(self, done: int, total: int) -> Progress:
        rate = done / (time.perf_counter() - self.started)
        return Progress(self.phase, done, total, images_per_s=rate, eta_s=(total - done) / rate)


def after_training(callbacks: Sequence[Callback], epochs_done: int, epochs: int) -> list[Callback]:
    """`callbacks` seeing each later phase's events stamped with the epochs trained."""
    return [
        lambda p, callback=callback: callback(
            dataclasses.replace(p, epoch=epochs_done, epochs=epochs)
        )
        for callback in callbacks
    ]
