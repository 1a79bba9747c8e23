"""WorkerSettings: safe defaults, environment parsing, and the env that reproduces them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.runner import settings_env
from worker.settings import WorkerSettings, get_worker_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in WorkerSettings.model_fields:
        monkeypatch.delenv(f"IWAE_{name.upper()}", raising=False)


def test_defaults_are_embedded_under_home() -> None:
    settings = WorkerSettings()
    assert settings.home == Path("~/.iwae").expanduser()
    assert settings.embedded
    assert settings.mnist_dir == settings.home / "data"
    assert settings.download_dir == settings.home / "data"
    assert settings.models_dir == settings.home / "models"
    assert settings.jobs_dir == settings.home / "jobs"
    assert settings.broker_dir == settings.home / "broker"
    assert (settings.job_lease_s, settings.heartbeat_interval_s) == (60, 10)
    assert settings.reaper_interval_s == 15
    assert settings.recovery_bound_s == 90
    assert settings.max_attempts == 3
    assert settings.device == "auto"
    assert settings.redis_prefix == "iwae:"


def test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IWAE_HOME", str(tmp_path))
    monkeypatch.setenv("IWAE_DATA_DIR", str(tmp_path / "mnist"))
    monkeypatch.setenv("IWAE_BROKER_URL", "redis://example:6379/3")
    monkeypatch.setenv("IWAE_JOB_LEASE_S", "30")
    monkeypatch.setenv("IWAE_DEVICE", "cpu")
    settings = WorkerSettings()
    assert settings.home == tmp_path
    assert settings.mnist_dir == tmp_path / "mnist"
    assert settings.download_dir == tmp_path / "data"
    assert not settings.embedded
    assert settings.job_lease_s == 30
    assert settings.device == "cpu"


def test_empty_broker_url_means_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IWAE_BROKER_URL", "")
    monkeypatch.setenv("IWAE_DATA_DIR", " ")
    settings = WorkerSettings()
    assert settings.broker_url is None
    assert settings.data_dir is None


def test_heartbeat_must_beat_within_the_lease() -> None:
    with pytest.raises(ValidationError, match="heartbeat_interval_s"):
        WorkerSettings(job_lease_s=5, heartbeat_interval_s=5)
    with pytest.raises(ValidationError):
        WorkerSettings(device="tpu")


def test_settings_env_reproduces_the_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    original = WorkerSettings(
        home=tmp_path,
        broker_url="redis://127.0.0.1:6379/14",
        redis_prefix="x:",
        job_lease_s=3,
        heartbeat_interval_s=1,
        max_attempts=5,
    )
    for name, value in settings_env(original).items():
        monkeypatch.setenv(name, value)
    assert WorkerSettings() == original
    embedded = WorkerSettings(home=tmp_path)
    for name, value in settings_env(embedded).items():
        monkeypatch.setenv(name, value)
    assert WorkerSettings() == embedded


def test_get_worker_settings_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    get_worker_settings.cache_clear()
    monkeypatch.setenv("IWAE_HOME", str(tmp_path))
    try:
        assert get_worker_settings() is get_worker_settings()
        assert get_worker_settings().home == tmp_path
    finally:
        get_worker_settings.cache_clear()


def test_storage_url_picks_the_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from models.storage import FileStorage
    from models.storage.s3 import S3Storage

    monkeypatch.setenv("IWAE_HOME", str(tmp_path))
    monkeypatch.setenv("IWAE_STORAGE_URL", "")  # empty: unset, the folder IWAE_HOME
    storage = WorkerSettings().open_storage()
    assert isinstance(storage, FileStorage) and storage.root == tmp_path
    monkeypatch.setenv("IWAE_STORAGE_URL", f"file://{tmp_path}/shared")
    storage = WorkerSettings().open_storage()
    assert isinstance(storage, FileStorage) and storage.root == tmp_path / "shared"
    monkeypatch.setenv("IWAE_STORAGE_URL", "s3://bucket/prefix")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage = WorkerSettings().open_storage()  # no I/O: no server needed
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix) == ("bucket", "prefix")
    monkeypatch.setenv("IWAE_STORAGE_URL", "ftp://host/x")
    with pytest.raises(ValidationError, match="not a storage URL"):
        WorkerSettings()
