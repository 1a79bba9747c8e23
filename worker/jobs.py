"""The job store: the record of every training job, read by the API and written by workers.

Two implementations share this interface: `RedisJobStore` (distributed mode, in the broker's
Redis database under `settings.redis_prefix`) and `FileJobStore` (embedded mode, JSON files
under `home/jobs/`). `open_job_store(settings)` picks one.

Life of a job::

    create -> queued --claim--> running --finish--> succeeded | failed | cancelled
                 ^                 |
                 +---- reap -------+  (lease expired: worker lost; at most max_attempts starts)

Jobs are not lost, without relying on the broker's redelivery: a worker *claims* a job
before training it, which atomically marks it running under a *lease* (a token with an
expiry) that a heartbeat thread renews every `heartbeat_interval_s`. A worker that dies stops
renewing; once the lease has expired (`job_lease_s`), the reaper of any live worker (every
`reaper_interval_s`) puts the job back in the queue, so it is re-queued at most
`job_lease_s + reaper_interval_s` after the worker's last heartbeat (60 + 15 = 75 s by default)
and resumes from its last checkpoint. A claim is refused for a job that is already running
under a live lease or already finished, which de-duplicates redelivered or duplicate messages.

Cancellation is cooperative: a queued job is cancelled at once; a running job gets a cancel
flag that its training callback reads every step, and the worker then marks it cancelled.
"""

from __future__ import annotations

import abc
import os
import socket
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from worker.settings import WorkerSettings

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class JobNotFound(KeyError):
    """No job with this id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"no job with id {self.job_id!r}"


class JobAlreadyFinished(Exception):
    """The job has finished (succeeded or failed), so it cannot be cancelled."""

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id} has already finished ({status})")
        self.job_id = job_id
        self.status = status


class ClaimRefused(Exception):
    """A worker may not run this job now; the message that asked for it is dropped.

    `reason` is one of "running" (a live lease holds it), "finished" (succeeded, failed or
    cancelled), "exhausted" (worker lost `max_attempts` times: now failed) or "cancelled"
    (cancel requested while its worker was lost: now cancelled).
    """

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} not claimed: {reason}")
        self.job_id = job_id
        self.reason = reason


class JobRecord(BaseModel):
    """What the API shows about a job. Timestamps are timezone-aware UTC."""

    job_id: str
    status: JobStatus
    config: dict[str, Any]
    progress: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    model_id: str | None = None
    error: str | None = None
    attempts: int = Field(default=0, description="How many times a worker started this job.")
    worker: str | None = Field(default=None, description="host:pid of the last worker to run it.")
    cancel_requested: bool = False
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class Lease(BaseModel):
    """Proof that this worker holds a job: every worker-side write must present the token."""

    job_id: str
    token: str
    record: JobRecord


def lost_error(attempts: int) -> str:
    """The error of a job whose worker died on every one of its attempts."""
    return f"worker lost {attempts} times (out of memory?)"


def utcnow() -> datetime:
    return datetime.now(UTC)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobStore(abc.ABC):
    """Interface of both job stores. Every method is safe to call from several processes."""

    def __init__(self, *, lease_s: float, max_attempts: int) -> None:
        self.lease_s = lease_s
        self.max_attempts = max_attempts

    # --- API side -------------------------------------------------------------------------

    @abc.abstractmethod
    def create(self, config: dict[str, Any]) -> JobRecord:
        """A new queued job (its id is also its future model id), marked as awaiting a message.

        The caller then sends the message (`worker.queue.enqueue_training`), which clears the
        mark; if the caller dies in between, the reaper sends it.
        """

    @abc.abstractmethod
    def get(self, job_id: str) -> JobRecord:
        """The job's record; raises `JobNotFound`."""

    @abc.abstractmethod
    def list(self) -> list[JobRecord]:
        """Every job, newest first."""

    @abc.abstractmethod
    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job now, or ask a running one to stop at its next training step.

        Idempotent for a cancelled job; raises `JobAlreadyFinished` for a succeeded or failed
        one and `JobNotFound` for an unknown id.
        """

    @abc.abstractmethod
    def ping(self) -> bool:
        """True when the store can be read and written."""

    # --- worker side ----------------------------------------------------------------------

    @abc.abstractmethod
    def claim(self, job_id: str, worker: str) -> Lease:
        """Atomically start the job under a new lease, if it is queued or its lease expired.

        Counts an attempt and clears the previous attempt's progress. Raises `ClaimRefused`
        (drop the message) or `JobNotFound`.
        """

    @abc.abstractmethod
    def renew(self, lease: Lease) -> bool:
        """Extend the lease by `lease_s`; False when the job is no longer ours."""

    @abc.abstractmethod
    def update_progress(
        self, lease: Lease, progress: dict[str, Any], *, model_id: str | None = None
    ) -> bool:
        """Record progress (and the model id once a checkpoint exists); False if not ours."""

    @abc.abstractmethod
    def cancel_requested(self, job_id: str) -> bool:
        """Cheap check, made at every training step."""

    @abc.abstractmethod
    def finish(
        self,
        lease: Lease,
        status: Literal["succeeded", "failed", "cancelled"],
        *,
        metrics: dict[str, Any] | None = None,
        error: str | None = None,
        model_id: str | None = None,
    ) -> bool:
        """Record the outcome and release the lease; False (nothing written) if not ours."""

    @abc.abstractmethod
    def release(self, lease: Lease) -> bool:
        """Give a running job back to the queue (its worker is shutting down).

        The attempt is not counted, and the job is marked as awaiting a message (which the
        releasing worker sends; the reaper does if it cannot). False if not ours.
        """

    @abc.abstractmethod
    def reap(self) -> list[str]:
        """Deal with every running job whose lease expired; return the ids to enqueue again.

        Such a job is queued again (and marked as awaiting a message) when it has attempts
        left, failed with "worker lost N times" when not, and cancelled when a cancel was
        requested.
        """

    @abc.abstractmethod
    def awaiting_message(self, older_than_s: float = 0.0) -> list[str]:
        """Queued jobs marked as awaiting a message for longer than `older_than_s`."""

    @abc.abstractmethod
    def mark_enqueued(self, job_id: str) -> None:
        """The job's message has been sent."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""


def open_job_store(settings: WorkerSettings) -> JobStore:
    """The Redis store when a broker URL is set, else the file store under `home/jobs/`."""
    if settings.broker_url is None:
        from worker.file_store import FileJobStore

        return FileJobStore(
            settings.jobs_dir, lease_s=settings.job_lease_s, max_attempts=settings.max_attempts
        )
    from worker.redis_store import RedisJobStore

    return RedisJobStore.from_url(
        settings.broker_url,
        prefix=settings.redis_prefix,
        lease_s=settings.job_lease_s,
        max_attempts=settings.max_attempts,
    )
