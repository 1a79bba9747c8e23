"""The job lifecycle: records, statuses, transitions, the two stores and the reaper; and
studies, whose cells are jobs.

`app/` and the rest of `worker/` use this package's names, never its modules' insides. It
also exports `WorkerSettings`, the settings `open_job_store` takes (and the API's settings
extend), so that the API reaches them without loading Celery.
"""

from __future__ import annotations

from models.status import Outcome
from worker.jobs.file_store import FileJobStore
from worker.jobs.reaper import ReaperThread, reap_once
from worker.jobs.record import (
    ACTIVE,
    FINISHED,
    STATUSES,
    ClaimRefused,
    Heartbeat,
    JobAlreadyFinished,
    JobNotFound,
    JobRecord,
    JobStatus,
    Lease,
    StudyCell,
    StudyNotFound,
    StudyRecord,
    TooManyJobs,
    WorkerInfo,
    lost_error,
    utcnow,
    worker_name,
)
from worker.jobs.redis_store import RedisJobStore
from worker.jobs.store import GridPoint, JobStore
from worker.jobs.studies import MISSING, StudyView
from worker.settings import WorkerSettings

__all__ = [
    "ACTIVE",
    "FINISHED",
    "MISSING",
    "STATUSES",
    "ClaimRefused",
    "FileJobStore",
    "GridPoint",
    "Heartbeat",
    "JobAlreadyFinished",
    "JobNotFound",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "Lease",
    "Outcome",
    "ReaperThread",
    "RedisJobStore",
    "StudyCell",
    "StudyNotFound",
    "StudyRecord",
    "StudyView",
    "TooManyJobs",
    "WorkerInfo",
    "WorkerSettings",
    "lost_error",
    "open_job_store",
    "reap_once",
    "utcnow",
    "worker_name",
]


def open_job_store(settings: WorkerSettings) -> JobStore:
    """The Redis store when a broker URL is set, else the file store under `home/jobs/`."""
    limits = {
        "lease_s": settings.job_lease_s,
        "max_attempts": settings.max_attempts,
        "max_active_jobs": settings.max_active_jobs,
        "retention_s": settings.job_retention_s,
    }
    if settings.broker_url is None:
        return FileJobStore(settings.jobs_dir, **limits)
    return RedisJobStore.from_url(settings.broker_url, prefix=settings.redis_prefix, **limits)
