"""Shared worker fixtures: both job stores behind one fixture (the file store in tmp_path,
the Redis store on DB 13 or `IWAE_TEST_REDIS_URL`), a Redis key prefix of a test's own,
the worker's settings, and the model storage (a folder or an object store).

Each Redis test gets its own key prefix and deletes its keys afterwards; the Redis cases are
skipped (with the reason) when no Redis answers.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from models.storage import FileStorage, Storage, open_storage
from worker.jobs import FileJobStore, JobStore, RedisJobStore
from worker.settings import WorkerSettings

REDIS_URL = os.environ.get("IWAE_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
LEASE_S = 0.3
MAX_ATTEMPTS = 2


def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis answers at {REDIS_URL} ({exc}); start redis-server to run this")
    return client


@pytest.fixture
def redis_keys() -> Iterator[tuple[redis.Redis, str]]:
    """A Redis client and a key prefix of this test's own; its keys are deleted after."""
    client = redis_client()
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    try:
        yield client, prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(params=["file", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    """A job store with a short lease (0.3 s) and two attempts per job."""
    if request.param == "file":
        return FileJobStore(tmp_path / "jobs", lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS)
    client, prefix = request.getfixturevalue("redis_keys")
    return RedisJobStore(client, prefix=prefix, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS)


@pytest.fixture
def worker_settings(tmp_path: Path) -> WorkerSettings:
    """A worker on CPU in tmp_path: 5 s leases, heartbeats every 0.05 s, every progress kept."""
    return WorkerSettings(
        home=tmp_path,
        job_lease_s=5,
        heartbeat_interval_s=0.05,
        progress_interval_s=0,
        device="cpu",
    )


@pytest.fixture(params=["file", "s3"])
def storage(request: pytest.FixtureRequest, worker_settings: WorkerSettings) -> Storage:
    """The model storage: the worker's folder, or an object store (the worker then trains in
    local copies of its checkpoints)."""
    if request.param == "file":
        return FileStorage(worker_settings.home)
    s3_url = request.getfixturevalue("s3_url")
    return open_storage(s3_url, worker_settings.home, worker_settings.cache_dir)
