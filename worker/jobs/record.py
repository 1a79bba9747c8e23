"""What the job store keeps about a job: the record users read, and the entry around it.

The statuses are listed once, in `models.status` (`JobStatus`), and re-exported here for the
stores and the API; everything else (schemas, metrics, stores) derives from them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field

from models.status import FINISHED, STATUSES, JobStatus

ACTIVE: frozenset[str] = frozenset(STATUSES) - FINISHED


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


class StudyNotFound(KeyError):
    """No study with this id."""

    def __init__(self, study_id: str) -> None:
        super().__init__(study_id)
        self.study_id = study_id

    def __str__(self) -> str:
        return f"no study with id {self.study_id!r}"


class TooManyJobs(Exception):
    """`IWAE_MAX_ACTIVE_JOBS` jobs are already queued or running."""

    def __init__(self, limit: int, retry_after_s: int, active: int = 0, new: int = 1) -> None:
        if new == 1:
            situation = f"{limit} jobs are already queued or running (IWAE_MAX_ACTIVE_JOBS)"
        else:
            situation = (
                f"{active} jobs are queued or running, and {new} more would exceed "
                f"IWAE_MAX_ACTIVE_JOBS = {limit}"
            )
        super().__init__(f"{situation}; retry in {retry_after_s} s or cancel one")
        self.limit = limit
        self.retry_after_s = retry_after_s


class ClaimRefused(Exception):
    """A worker may not run this job now; the message that asked for it is dropped.

    `reason` is "running" (a worker holds it, or held it until its lease expired: the
    reaper takes it back) or "finished" (succeeded, failed or cancelled).
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
    study_id: str | None = Field(default=None, description="The study this job is a cell of.")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class Entry(BaseModel):
    """What a store keeps per job: the record plus the lifecycle's own bookkeeping.

    Times here are on the store's clock (`Instant.t`), never a worker's: Redis `TIME` in
    the Redis store, this machine's monotonic clock in the file store.
    """

    record: JobRecord
    fence: int = Field(0, description="Number of the latest claim; a lease holds one.")
    lease_expires: float | None = None
    queued_since: float | None = None
    sent_at: float | None = Field(None, description="When its message was last sent.")
    claimed_at: float | None = Field(None, description="When the running attempt started.")
    ran_s: float = Field(0.0, description="Seconds its earlier attempts ran.")


class StudyCell(BaseModel):
    """One cell of a study: the grid point and the job that trains it."""

    objective: str
    k: int
    seed: int
    job_id: str


class StudyRecord(BaseModel):
    """What the job store keeps about a study, fixed when it is created: its base config
    and the job id of every cell. Statuses and results are read from the cells' jobs.
    """

    study_id: str
    config: dict[str, Any] = Field(
        description="The base TrainConfig; cells set objective, k, seed."
    )
    cells: list[StudyCell]
    created_at: datetime


@dataclass(frozen=True)
class Instant:
    """One reading of the store's clock: `t` for comparisons, `wall` for display, `up_s`
    how long the store has been up (leases are not reaped in its first `lease_s`).
    """

    t: float
    wall: datetime
    up_s: float = float("inf")

    def plus_us(self, micros: int) -> Instant:
        """`micros` microseconds later: the jobs of one insert get distinct creation times,
        so that a page boundary (a creation-time cursor) never falls between equal ones.
        """
        return Instant(
            self.t + micros * 1e-6, self.wall + timedelta(microseconds=micros), self.up_s
        )


@dataclass(frozen=True)
class Lease:
    """Proof that this worker holds a job: every worker-side write presents its fence."""

    job_id: str
    fence: int
    record: JobRecord
    ran_s: float = 0.0  # seconds its earlier attempts ran (IWAE_MAX_JOB_SECONDS counts them)


Heartbeat = Literal["held", "cancel", "lost"]


# A worker silent this long is forgotten by the next report of any worker, so that the
# `workers` list (readiness, metrics) does not grow with every worker process ever started.
WORKER_RETENTION_S = 24 * 3600.0


class WorkerInfo(BaseModel):
    """A worker process as it last reported itself (its reaper reports every pass)."""

    name: str
    queues: list[str]
    seen_s_ago: float = Field(description="Seconds since it last reported, on the store's clock.")
    outcomes: dict[str, int] = Field(
        default_factory=dict, description="Messages it handled, by run_job outcome."
    )


def lost_error(attempts: int) -> str:
    """The error of a job whose worker died on every one of its attempts."""
    return f"worker lost {attempts} times (out of memory?)"


def stopped_error(attempts: int) -> str:
    """The error of a job whose worker was stopped (SIGTERM) on every one of its attempts."""
    return f"stopped {attempts} times by worker shutdowns; not started again"


def utcnow() -> datetime:
    return datetime.now(UTC)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
