"""app.registry: listing, lazy loading, the bounded LRU cache, and thread safety."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app import registry as registry_module
from app.errors import ModelNotFound, ModelUnavailable, NoModelTrained
from app.registry import ModelRegistry
from models.storage import FileStorage

IDS = ["a" * 32, "b" * 32, "c" * 32]


@pytest.fixture
def models(home: Path, add_model: Callable[..., Path]) -> ModelRegistry:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for i, model_id in enumerate(IDS):
        add_model(model_id, seed=i, created_at=start + timedelta(hours=i))
    return ModelRegistry(FileStorage(home), cache_size=2)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every checkpoint the registry actually reads."""
    seen: list[str] = []
    real = registry_module.load_model

    def counting(path: Path, device: str = "cpu"):
        seen.append(Path(path).parent.name)
        return real(path, device=device)

    monkeypatch.setattr(registry_module, "load_model", counting)
    return seen


def test_list_is_newest_first(models: ModelRegistry) -> None:
    assert [m["model_id"] for m in models.list()] == IDS[::-1]


def test_pages_walk_every_model_once(models: ModelRegistry) -> None:
    first, cursor = models.page(limit=2)
    assert [m["model_id"] for m in first] == IDS[:0:-1]
    rest, last = models.page(limit=2, cursor=cursor)
    assert ([m["model_id"] for m in rest], last) == ([IDS[0]], None)


def test_default_is_the_newest(models: ModelRegistry, loads: list[str]) -> None:
    assert models.load().model_id == IDS[-1]


def test_no_model_and_unknown_model(home: Path) -> None:
    empty = ModelRegistry(FileStorage(home))
    with pytest.raises(NoModelTrained, match="POST /train"):
        empty.load()
    with pytest.raises(ModelNotFound):
        empty.load("d" * 32)


@pytest.mark.parametrize("model_id", ["..", "../models", "a/b", ".hidden", "", "x" * 200])
def test_ids_that_are_not_plain_names_are_unknown(models: ModelRegistry, model_id: str) -> None:
    with pytest.raises(ModelNotFound):
        models.load(model_id)


def test_models_load_lazily_and_stay_cached(models: ModelRegistry, loads: list[str]) -> None:
    assert loads == []
    first = models.load(IDS[0])
    assert models.load(IDS[0]) is first
    assert loads == [IDS[0]]
    assert not first.model.training  # eval mode


def test_cache_is_bounded_least_recently_used_out(models: ModelRegistry, loads: list[str]) -> None:
    models.load(IDS[0])
    models.load(IDS[1])
    models.load(IDS[0])  # IDS[1] is now the least recently used
    models.load(IDS[2])
    assert models.cached_ids() == [IDS[0], IDS[2]]
    models.load(IDS[1])
    assert loads == [IDS[0], IDS[1], IDS[2], IDS[1]]


def test_a_rewritten_checkpoint_is_reloaded(
    models: ModelRegistry, loads: list[str], home: Path
) -> None:
    models.load(IDS[0])
    checkpoint = home / "models" / IDS[0] / "model.safetensors"
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    models.load(IDS[0])
    assert loads == [IDS[0], IDS[0]]


def test_concurrent_requests_load_a_model_once(models: ModelRegistry, loads: list[str]) -> None:
    barrier = threading.Barrier(8)
    served = []

    def work() -> None:
        barrier.wait()
        served.append(models.load(IDS[1]))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == [IDS[1]]
    assert all(s is served[0] for s in served)


def test_unreadable_checkpoint(models: ModelRegistry, home: Path) -> None:
    (home / "models" / IDS[0] / "model.safetensors").unlink()
    with pytest.raises(ModelUnavailable, match="no checkpoint"):
        models.load(IDS[0])
    (home / "models" / IDS[1] / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(ModelUnavailable, match="cannot be loaded"):
        models.load(IDS[1])


def test_half_written_model_json_is_not_listed(models: ModelRegistry, home: Path) -> None:
    (home / "models" / IDS[0] / "model.json").write_text('{"model_id": ')
    assert IDS[0] not in [m["model_id"] for m in models.list()]
