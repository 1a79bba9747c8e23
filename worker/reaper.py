"""The reaper: re-queues jobs whose worker was lost, and messages that were never sent.

Every worker process runs one in a thread (started when the worker is ready, see
`worker.celery_app`), every `reaper_interval_s`; the API may call `reap_once` too. A job whose
lease expired (its worker stopped heartbeating: SIGKILL, out of memory, machine lost) is put
back in the queue with its attempts counted, and resumes from its last checkpoint; after
`max_attempts` starts it fails with "worker lost N times (out of memory?)".

Bound: a worker's last heartbeat renews the lease for `job_lease_s`; the next reaper pass of
any live worker comes at most `reaper_interval_s` after the lease expires. So a lost job is
queued again at most `job_lease_s + reaper_interval_s` after its worker died (60 + 15 = 75 s
by default), and starts as soon as a worker is free. If no worker survives, the first one
to start reaps at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from worker.celery_app import IwaeCelery
from worker.jobs import JobStore

log = logging.getLogger(__name__)

_reapers: list[ReaperThread] = []


def reap_once(store: JobStore, enqueue: Callable[[str], None], *, grace_s: float) -> list[str]:
    """One pass: re-queue lost jobs, and send every queued job still awaiting its message
    after `grace_s` (its sender died between creating and enqueuing it). Returns the ids sent.
    """
    requeued = store.reap()
    for job_id in requeued:
        log.warning("job %s lost its worker (lease expired); queued again", job_id)
    unsent = store.awaiting_message(older_than_s=grace_s)
    for job_id in unsent:
        if job_id not in requeued:
            log.warning("job %s was never sent to a worker; sending it", job_id)
    sent = list(dict.fromkeys(requeued + unsent))
    for job_id in sent:
        enqueue(job_id)
    return sent


class ReaperThread(threading.Thread):
    """Calls `reap_once` at once and then every `reaper_interval_s`, until stopped."""

    def __init__(self, app: IwaeCelery) -> None:
        super().__init__(name="iwae-reaper", daemon=True)
        self.app = app
        self.stopped = threading.Event()

    def run(self) -> None:
        from worker.queue import send_training

        settings = self.app.settings
        while True:
            try:
                reap_once(
                    self.app.job_store,
                    lambda job_id: send_training(self.app, job_id),
                    grace_s=settings.reaper_interval_s,
                )
            except Exception:
                log.exception("reaper pass failed; retrying in %.0f s", settings.reaper_interval_s)
            if self.stopped.wait(settings.reaper_interval_s):
                return

    def stop(self) -> None:
        self.stopped.set()


def start_reaper(app: IwaeCelery) -> ReaperThread:
    reaper = ReaperThread(app)
    reaper.start()
    _reapers.append(reaper)
    log.info(
        "reaper started: every %.0f s; lost jobs are queued again within %.0f s",
        app.settings.reaper_interval_s,
        app.settings.recovery_bound_s,
    )
    return reaper


def stop_reapers() -> None:
    while _reapers:
        _reapers.pop().stop()
