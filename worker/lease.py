"""Keeping a claimed job's lease while it trains, and fencing the files it writes.

The heartbeat thread renews the lease every `heartbeat_interval_s`, but only while training
progresses: a run that reports no step for `job_stall_s` (a hung fsync on NFS, a hung CUDA
kernel) stops renewing, so its lease expires and the reaper takes the job back (or cancels
it, when that was asked). Each renewal also brings back the cancel flag, so the training
loop never asks the store anything. A `Watchdog` then ends the whole process, so that its
supervisor (compose's restart policy, `iwae serve`) starts a fresh worker instead of one
whose reaper thread keeps reporting it alive while its training thread is stuck for good.

Fencing: the lease surely holds until `deadline`, the local monotonic time at which the last
successful renewal was *sent* plus `job_lease_s`, minus one heartbeat of margin; the store's
lease (on the store's clock) cannot expire before it. `fence(path)`, called just before a
file of the job replaces its previous version, returns when the lease surely holds. Past the
deadline (the process was paused, or the store was unreachable) it renews first, retrying
through a store outage for up to `job_stall_s`, and raises `LeaseLost` when the job is no
longer this worker's. A worker paused past its lease therefore writes nothing once resumed,
unless the pause falls between the check and the rename that follows it (microseconds).
"""

from __future__ import annotations

import faulthandler
import logging
import sys
import threading
import time
from pathlib import Path

from worker.jobs import Heartbeat, JobStore, Lease
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """The job is no longer this worker's (or cannot be shown to be): write nothing more."""


class Watchdog:
    """Ends this process unless fed in time, after writing every thread's stack to stderr.

    It is faulthandler's timer, a C thread: it fires even when the stuck call holds the GIL
    (the heartbeat thread, which feeds it, is then stuck too). One per process: a worker runs
    one job at a time. The exit status is 1.
    """

    def feed(self, timeout_s: float) -> None:
        """Fire `timeout_s` from now unless fed again before."""
        # sys.__stderr__: Celery replaces sys.stderr with a logging proxy, without a fileno.
        faulthandler.dump_traceback_later(max(timeout_s, 0.001), exit=True, file=sys.__stderr__)

    def stop(self) -> None:
        faulthandler.cancel_dump_traceback_later()


class LeaseKeeper:
    """Renews `lease` from a thread while in its `with` block; see the module docstring.

    Events the training callback reads: `lost` (the job went to another worker or was
    settled by the reaper), `cancel` (a cancel was requested), `overtime` (the job's attempts
    together ran past `max_job_seconds`). With a `watchdog`, the process ends once training
    made no progress for `job_stall_s` plus one heartbeat.
    """

    def __init__(
        self,
        store: JobStore,
        lease: Lease,
        settings: WorkerSettings,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.store = store
        self.watchdog = watchdog
        self.lease = lease
        self.interval_s = settings.heartbeat_interval_s
        self.lease_s = settings.job_lease_s
        self.stall_s = settings.job_stall_s
        self.max_seconds = settings.max_job_seconds
        self.lost = threading.Event()
        self.cancel = threading.Event()
        self.overtime = threading.Event()
        self._lock = threading.Lock()
        self._started = self._last_progress = time.monotonic()
        self.deadline = self._started + self.lease_s - self.interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"iwae-heartbeat-{lease.job_id}", daemon=True
        )

    def __enter__(self) -> LeaseKeeper:
        self._feed_watchdog(self._started)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.watchdog is not None:
            self.watchdog.stop()

    def _feed_watchdog(self, now: float) -> None:
        """Due when no progress was seen for a stall and one heartbeat, whether or not this
        thread still runs then."""
        if self.watchdog is not None:
            self.watchdog.feed(self._last_progress + self.stall_s + self.interval_s - now)

    def progressed(self) -> None:
        """Training made a step: the heartbeat may go on renewing."""
        self._last_progress = time.monotonic()

    @property
    def should_stop(self) -> bool:
        return self.lost.is_set() or self.cancel.is_set() or self.overtime.is_set()

    def fence(self, path: Path) -> None:
        """Return once the lease surely holds, so that `path` may be written; else raise."""
        give_up = time.monotonic() + self.stall_s
        while not self.lost.is_set():
            if time.monotonic() < self.deadline:
                log.info("job %s: fence %d writes %s", self.lease.job_id, self.lease.fence, path)
                return
            if self.beat() is None and (
                time.monotonic() > give_up or self._stop.wait(self.interval_s)
            ):
                break
        raise LeaseLost(f"job {self.lease.job_id}: lease lost, not writing {path.name}")

    def beat(self) -> Heartbeat | None:
        """Renew once; None when the store cannot be reached."""
        sent = time.monotonic()
        try:
            beat = self.store.renew(self.lease)
        except Exception:
            log.warning("job %s: lease renewal failed; retrying", self.lease.job_id, exc_info=True)
            return None
        if beat == "lost":
            log.error("job %s: lease lost; stopping, writing nothing more", self.lease.job_id)
            self.lost.set()
        else:
            with self._lock:
                self.deadline = max(self.deadline, sent + self.lease_s - self.interval_s)
            if beat == "cancel":
                self.cancel.set()
        return beat

    def _run(self) -> None:
        stalled = False
        while not self._stop.wait(self.interval_s) and not self.lost.is_set():
            now = time.monotonic()
            ran_s = self.lease.ran_s + now - self._started
            if self.max_seconds is not None and ran_s > self.max_seconds:
                self.overtime.set()
            was_stalled, stalled = stalled, now - self._last_progress > self.stall_s
            if stalled and not was_stalled:
                log.error(
                    "job %s: no training progress for %.0f s; not renewing its lease",
                    self.lease.job_id,
                    self.stall_s,
                )
            if not stalled:
                self._feed_watchdog(now)
                self.beat()
