"""One `iwae serve` per test session for the tests of the web page and the events stream
(tests/web/live_server.py), and a tiny model trained by it. The server is stopped with
SIGTERM, which also stops its worker, at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import require_mnist
from tests.web.live_server import LiveServer


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    require_mnist()
    server = LiveServer(tmp_path_factory.mktemp("live") / "home")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def trained_model(live_server: LiveServer) -> str:
    """The id of a tiny model trained by the live server."""
    job = live_server.wait_finished(live_server.train())
    assert job["status"] == "succeeded", f"{job}\n{live_server.logs()}"
    return job["model_id"]
