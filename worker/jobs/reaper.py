"""The reaper: re-queues jobs whose worker was lost, and sends messages that were lost.

Every worker process runs one in a thread (started when the worker is ready, see
`worker.celery_app`), every `reaper_interval_s`. A job whose lease expired (its worker
stopped heartbeating: SIGKILL, out of memory, machine lost, training hung) is put back in
the queue with its attempts counted, and resumes from its last checkpoint; after
`max_attempts` starts it fails with "worker lost N times (out of memory?)". A queued job is
sent again when its message was never sent (its sender died) or was sent
`resend_queued_s` ago and the job is still not claimed (the message was lost between a
worker's ack and its claim: a SIGKILL, or a store error at the claim).

One clock: the store says a lease expired on its clock, Redis `TIME`, a wall clock that a
step on the Redis host moves at once, while the holder keeps its own deadline on its
monotonic clock (`worker.lease`). So a reaper takes a job back only when, besides, it has
itself seen the lease unchanged for `job_lease_s` on its own monotonic clock (`LeaseWatch`):
by then the holder, which stops writing `job_lease_s` minus a heartbeat after it *sent* its
last renewal, has stopped, whatever either wall clock did. A claim never takes a running
job over (`lifecycle.claim`).

Bound: a worker's last heartbeat renews the lease; a reaper pass sees the renewed lease at
most `reaper_interval_s` later, and takes the job back at its first pass `job_lease_s` after
that. So a lost job is queued again at most `job_lease_s + 2 * reaper_interval_s` after its
worker's last renewal (60 + 2 x 15 = 90 s by default), and starts as soon as a worker is free.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection

from worker.jobs.record import Entry
from worker.jobs.store import JobStore

log = logging.getLogger(__name__)


class LeaseWatch:
    """When this process first saw each running job's current lease (its fence and expiry),
    on its own monotonic clock; see the module docstring."""

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_s = lease_s
        self.clock = clock
        self._seen: dict[str, tuple[tuple[int, float | None], float]] = {}
        self._this_pass: dict[str, tuple[tuple[int, float | None], float]] = {}

    def silent(self, job_id: str, entry: Entry) -> bool:
        """True once this lease was seen unchanged (not renewed) for `lease_s`."""
        lease = (entry.fence, entry.lease_expires)
        seen = self._seen.get(job_id)
        if seen is None or seen[0] != lease:
            seen = (lease, self.clock())
        self._this_pass[job_id] = seen
        return self.clock() - seen[1] >= self.lease_s

    def end_pass(self) -> None:
        """Forget the jobs this pass did not see running."""
        self._seen, self._this_pass = self._this_pass, {}

    def forget(self) -> None:
        """After a failed pass: the store was out of reach, for renewals too."""
        self._seen, self._this_pass = {}, {}


def reap_once(
    store: JobStore,
    enqueue: Callable[[str], None],
    *,
    grace_s: float,
    resend_s: float = float("inf"),
    on_settled: Callable[[str], None] | None = None,
    waiting: Callable[[], Collection[str]] = frozenset,
    watch: LeaseWatch | None = None,
) -> list[str]:
    """One pass: re-queue lost jobs (`on_settled` for those it cancels or fails instead;
    with a `watch`, only leases it saw silent long enough), and send every queued job whose
    message is due and not among `waiting()`, the job ids of the messages in the broker's
    queue. Returns the ids sent.
    """
    requeued = store.reap(on_settled, watch and watch.silent)
    if watch is not None:
        watch.end_pass()
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
        self.watch = LeaseWatch(store.lease_s)
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
                    watch=self.watch,
                )
            except Exception:
                self.watch.forget()
                log.exception("reaper pass failed; retrying in %.0f s", self.interval_s)
            if self.stopped.wait(self.interval_s):
                return

    def stop(self) -> None:
        self.stopped.set()
