"""Both job stores behind one fixture: the file store in tmp_path, the Redis store on DB 13.

Each Redis test gets its own key prefix and deletes its keys afterwards; the Redis cases are
skipped (with the reason) when no Redis answers on 127.0.0.1:6379.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from worker.jobs import FileJobStore, JobStore, RedisJobStore

REDIS_URL = "redis://127.0.0.1:6379/13"
LEASE_S = 0.3
MAX_ATTEMPTS = 2


def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis answers at {REDIS_URL} ({exc}); start redis-server to run this")
    return client


@pytest.fixture(params=["file", "redis"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[JobStore]:
    """A job store with a short lease (0.3 s) and two attempts per job."""
    if request.param == "file":
        yield FileJobStore(tmp_path / "jobs", lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS)
        return
    client = redis_client()
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    store = RedisJobStore(client, prefix=prefix, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS)
    try:
        yield store
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
