"""Readiness and the job gauges (app.health), against a job store that says what the test
wants: each check named when it fails, and only live workers of the training queue counted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from app.errors import NotReady
from app.health import job_gauges, live_workers, readiness
from app.schemas import ReadyOut
from worker.jobs import WorkerInfo


class Store:
    """The part of `JobStore` the health checks read."""

    def __init__(self, ping: object = True, workers: list[WorkerInfo] | None = None) -> None:
        self._ping = ping
        self._workers = workers or []
        self.job_counts: dict[str, int] | Exception = {"queued": 2, "running": 1}

    def ping(self) -> bool:
        if isinstance(self._ping, Exception):
            raise self._ping
        return bool(self._ping)

    def workers(self) -> list[WorkerInfo]:
        return self._workers

    def counts(self) -> dict[str, int]:
        if isinstance(self.job_counts, Exception):
            raise self.job_counts
        return self.job_counts


def request() -> Any:
    """What the checks use of a request: the app's ops threads."""
    return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(ops_threads=None)))


def ready(settings: Any, store: Store) -> ReadyOut:
    return anyio.run(readiness, request(), settings, store)


def worker(
    name: str, seen_s_ago: float, queues: tuple[str, ...] = ("iwae.training",)
) -> WorkerInfo:
    return WorkerInfo(name=name, queues=list(queues), seen_s_ago=seen_s_ago)


def test_ready_with_every_check_passing(make_settings: Callable[..., Any]) -> None:
    answer = ready(make_settings(), Store())
    assert answer.checks == {"storage": True, "job_store": True, "broker": True}
    assert answer.workers == 0


@pytest.mark.parametrize("ping", [False, ConnectionError("down")])
def test_a_job_store_that_fails_its_ping_is_not_ready(
    make_settings: Callable[..., Any], ping: object
) -> None:
    with pytest.raises(NotReady, match=r"^not ready: job_store unreachable$"):
        ready(make_settings(), Store(ping=ping))


def test_unwritable_storage_and_broker_folder_are_named(
    make_settings: Callable[..., Any], home: Path
) -> None:
    home.mkdir(parents=True)
    (home / "models").write_text("a file where the folder should be")
    (home / "broker").write_text("likewise")
    with pytest.raises(NotReady, match=r"^not ready: storage, broker unreachable$"):
        ready(make_settings(), Store())


def test_live_workers_reported_within_three_reaper_intervals_on_the_queue(
    make_settings: Callable[..., Any],
) -> None:
    settings = make_settings(reaper_interval_s=10.0)
    workers = [
        worker("fresh", 0.0),
        worker("edge", 30.0),
        worker("stale", 30.5),
        worker("elsewhere", 1.0, ("other",)),
        worker("both", 1.0, ("iwae.training.cuda", "iwae.training")),
    ]
    live = live_workers(settings, Store(workers=workers))
    assert [w.name for w in live] == ["fresh", "edge", "both"]
    assert ready(settings, Store(workers=workers)).workers == 3


def test_job_gauges_are_the_counts_and_live_workers(make_settings: Callable[..., Any]) -> None:
    store = Store(workers=[worker("fresh", 0.0), worker("stale", 1e6)])
    counts, workers = anyio.run(job_gauges, request(), make_settings(), store)
    assert counts == {"queued": 2, "running": 1}
    assert [w.name for w in workers or []] == ["fresh"]


def test_job_gauges_are_unknown_while_the_store_is_down(make_settings: Callable[..., Any]) -> None:
    store = Store()
    store.job_counts = ConnectionError("down")
    assert anyio.run(job_gauges, request(), make_settings(), store) == (None, None)
