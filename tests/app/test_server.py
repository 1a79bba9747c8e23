"""app.server: the embedded mode starts a local worker and always stops it; the job queue
seam hands the app's settings to the worker's enqueue function."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app import server
from app.errors import UnsafeExposure


class FakeWorker:
    def __init__(self) -> None:
        self.stopped = False
        self.exited = threading.Event()

    def poll(self) -> int | None:
        return 0 if self.exited.is_set() else None

    def terminate(self) -> None:
        self.stopped = True
        self.exited.set()

    def wait(self, timeout: float | None = None) -> int:
        self.exited.wait(timeout)
        return 0 if self.stopped else 1


@pytest.fixture
def fake_serving(monkeypatch: pytest.MonkeyPatch, make_settings) -> Callable[..., dict[str, Any]]:
    """Run `serve` with uvicorn and the worker process replaced by recorders."""

    def run(
        uvicorn_error: Exception | None = None,
        host: str = "127.0.0.1",
        while_serving: Callable[[dict[str, Any]], None] = lambda seen: None,
        **overrides: Any,
    ) -> dict[str, Any]:
        seen: dict[str, Any] = {"workers": []}
        monkeypatch.setattr(server, "get_settings", lambda: make_settings(**overrides))

        def start(settings: Any) -> FakeWorker:
            worker = FakeWorker()
            seen["workers"].append(worker)
            return worker

        def fake_run(app: Any, host: str, port: int, **options: Any) -> None:
            seen["address"] = (host, port)
            seen["app"] = app
            seen["options"] = options
            while_serving(seen)
            if uvicorn_error is not None:
                raise uvicorn_error

        monkeypatch.setattr(server, "start_local_worker_process", start)
        monkeypatch.setattr(server.uvicorn, "run", fake_run)
        try:
            server.serve(host, 8123)
        except Exception as exc:
            seen["error"] = exc
        return seen

    return run


def test_embedded_mode_starts_and_stops_a_local_worker(fake_serving) -> None:
    seen = fake_serving()
    assert seen["address"] == ("127.0.0.1", 8123)
    # Bounded shutdown (test_events.py) and connections (IWAE_HTTP_CONCURRENCY).
    assert seen["options"] == {**server.UVICORN_OPTIONS, "limit_concurrency": 1024}
    assert len(seen["workers"]) == 1 and seen["workers"][0].stopped


def test_a_local_worker_that_exits_on_its_own_is_started_again(
    fake_serving, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "WORKER_RESTART_DELAY_S", 0.01)

    def hang_then_exit(seen: dict[str, Any]) -> None:
        seen["workers"][0].exited.set()  # its watchdog ended it: training hung
        deadline = time.monotonic() + 10
        while len(seen["workers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)

    seen = fake_serving(while_serving=hang_then_exit)
    first, second = seen["workers"]
    assert not first.stopped and second.stopped  # the replacement is stopped with the server


@pytest.mark.parametrize(
    ("host", "overrides", "allowed"),
    [
        ("127.0.0.1", {}, server.LOOPBACK_HOSTS),  # anonymous on loopback: rebinding target
        ("127.0.0.1", {"api_token": "s3cret"}, None),
        ("127.0.0.1", {"allowed_hosts": "iwae.local"}, "iwae.local"),
        ("0.0.0.0", {"allow_anonymous": True}, None),
    ],
)
def test_serving_anonymously_on_loopback_allows_loopback_host_names_only(
    fake_serving, host: str, overrides: dict[str, Any], allowed: str | None
) -> None:
    seen = fake_serving(host=host, **overrides)
    assert seen["app"].state.settings.allowed_hosts == allowed


def test_the_worker_is_stopped_even_when_the_server_fails(fake_serving) -> None:
    seen = fake_serving(uvicorn_error=OSError("address already in use"))
    assert isinstance(seen["error"], OSError)
    assert seen["workers"][0].stopped


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "iwae.example.org"])
def test_an_exposed_address_without_a_token_is_refused_before_anything_starts(
    fake_serving, host: str
) -> None:
    seen = fake_serving(host=host)
    assert isinstance(seen["error"], UnsafeExposure)
    assert "IWAE_API_TOKEN" in str(seen["error"]) and "IWAE_ALLOW_ANONYMOUS" in str(seen["error"])
    assert "address" not in seen and seen["workers"] == []


@pytest.mark.parametrize(
    "overrides", [{"api_token": "s3cret"}, {"allow_anonymous": True}], ids=["token", "anonymous"]
)
def test_an_exposed_address_serves_with_a_token_or_an_explicit_choice(
    fake_serving, overrides: dict[str, Any]
) -> None:
    assert fake_serving(host="0.0.0.0", **overrides)["address"] == ("0.0.0.0", 8123)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_addresses_need_no_token(fake_serving, host: str) -> None:
    assert fake_serving(host=host)["address"] == (host, 8123)


def test_iwae_serve_explains_the_refusal(
    monkeypatch: pytest.MonkeyPatch, make_settings, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.cli import main

    monkeypatch.setattr(server, "get_settings", make_settings)
    monkeypatch.setattr(server.uvicorn, "run", lambda *a, **k: pytest.fail("served anyway"))
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "refusing to listen on 0.0.0.0 without IWAE_API_TOKEN" in capsys.readouterr().err


def test_distributed_mode_runs_the_api_only(fake_serving) -> None:
    seen = fake_serving(broker_url="redis://127.0.0.1:6379/0")
    assert seen["workers"] == []


def test_stop_worker_kills_a_worker_that_ignores_sigterm() -> None:
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    start = time.monotonic()
    server.stop_worker(stubborn, grace_s=0.5)
    assert stubborn.returncode is not None
    assert time.monotonic() - start < 5


def test_the_real_queue_gets_the_apps_settings(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.queue
    from app.deps import get_job_queue

    sent: list[tuple[str, Any]] = []
    monkeypatch.setattr(
        worker.queue, "enqueue_training", lambda job_id, settings: sent.append((job_id, settings))
    )
    client = make_client()
    client.app.dependency_overrides.pop(get_job_queue)
    job_id = client.post("/train", json={"k": 5}).json()["job_id"]
    assert sent == [(job_id, client.app.state.settings)]


def test_serve_restores_the_sigterm_handler(fake_serving) -> None:
    import signal

    before = signal.getsignal(signal.SIGTERM)
    fake_serving()
    assert signal.getsignal(signal.SIGTERM) is before
