"""Real worker processes (`python -m worker`) against the real Redis, or in embedded mode.

Redis: 127.0.0.1:6379, database 14 (override with IWAE_TEST_REDIS_URL); every test uses its
own key prefix for the job store and the Celery queue, and deletes its keys afterwards, so
concurrent runs do not meet. MNIST comes from IWAE_DATA_DIR or ../shared/data/mnist beside
the repository; nothing is downloaded. Short lease timings (lease 3 s, heartbeat 1 s, reaper
1 s; progress every 0.25 s) make recovery take seconds. Every worker started is killed at teardown.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration.service import Service
from tests.support import require_mnist
from worker.settings import WorkerSettings

REDIS_URL = os.environ.get("IWAE_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")


def service_settings(tmp_path: Path, **changes: Any) -> WorkerSettings:
    """Short lease timings under `tmp_path`; `changes` override any field."""
    values: dict[str, Any] = {
        "home": tmp_path / "home",
        "data_dir": require_mnist(),
        "job_lease_s": 3.0,
        "heartbeat_interval_s": 1.0,
        "reaper_interval_s": 1.0,
        "progress_interval_s": 0.25,
        "device": "cpu",
    }
    return WorkerSettings(**{**values, **changes})


@pytest.fixture
def redis_service(tmp_path: Path) -> Iterator[Service]:
    """Distributed mode on the test Redis database, with a key prefix of its own."""
    yield from distributed_service(tmp_path)


def distributed_service(tmp_path: Path, **changes: Any) -> Iterator[Service]:
    """`redis_service`'s deployment, with settings `changes`."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis answers at {REDIS_URL} ({exc}); start redis-server")
    prefix = f"iwae-test-{uuid.uuid4().hex[:8]}:"
    settings = service_settings(tmp_path, broker_url=REDIS_URL, redis_prefix=prefix, **changes)
    service = Service(settings, tmp_path)
    try:
        yield service
    finally:
        service.stop()
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def embedded_service(tmp_path: Path) -> Iterator[Service]:
    """Embedded mode: filesystem queue and file job store under a temporary IWAE_HOME."""
    service = Service(service_settings(tmp_path, broker_url=None), tmp_path)
    try:
        yield service
    finally:
        service.stop()
