"""Shared fixtures: torch on one thread, a tiny model config, a tiny checkpoint in tmp_path,
settings pointed at tmp_path, a fake job queue, and API clients built on them.

Nothing here touches the network or the real IWAE_HOME; the API's job store is the
embedded file store under tmp_path, and queued jobs go to a list instead of Celery.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch
from fastapi.testclient import TestClient

from models.checkpoint import TrainState, save_checkpoint
from models.config import ModelConfig, TrainConfig
from models.networks import IWAEModel
from tests.local_redis import HOST, redis_on
from tests.s3_server import new_bucket, s3_env, s3_server

TINY_MODEL_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread: tiny tensors gain nothing from more, and lose a lot to
    contention when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3 API server on loopback (moto), shared by the session's tests."""
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """`s3://bucket/prefix` of a fresh bucket, with the AWS_* variables pointing at it."""
    for name, value in s3_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    return f"s3://{new_bucket()}/iwae"


@pytest.fixture
def tiny_config() -> TrainConfig:
    """A model small enough that a K=5000 log-likelihood takes milliseconds."""
    return TrainConfig(
        k=2,
        epochs=1,
        batch_size=10,
        model=ModelConfig(layers=1, latent_dim=4, hidden_dim=16),
        train_size=100,
        eval_size=0,
        eval_k=10,
        device="cpu",
    )


def write_model(
    models_dir: Path,
    model_id: str,
    config: TrainConfig,
    *,
    seed: int = 0,
    created_at: datetime | None = None,
    describe: bool = True,
) -> Path:
    """A randomly initialised model saved as the worker saves a trained one.

    Writes `models_dir/model_id/model.safetensors` and, when `describe`, the `model.json`
    that makes the model listed and served.
    """
    torch.manual_seed(seed)
    model = IWAEModel(config.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    directory = models_dir / model_id
    save_checkpoint(
        directory / "model.safetensors",
        model,
        optimizer,
        config,
        TrainState(epoch=1, step=10, train_seconds=0.1),
        torch.Generator().manual_seed(seed),
    )
    if describe:
        metrics = {"test_loglik": -200.0, "test_loglik_std_error": 1.0, "active_units": [2]}
        description = {
            "model_id": model_id,
            "job_id": model_id,
            "config": config.to_dict(),
            "metrics": metrics,
            "created_at": (created_at or datetime.now(UTC)).isoformat(),
        }
        (directory / "model.json").write_text(json.dumps(description))
    return directory


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty IWAE_HOME."""
    return tmp_path / "iwae-home"


@pytest.fixture
def add_model(home: Path, tiny_config: TrainConfig) -> Callable[..., Path]:
    """`add_model(model_id, seed=0, created_at=None, describe=True)`: a tiny model in `home`."""

    def add(model_id: str, **options: Any) -> Path:
        return write_model(home / "models", model_id, tiny_config, **options)

    return add


@pytest.fixture
def tiny_model(add_model: Callable[..., Path]) -> str:
    """The id of a tiny trained model under `home/models/`."""
    add_model(TINY_MODEL_ID)
    return TINY_MODEL_ID


@pytest.fixture
def make_settings(home: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Settings for the embedded mode under `home`; keyword arguments override fields.

    IWAE_* variables of the developer's environment are removed so they cannot leak in.
    """
    from app.settings import Settings

    for name in list(os.environ):
        if name.upper().startswith("IWAE_"):
            monkeypatch.delenv(name)

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"home": home, "broker_url": None, "data_dir": home / "data"}
        return Settings(**{**values, **overrides})

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Any]) -> Any:
    return make_settings()


class FakeQueue:
    """Stands in for `worker.queue.enqueue_training` (and `enqueue_training_group`, as
    `group`): records the job ids it is given, and the groups."""

    def __init__(self) -> None:
        self.job_ids: list[str] = []
        self.groups: list[list[str]] = []

    def __call__(self, job_id: str) -> None:
        self.job_ids.append(job_id)

    def group(self, job_ids: list[str]) -> None:
        self.groups.append(list(job_ids))
        self.job_ids.extend(job_ids)


@pytest.fixture
def fake_queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
def make_client(
    make_settings: Callable[..., Any], fake_queue: FakeQueue
) -> Iterator[Callable[..., TestClient]]:
    """Build started API clients (lifespan run) with settings overrides and the fake queue."""
    from app.deps import get_group_queue, get_job_queue
    from app.main import create_app

    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        app = create_app(make_settings(**overrides))
        app.dependency_overrides[get_job_queue] = lambda: fake_queue
        app.dependency_overrides[get_group_queue] = lambda: fake_queue.group
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    """An API client with default settings, an empty home and the fake queue."""
    return make_client()


@pytest.fixture(scope="session", autouse=True)
def redis_for_the_suite() -> Iterator[None]:
    """A Redis where the tests look for one, started for the session when none answers
    there (tests/local_redis.py), so that the Redis tests run rather than skip."""
    url = urlsplit(os.environ.get("IWAE_TEST_REDIS_URL", "redis://127.0.0.1:6379/14"))
    with contextlib.ExitStack() as servers:
        for port in {6379, url.port or 6379} if url.hostname == HOST else {6379}:
            servers.enter_context(redis_on(port))
        yield
