"""The reaper: re-queues jobs whose worker was lost, and sends messages that were lost.

Every worker process runs one in a thread (started when the worker is ready, see
`worker.celery_app`), every `reaper_interval_s`. A job whose lease expired (its worker
stopped heartbeating: SIGKILL, out of memory, machine lost, training hung) is put back in
the queue with its attempts counted, and resumes from its last checkpoint; after
`max_attempts` starts it fails with "worker lost N times (out of memory?)". A queued job is
sent again when its message was never sent (its sender died) or was sent
`resend_queued_s` ago and the job is still not claimed (the message was lost between a
worker's ack and its claim: a SIGKILL, or a store error at the claim).

Bound: a worker's last heartbeat renews the lease for `job_lease_s`; the next reaper pass of
any live worker comes at most `reaper_interval_s` after the lease expires. So a lost job is
queued again at most `job_lease_s + reaper_interval_s` after its worker died (60 + 15 = 75 s
by default), and starts as soon as a worker is free.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection

from worker.jobs.store import JobStore

log = logging.getLogger(__name__)


def reap_once(
    store: JobStore,
    enqueue: Callable[[str], None],
    *,
    grace_s: float,
    resend_s: float = float("inf"),
    on_settled: Callable[[str], None] | None = None,
    waiting: Callable[[], Collection[str]] = frozenset,
) -> list[str]:
    """One pass: re-queue lost jobs (`on_settled` for those it cancels or fails instead),
    and send every queued job whose message is due and not among `waiting()`, the job ids
    of the messages in the broker's queue. Returns the ids sent.
    """
    requeued = store.reap(on_settled)
    for job_id in requeued:
        log.warning("job %s lost its worker (lease expired); queued again", job_id)
    # A message taken by a worker between this read and its claim is sent once more at
    # worst: harmless, the store refuses the second claim.
    in_queue = waiting()
    due = store.take_due(older_than_s=grace_s, resend_after_s=resend_s, waiting=in_queue)
    for job_id in due:
        if job_id not in requeued:
            log.warning("job %s queued but not claimed; sending its message again", job_id)
    sent = list(dict.fromkeys(requeued + due))
    for job_id in sent:
        enqueue(job_id)
    return sent


class ReaperThread(threading.Thread):
    """Calls `report` (the worker is alive) and `reap_once` at once and then every
    `interval_s`, until stopped.
    """

    def __init__(
        self,
        store: JobStore,
        enqueue: Callable[[str], None],
        *,
        interval_s: float,
        resend_s: float,
        report: Callable[[], None] = lambda: None,
        on_settled: Callable[[str], None] | None = None,
        waiting: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        super().__init__(name="iwae-reaper", daemon=True)
        self.store = store
        self.enqueue = enqueue
        self.interval_s = interval_s
        self.resend_s = resend_s
        self.report = report
        self.on_settled = on_settled
        self.waiting = waiting
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.report()  # this worker is alive (readiness, metrics)
                reap_once(
                    self.store,
                    self.enqueue,
                    grace_s=self.interval_s,
                    resend_s=self.resend_s,
                    on_settled=self.on_settled,
                    waiting=self.waiting,
                )
            except Exception:
                log.exception("reaper pass failed; retrying in %.0f s", self.interval_s)
            if self.stopped.wait(self.interval_s):
                return

    def stop(self) -> None:
        self.stopped.set()
