"""Settings shared by every worker process (and inherited by the API's `app.settings`).

Read from the environment with the prefix `IWAE_` (e.g. `IWAE_HOME`, `IWAE_BROKER_URL`).
Every field has a safe default, and building the settings never touches the disk or the
network: directories are created by the code that uses them.

Recovery time: a job whose worker dies is re-queued at most `job_lease_s + 2 *
reaper_interval_s` after the worker's last heartbeat (90 s with the defaults), by the reaper
of any live worker; see `worker.jobs.reaper`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.config import Device
from models.storage import Storage, open_storage, parse_storage_url


class WorkerSettings(BaseSettings):
    """Where state lives, which broker to use, and the job-lease timings."""

    # An empty variable (`IWAE_API_TOKEN=` in a .env file) means "unset": the default.
    model_config = SettingsConfigDict(env_prefix="IWAE_", extra="ignore", env_ignore_empty=True)

    home: Path = Field(
        default=Path("~/.iwae"),
        description="Root of all state: models/, and in embedded mode jobs/ and broker/.",
    )
    data_dir: Path | None = Field(
        default=None,
        description="Folder with the four MNIST files; None means home/data, where they are "
        "downloaded when missing.",
    )
    storage_url: str | None = Field(
        default=None,
        description="Where models (checkpoints, model.json, metrics) and study reports are "
        "kept: unset or file:///path is a folder (unset: home), s3://bucket/prefix an "
        "S3-compatible object store (credentials and endpoint from the AWS_* variables, e.g. "
        "AWS_ENDPOINT_URL); every worker and the API must name the same one.",
    )
    broker_url: str | None = Field(
        default=None,
        description="redis://host:6379/0 for the distributed mode (the job store lives in the "
        "same Redis database); unset for the embedded mode (no server needed).",
    )
    redis_prefix: str = Field(
        default="iwae:",
        description="Prefix of every Redis key the service writes (job store and Celery queue), "
        "so that several deployments or test runs can share one Redis database.",
    )
    queue: str = Field(default="iwae.training", description="Celery queue of training jobs.")
    job_lease_s: float = Field(
        default=60.0,
        gt=0,
        description="A running job whose lease is not renewed for this long is presumed lost.",
    )
    heartbeat_interval_s: float = Field(
        default=10.0, gt=0, description="How often a running job renews its lease."
    )
    reaper_interval_s: float = Field(
        default=15.0,
        gt=0,
        description="How often each worker looks for running jobs whose lease expired.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Starts allowed per job; a job whose worker is lost this many times fails.",
    )
    resend_queued_s: float = Field(
        default=300.0,
        gt=0,
        description="A queued job not claimed this long after its message was sent is sent "
        "again (the message was lost between a worker's ack and its claim).",
    )
    job_stall_s: float = Field(
        default=300.0,
        gt=0,
        description="A running job that reports no training progress for this long stops "
        "renewing its lease, so the reaper takes it back (hung: NFS, CUDA).",
    )
    max_job_seconds: float | None = Field(
        default=None,
        gt=0,
        description="A job whose attempts together run longer than this fails; unset: no limit.",
    )
    max_active_jobs: int = Field(
        default=1000,
        ge=1,
        description="Queued plus running jobs at most; POST /train beyond it gets 429 with "
        "Retry-After.",
    )
    job_retention_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="Finished job records are deleted this long after they end (their "
        "models stay); a study and its cells' records this long after its last cell ended.",
    )
    progress_interval_s: float = Field(
        default=1.0, ge=0, description="Minimum time between progress writes of a running job."
    )
    device: Device = Field(
        default="auto",
        description="Device for jobs whose config says device='auto'; 'auto' picks CUDA when "
        "available. Chosen inside the task, never in a parent process.",
    )

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        parse_storage_url(value)  # raises on a scheme we cannot store to
        return value

    @field_validator("broker_url", "data_dir", "storage_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("home", "data_dir")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> WorkerSettings:
        if self.heartbeat_interval_s >= self.job_lease_s:
            raise ValueError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be shorter than "
                f"job_lease_s ({self.job_lease_s}), or every running job would look lost"
            )
        if self.job_stall_s <= self.heartbeat_interval_s:
            raise ValueError("job_stall_s must be longer than heartbeat_interval_s")
        return self

    def queue_for(self, device: str | None) -> str:
        """The queue of a job asking for `device`: jobs that need CUDA wait for a GPU worker."""
        return f"{self.queue}.cuda" if device == "cuda" else self.queue

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: filesystem queue and file job store."""
        return self.broker_url is None

    @property
    def mnist_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.home / "data"

    @property
    def download_dir(self) -> Path:
        """Where missing MNIST files are downloaded (the default data folder)."""
        return self.home / "data"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def cache_dir(self) -> Path:
        """Local copies of what an object store holds (checkpoints the API serves)."""
        return self.home / "cache"

    def open_storage(self) -> Storage:
        """The model storage `storage_url` names (no I/O until it is used)."""
        return open_storage(self.storage_url, self.home, self.cache_dir)

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def recovery_bound_s(self) -> float:
        """Longest time from a worker's last renewal to its job being queued again."""
        return self.job_lease_s + 2 * self.reaper_interval_s


@lru_cache
def get_worker_settings() -> WorkerSettings:
    """The process's settings, read once; tests call `get_worker_settings.cache_clear()`."""
    return WorkerSettings()
