"""`create_app()` and its lifespan (app.main): nothing is opened until the server starts;
then the storage folder, the job store, the registry, the inference gate and the settings
that apply to torch are set up, and the job store is closed when the server stops."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.backpressure import InferenceGate
from app.main import create_app
from app.registry import ModelRegistry
from worker.jobs import JobStore


def test_creating_the_app_touches_no_disk(make_settings: Callable[..., Any], home: Path) -> None:
    app = create_app(make_settings())
    assert app.state.settings.home == home
    assert not home.exists()


def test_the_lifespan_opens_the_store_and_closes_it_at_shutdown(
    make_settings: Callable[..., Any], home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(make_settings(inference_concurrency=3, inference_queue=5))
    with TestClient(app):
        assert (home / "models").is_dir()
        assert isinstance(app.state.store, JobStore)
        assert isinstance(app.state.registry, ModelRegistry)
        assert isinstance(app.state.gate, InferenceGate)
        assert (app.state.gate.concurrency, app.state.gate.queue) == (3, 5)
        assert app.state.ops_threads.total_tokens == 4
        closed: list[bool] = []
        monkeypatch.setattr(app.state.store, "close", lambda: closed.append(True))
    assert closed == [True]


def test_torch_threads_setting_applies_at_startup(make_client: Callable[..., TestClient]) -> None:
    import torch

    before = torch.get_num_threads()
    seen: list[int] = []
    try:
        make_client(torch_threads=1)
        # Threads that have already run torch keep their count; request threads are new.
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert seen == [1]
    finally:
        torch.set_num_threads(before)
