"""Health of the service for the ops routes: readiness (storage writable, job store and
broker answering) and the job gauges of /metrics (jobs by status, live workers).

The checks block (disk, network), so they run in the app's own few ops threads
(`app.state.ops_threads`), never queued behind uploads or model calls.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import anyio
from fastapi import Request

from app.deps import SettingsDep, StoreDep
from app.errors import NotReady
from app.schemas import ReadyOut
from app.settings import Settings
from worker.jobs import JobRecord, JobStore, WorkerInfo

log = logging.getLogger(__name__)


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _broker_reachable(url: str) -> bool:
    from kombu import Connection  # Celery's transport, loaded only when a broker is checked

    try:
        with Connection(url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:  # any failure to connect means "not ready", whatever the transport
        return False


def _pings(store: JobStore) -> bool:
    try:
        return bool(store.ping())
    except Exception:  # a store that raises is as unreachable as one that says False
        return False


async def readiness(request: Request, settings: SettingsDep, store: StoreDep) -> ReadyOut:
    """Storage writable, job store and broker answering; `NotReady` (503) otherwise.

    The checks block (disk, network), so they run in the app's own few ops threads: never
    queued behind uploads or model calls.
    """
    limiter = request.app.state.ops_threads
    return await anyio.to_thread.run_sync(_readiness, settings, store, limiter=limiter)


def _readiness(settings: Settings, store: JobStore) -> ReadyOut:
    checks = {
        "storage": _writable(settings.models_dir),
        "job_store": _pings(store),
        "broker": (
            _writable(settings.broker_dir)
            if settings.broker_url is None
            else _broker_reachable(settings.broker_url)
        ),
    }
    failing = [name for name, ok in checks.items() if not ok]
    if failing:
        raise NotReady(f"not ready: {', '.join(failing)} unreachable")
    workers = store.workers()  # one read for both counts: one snapshot, one round trip
    return ReadyOut(
        checks=checks,
        workers=len(_live(settings, workers)),
        gpu_workers=len(_live(settings, workers, settings.queue_for("cuda"))),
    )


def live_workers(settings: Settings, store: JobStore, queue: str | None = None) -> list[WorkerInfo]:
    """Workers that reported within three reaper intervals and consume `queue` (default: the
    training queue; a GPU worker also consumes the CUDA jobs' queue)."""
    return _live(settings, store.workers(), queue)


def _live(
    settings: Settings, workers: list[WorkerInfo], queue: str | None = None
) -> list[WorkerInfo]:
    window = 3 * settings.reaper_interval_s
    queue = queue or settings.queue
    return [w for w in workers if w.seen_s_ago <= window and queue in w.queues]


def waiting_for(settings: Settings, store: JobStore, job: JobRecord) -> str | None:
    """Why a queued job is not picked up: no live worker consumes its queue (a job that asks
    for device 'cuda' waits for a GPU worker); None otherwise."""
    if job.status != "queued":
        return None
    queue = settings.queue_for(job.config.get("device"))
    if live_workers(settings, store, queue):
        return None
    kind = "GPU worker" if queue != settings.queue else "worker"
    return f"no {kind} is up: the job waits on the queue {queue!r} until one starts"


JobGauges = tuple[dict[str, int] | None, list[WorkerInfo] | None]


async def job_gauges(request: Request, settings: SettingsDep, store: StoreDep) -> JobGauges:
    """Jobs by status and the live workers, for /metrics (read in the ops threads); None
    for both while the job store is down."""
    try:
        return await anyio.to_thread.run_sync(
            _job_gauges, settings, store, limiter=request.app.state.ops_threads
        )
    except Exception:  # the request metrics stay useful while the job store is down
        log.warning("job store unreachable; /metrics without job counts", exc_info=True)
        return None, None


def _job_gauges(settings: Settings, store: JobStore) -> JobGauges:
    return store.counts(), live_workers(settings, store)
