"""The job store: the record of every training job, read by the API and written by workers.

`JobStore` turns each lifecycle rule (`worker.jobs.lifecycle`) into an operation. A backend
provides only storage: an atomic read-modify-write of one entry on its own clock
(`_update`), an insert bounded by the number of active jobs, listing and counting.
`RedisJobStore` (distributed mode) and `FileJobStore` (embedded mode) are the two;
`open_job_store(settings)` picks one.

Jobs are not lost, without relying on the broker's redelivery: a worker *claims* a job
before training it, which atomically marks it running under a *lease* that its heartbeat
renews every `heartbeat_interval_s`. A worker that dies (or hangs: the heartbeat renews only
while training progresses) stops renewing; once the lease has expired (`job_lease_s`), the
reaper of any live worker (every `reaper_interval_s`) puts the job back in the queue, and it
resumes from its last checkpoint. A queued job whose message was lost (its sender died, or a
worker died or failed between taking the message and claiming the job) is sent again.

A study is a grid of such jobs: its record (the cells' job ids) is stored in the same insert
as its jobs, and everything else about it is read from them (`worker.jobs.studies`).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from models.status import Outcome
from worker.jobs import lifecycle
from worker.jobs.record import (
    ClaimRefused,
    Entry,
    Heartbeat,
    Instant,
    JobAlreadyFinished,
    JobNotFound,
    JobRecord,
    JobStatus,
    Lease,
    StudyCell,
    StudyNotFound,
    StudyRecord,
    WorkerInfo,
)
from worker.jobs.studies import StudyView

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass
class Insert:
    """What one atomic insert stores: new job entries, and the study they are cells of."""

    entries: list[Entry]
    study: StudyRecord | None = None


@dataclass(frozen=True)
class GridPoint:
    """A cell of a study to create: its grid point and its job's config."""

    objective: str
    k: int
    seed: int
    config: dict[str, Any] = field(repr=False)


def newest_first(
    items: Sequence[T], created: Callable[[T], datetime], *, limit: int, cursor: str | None
) -> tuple[list[T], str | None]:
    """A page of `items` (any order): up to `limit` created before `cursor`, newest first,
    and the next page's cursor (the last one's creation time; None on the last page).
    """
    top = float(cursor) if cursor is not None else float("inf")
    older = sorted(
        (item for item in items if created(item).timestamp() < top), key=created, reverse=True
    )
    if len(older) <= limit:
        return older, None
    return older[:limit], repr(created(older[limit - 1]).timestamp())


