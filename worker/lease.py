"""Keeping a claimed job's lease alive from a background thread while it trains."""

from __future__ import annotations

import logging
import threading

from worker.jobs import JobStore, Lease

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews `lease` every `interval_s` while in its `with` block.

    `lost` is set when the store says the job is no longer ours (its lease expired and the
    reaper or another worker took it over); the training callback then stops the run. Failed
    renewals (store unreachable) are logged and retried at the next beat.
    """

    def __init__(self, store: JobStore, lease: Lease, interval_s: float) -> None:
        self.store = store
        self.lease = lease
        self.interval_s = interval_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"iwae-heartbeat-{lease.job_id}", daemon=True
        )

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.store.renew(self.lease):
                    log.error("job %s: lease lost to another worker; stopping", self.lease.job_id)
                    self.lost.set()
                    return
            except Exception:
                log.warning(
                    "job %s: lease renewal failed; retrying", self.lease.job_id, exc_info=True
                )