class JobStore(abc.ABC):
    """Every method is safe to call from several processes at once."""

    def __init__(
        self,
        *,
        lease_s: float,
        max_attempts: int,
        max_active_jobs: int | None = None,
        retention_s: float | None = None,
    ) -> None:
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.max_active_jobs = max_active_jobs
        self.retention_s = retention_s

    # --- storage, provided by each backend ----------------------------------------------

    @abc.abstractmethod
    def _insert(self, make: Callable[[Instant, int], Insert]) -> Insert:
        """Store what `make(now, active)` returns, given the store's time and the number of
        queued and running jobs, read atomically with the insert (`make` may raise). A study
        is stored before its jobs, so a crash in between leaves cells without a job (shown
        as "missing"), never jobs of an unknown study.
        """

    @abc.abstractmethod
    def _read(self, job_id: str) -> Entry:
        """The entry; raises `JobNotFound`."""

    @abc.abstractmethod
    def _read_many(self, job_ids: Sequence[str]) -> list[Entry | None]:
        """The entries, None for each id with none."""

    @abc.abstractmethod
    def _read_study(self, study_id: str) -> StudyRecord:
        """The study; raises `StudyNotFound`."""

    @abc.abstractmethod
    def _update(self, job_id: str, change: Callable[[Entry, Instant], T]) -> T:
        """Atomically: read the entry, call `change` on it with the store's time, and write
        it back if it changed (and `change` did not raise). Returns what `change` returned.
        """

    @abc.abstractmethod
    def _active_ids(self) -> list[str]:
        """Ids of the queued and running jobs (a superset is fine)."""

    @abc.abstractmethod
    def _page(
        self, *, limit: int, cursor: str | None, status: JobStatus | None
    ) -> tuple[list[JobRecord], str | None]:
        """`page` over every job."""

    @abc.abstractmethod
    def study_page(
        self, *, limit: int, cursor: str | None = None
    ) -> tuple[list[StudyRecord], str | None]:
        """Up to `limit` studies, newest first, older than `cursor`, as `page` does jobs."""

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """Jobs by status, read without scanning the history."""

    @abc.abstractmethod
    def report_worker(self, name: str, queues: list[str], outcome: str | None = None) -> None:
        """A worker is alive and consumes `queues`; `outcome` counts one handled message."""

    @abc.abstractmethod
    def workers(self) -> list[WorkerInfo]:
        """Every worker that reported itself, most recently seen first."""

    @abc.abstractmethod
    def ping(self) -> bool:
        """True when the store can be read and written."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""

    # --- API side -----------------------------------------------------------------------

    def create(self, config: dict[str, Any]) -> JobRecord:
        """A new queued job (its id is also its future model id), its message not yet sent;
        `TooManyJobs` when `max_active_jobs` are queued or running.

        The caller then sends the message (`worker.queue.enqueue_training`); if it dies in
        between, the reaper sends it.
        """
        job_id = uuid.uuid4().hex

        def make(now: Instant, active: int) -> Insert:
            lifecycle.admit(active, self.max_active_jobs)
            return Insert([lifecycle.new_entry(job_id, config, now)])

        return self._insert(make).entries[0].record

    def create_study(self, config: dict[str, Any], cells: Sequence[GridPoint]) -> StudyRecord:
        """A new study and one queued job per cell, stored at once; `TooManyJobs` (and
        nothing stored) when the cells would take more than `max_active_jobs` active jobs.
        The caller then sends the jobs' messages, as after `create`.
        """
        study_id = uuid.uuid4().hex
        job_ids = [uuid.uuid4().hex for _ in cells]

        def make(now: Instant, active: int) -> Insert:
            lifecycle.admit(active, self.max_active_jobs, len(cells))
            study = StudyRecord(
                study_id=study_id,
                config=config,
                cells=[
                    StudyCell(objective=c.objective, k=c.k, seed=c.seed, job_id=job_id)
                    for c, job_id in zip(cells, job_ids, strict=True)
                ],
                created_at=now.wall,
            )
            entries = [
                lifecycle.new_entry(job_id, c.config, now.plus_us(i), study_id)
                for i, (c, job_id) in enumerate(zip(cells, job_ids, strict=True))
            ]
            return Insert(entries, study)

        study = self._insert(make).study
        assert study is not None
        return study

    def get(self, job_id: str) -> JobRecord:
        return self._read(job_id).record

    def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """The jobs' records in order, None for an id with none (never created, or deleted
        after `retention_s`)."""
        return [None if e is None else e.record for e in self._read_many(job_ids)]

    def study(self, study_id: str) -> StudyView:
        """The study and its cells' job records; `StudyNotFound` for an unknown id."""
        return self.view(self._read_study(study_id))

    def view(self, study: StudyRecord) -> StudyView:
        """`study` with its cells' job records, read now."""
        return StudyView(study, self.get_many([cell.job_id for cell in study.cells]))

    def page(
        self,
        *,
        limit: int,
        cursor: str | None = None,
        status: JobStatus | None = None,
        study_id: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """Up to `limit` jobs, newest first, older than `cursor` (from the previous page),
        in `status` and of the study `study_id` if given (none for an unknown study);
        returns them and the next page's cursor (None on the last page).
        """
        if study_id is None:
            return self._page(limit=limit, cursor=cursor, status=status)
        try:
            records = self.study(study_id).records
        except StudyNotFound:
            return [], None
        found = [r for r in records if r is not None and status in (None, r.status)]
        return newest_first(found, lambda r: r.created_at, limit=limit, cursor=cursor)

    def list(self) -> list[JobRecord]:
        """Every job, newest first (for tests and small stores; the API pages)."""
        records: list[JobRecord] = []
        cursor = None
        while True:
            page, cursor = self.page(limit=500, cursor=cursor)
            records += page
            if cursor is None:
                return records

    def cancel_study(self, study_id: str) -> StudyView:
        """Cancel every unfinished cell of the study (`request_cancel`); the study after."""
        for record in self.study(study_id).records:
            if record is not None and not record.finished:
                with contextlib.suppress(JobAlreadyFinished):  # it ended in the meantime
                    self.request_cancel(record.job_id)
        return self.study(study_id)

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job now, or ask a running one to stop. Raises
        `JobAlreadyFinished` for a succeeded or failed job, `JobNotFound` for an unknown id.
        """

        def cancel(entry: Entry, now: Instant) -> JobRecord:
            lifecycle.request_cancel(entry, now)
            return entry.record

        return self._update(job_id, cancel)

    # --- worker side --------------------------------------------------------------------

    def claim(self, job_id: str, worker: str) -> Lease:
        """Start the job under a new lease, if it is queued. Counts an attempt. Raises
        `ClaimRefused` (drop the message) or `JobNotFound`.
        """

        def change(entry: Entry, now: Instant) -> tuple[str, Entry]:
            outcome = lifecycle.claim(entry, worker, now, lease_s=self.lease_s)
            return outcome, entry

        outcome, entry = self._update(job_id, change)
        if outcome != "claimed":
            raise ClaimRefused(job_id, outcome)
        return Lease(job_id=job_id, fence=entry.fence, record=entry.record, ran_s=entry.ran_s)

    def renew(self, lease: Lease) -> Heartbeat:
        """Extend the lease: "held", "cancel" (held, and a cancel was requested) or "lost"."""
        return self._update(
            lease.job_id,
            lambda entry, now: lifecycle.renew(entry, lease.fence, now, lease_s=self.lease_s),
        )

    def update_progress(
        self, lease: Lease, progress: dict[str, Any], *, model_id: str | None = None
    ) -> bool:
        """Record progress (and the model id once a checkpoint exists); False if not ours."""
        return self._update(
            lease.job_id,
            lambda entry, now: lifecycle.update_progress(
                entry, lease.fence, now, progress, model_id
            ),
        )

    def cancel_requested(self, job_id: str) -> bool:
        return self._read(job_id).record.cancel_requested

    def finish(
        self,
        lease: Lease,
        status: Outcome,
        *,
        metrics: dict[str, Any] | None = None,
        error: str | None = None,
        model_id: str | None = None,
    ) -> bool:
        """Record the outcome and end the lease; False (nothing written) if not ours."""
        return self._update(
            lease.job_id,
            lambda entry, now: lifecycle.finish(
                entry, lease.fence, now, status, metrics=metrics, error=error, model_id=model_id
            ),
        )

    def release(self, lease: Lease) -> bool:
        """Give a running job back to the queue, its attempt counted (failed past
        `max_attempts`); False if not ours. Its message is due at once (the releasing worker
        sends it; else the reaper does).
        """
        return self._update(
            lease.job_id,
            lambda entry, now: lifecycle.release(
                entry, lease.fence, now, max_attempts=self.max_attempts
            ),
        )

    # --- reaper -------------------------------------------------------------------------

    def reap(
        self,
        on_settled: Callable[[str], None] | None = None,
        silent: Callable[[str, Entry], bool] | None = None,
    ) -> list[str]:
        """Settle every running job whose lease expired; return the ids queued again.

        Such a job is queued again when it has attempts left, failed with "worker lost N
        times" when not, and cancelled when a cancel was requested; `on_settled(job_id)` is
        called for those two (to unlist a model an earlier attempt left). With `silent`,
        a running job is settled only when also `silent(job_id, entry)` (`LeaseWatch`).
        """

        def settle(job_id: str, entry: Entry, now: Instant) -> str:
            if entry.record.status == "running" and silent and not silent(job_id, entry):
                return "alive"
            return lifecycle.reap(entry, now, lease_s=self.lease_s, max_attempts=self.max_attempts)

        requeued = []
        for job_id in self._active_ids():
            try:
                outcome = self._update(job_id, partial(settle, job_id))
            except JobNotFound:
                continue
            except ValueError:  # an unreadable entry must not stop the reaping of the others
                log.exception("job %s: unreadable entry; not reaped", job_id)
                continue
            if outcome == "requeued":
                requeued.append(job_id)
            elif outcome in ("cancelled", "exhausted") and on_settled is not None:
                on_settled(job_id)
        return requeued

    def awaiting_message(
        self,
        older_than_s: float = 0.0,
        resend_after_s: float = float("inf"),
        waiting: Collection[str] = (),
    ) -> list[str]:
        """Queued jobs whose message is due (`lifecycle.message_due`), but for those whose
        message still `waiting` in the broker's queue: a job waiting behind busy workers
        is not sent again, so the queue holds at most one message per queued job."""
        due = []
        now = self._clock()
        for job_id in self._active_ids():
            if job_id in waiting:
                continue
            try:
                entry = self._read(job_id)
            except JobNotFound:
                continue
            except ValueError:
                log.exception("job %s: unreadable entry; not sent", job_id)
                continue
            if lifecycle.message_due(entry, now, grace_s=older_than_s, resend_s=resend_after_s):
                due.append(job_id)
        return due

    def take_due(
        self,
        older_than_s: float,
        resend_after_s: float = float("inf"),
        waiting: Collection[str] = (),
    ) -> list[str]:
        """The jobs of `awaiting_message`, each marked sent atomically (`take_message`):
        the caller sends them, and no other reaper does.
        """
        taken = []
        for job_id in self.awaiting_message(older_than_s, resend_after_s, waiting):
            take = partial(lifecycle.take_message, grace_s=older_than_s, resend_s=resend_after_s)
            try:
                if self._update(job_id, take):
                    taken.append(job_id)
            except JobNotFound:
                continue
        return taken

    def mark_enqueued(self, job_id: str) -> None:
        """The job's message has been sent."""
        self._update(job_id, lifecycle.mark_sent)

    @abc.abstractmethod
    def _clock(self) -> Instant:
        """The store's time now."""
