"""GET /jobs/{job_id}/events: the server-sent events of a job, until it finishes.

Most tests replace the job store with a script of records (or errors) that successive reads
return, so the expected events are known exactly; one runs the app under a real uvicorn to
see the stream stop when the client goes away.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import anyio
import httpx
import pytest
import redis
import uvicorn
from fastapi.testclient import TestClient

from app import events, server
from app.deps import job_store
from app.main import create_app
from app.schemas import JobOut
from models.config import TrainConfig
from tests.support import free_port, wait_until
from worker.jobs import JobNotFound, JobRecord

JOB_ID = "5d1c0ffee5d1c0ffee5d1c0ffee5d1c0"
URL = f"/jobs/{JOB_ID}/events"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def record(status: str = "running", step: int | None = None, **changes: Any) -> JobRecord:
    progress = None
    if step is not None:
        progress = {"phase": "train", "epoch": 1, "epochs": 1, "step": step, "steps": 10}
        progress |= {"loss": 150.0 - step, "images_per_s": 1000.0, "eta_s": 10.0 - step}
    return JobRecord(
        job_id=JOB_ID,
        status=status,
        config=TrainConfig(k=5).to_dict(),
        progress=progress,
        created_at=T0,
        updated_at=T0 + timedelta(seconds=step or 0),
        **changes,
    )


class Script:
    """A job store whose `get` returns `reads` one after the other (then the last again)."""

    def __init__(self, reads: list[JobRecord | Exception]) -> None:
        self.reads = reads
        self.calls = 0

    def get(self, job_id: str) -> JobRecord:
        item = self.reads[min(self.calls, len(self.reads) - 1)]
        self.calls += 1
        if isinstance(item, Exception):
            raise item
        return item


def parse(text: str) -> list[tuple[str, Any]]:
    """Events as (name, decoded data); comments as ("comment", text)."""
    parsed: list[tuple[str, Any]] = []
    for block in text.split("\n\n"):
        if block.startswith(":"):
            parsed.append(("comment", block[1:].strip()))
        elif block:
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            parsed.append((fields["event"], json.loads(fields["data"])))
    return parsed


def shown(job: JobRecord) -> dict[str, Any]:
    """The job as GET /jobs/{job_id} shows it."""
    return JobOut.of(job).model_dump(mode="json")


@pytest.fixture
def scripted(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Script]:
    monkeypatch.setattr(events, "POLL_S", 0.0)

    def install(reads: list[JobRecord | Exception]) -> Script:
        script = Script(reads)
        client.app.dependency_overrides[job_store] = lambda: script
        return script

    return install


def test_each_change_is_sent_once_then_the_end(client: TestClient, scripted) -> None:
    queued, first, second = record("queued"), record(step=1), record(step=2)
    done = record("succeeded", step=2, metrics={"test_loglik": -99.5})
    scripted([queued, first, first, first, second, done])
    response = client.get(URL)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert parse(response.text) == [
        ("job", shown(queued)),
        ("job", shown(first)),
        ("job", shown(second)),
        ("job", shown(done)),
        ("end", {"status": "succeeded"}),
    ]


def test_a_finished_job_gives_its_record_and_the_end_at_once(client: TestClient) -> None:
    job_id = client.post("/train", json={"k": 5}).json()["job_id"]
    cancelled = client.post(f"/jobs/{job_id}/cancel").json()
    assert parse(client.get(f"/jobs/{job_id}/events").text) == [
        ("job", cancelled),
        ("end", {"status": "cancelled"}),
    ]


def test_quiet_streams_get_keep_alive_comments(
    client: TestClient, scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "POLL_S", 0.01)
    monkeypatch.setattr(events, "KEEPALIVE_S", 0.05)
    running, done = record(step=1), record("failed", step=1, error="boom")
    scripted([running] * 30 + [done])  # 30 reads of 0.01 s or more: 0.3 s without a change
    parsed = parse(client.get(URL).text)
    comments = [item for item in parsed if item[0] == "comment"]
    assert 1 <= len(comments) < 30  # at most one per quiet read, whatever the machine's speed
    assert set(comments) == {("comment", "keep-alive")}
    assert [item for item in parsed if item[0] != "comment"] == [
        ("job", shown(running)),
        ("job", shown(done)),
        ("end", {"status": "failed"}),
    ]


def test_a_job_that_cannot_be_read_any_more_ends_the_stream_with_an_error(
    client: TestClient, scripted
) -> None:
    running = record(step=1)
    scripted([running, JobNotFound(JOB_ID)])
    assert parse(client.get(URL).text) == [
        ("job", shown(running)),
        ("error", {"detail": "the job no longer exists"}),
    ]


def test_a_store_error_never_reaches_the_client(client: TestClient, scripted) -> None:
    """Redis names its host and port in its errors: the stream says what happened only."""
    running = record(step=1)
    scripted([running, redis.ConnectionError("Error 111 connecting to 10.0.0.7:6379.")])
    assert parse(client.get(URL).text) == [
        ("job", shown(running)),
        ("error", {"detail": "the job could not be read: job store unavailable"}),
    ]


def test_a_stream_closes_after_its_longest_life(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "POLL_S", 0.01)
    client = make_client(event_stream_max_s=0.05)
    script = Script([record(step=1)])  # runs forever
    client.app.dependency_overrides[job_store] = lambda: script
    parsed = parse(client.get(URL).text)
    assert parsed == [
        ("job", shown(record(step=1))),
        ("comment", "closed after 0.05 s; reconnect to follow the job"),
    ]


def test_unknown_and_malformed_ids_are_refused_before_the_stream(client: TestClient) -> None:
    response = client.get("/jobs/nope/events")
    assert response.status_code == 404
    assert response.json() == {"detail": "no job with id 'nope'"}
    malformed = client.get("/jobs/.hidden/events")
    assert malformed.status_code == 422
    assert malformed.json()["detail"][0]["loc"] == ["path", "job_id"]


def test_the_stream_is_documented(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/jobs/{job_id}/events"]["get"]
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    assert "404" in operation["responses"]
    assert f"{events.KEEPALIVE_S:g} s" in operation["description"]


def test_the_events_stop_at_the_first_poll_after_the_client_has_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "POLL_S", 0.0)
    script = Script([record(step=1)])
    answers = iter([False, False, True])  # still there, still there, gone

    async def is_disconnected() -> bool:
        return next(answers)

    async def collect() -> list[str]:
        with anyio.fail_after(10):
            read = partial(script.get, JOB_ID)
            return [item async for item in events.job_events(read, record(step=1), is_disconnected)]

    assert anyio.run(collect) == [events.event("job", JobOut.of(record(step=1)).model_dump_json())]
    assert script.calls == 2  # read after each of the two "still there"


class LiveApp:
    """The app under uvicorn (with `iwae serve`'s options) on a free port, in a thread; its
    job store a script of one job that keeps running."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.script = Script([record(step=1)])
        app.dependency_overrides[job_store] = lambda: self.script
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        options = {**server.UVICORN_OPTIONS, "log_level": "warning"}
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, "uvicorn to start", 20, interval=0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=server.SHUTDOWN_GRACE_S + 10)


@pytest.fixture
def live_app(make_settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveApp]:
    monkeypatch.setattr(events, "POLL_S", 0.02)
    live = LiveApp(create_app(make_settings()))
    try:
        yield live
    finally:
        live.stop()


def test_the_stream_stops_when_the_client_goes_away(live_app: LiveApp) -> None:
    with httpx.stream("GET", live_app.url + URL, timeout=10) as response:
        lines = response.iter_lines()
        assert next(lines) == "event: job"
    # The server notices at its next read: the request completes (and is counted) and
    # the store is no longer read.
    finished = 'iwae_http_requests_total{method="GET",route="/jobs/{job_id}/events",status="200"}'
    wait_until(lambda: finished in httpx.get(live_app.url + "/metrics").text, "its end", 10)
    calls = live_app.script.calls
    time.sleep(10 * events.POLL_S)
    assert live_app.script.calls == calls


def test_an_open_stream_does_not_keep_the_server_from_stopping(live_app: LiveApp) -> None:
    with httpx.stream("GET", live_app.url + URL, timeout=30) as response:
        lines = response.iter_lines()  # kept: closing the iterator would close the connection
        assert next(lines) == "event: job"
        started = time.monotonic()
        live_app.stop()  # as on SIGTERM, while the client still reads and the job still runs
        assert not live_app.thread.is_alive()
        assert time.monotonic() - started < server.SHUTDOWN_GRACE_S + 5


@pytest.fixture
def one_stream(make_settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveApp]:
    monkeypatch.setattr(events, "POLL_S", 0.02)
    live = LiveApp(create_app(make_settings(max_event_streams=1)))
    try:
        yield live
    finally:
        live.stop()


def test_streams_past_the_limit_get_429_and_a_closed_one_frees_its_place(
    one_stream: LiveApp,
) -> None:
    with httpx.stream("GET", one_stream.url + URL, timeout=10) as response:
        lines = response.iter_lines()  # kept: closing the iterator would close the stream
        assert next(lines) == "event: job"
        refused = httpx.get(one_stream.url + URL, timeout=10)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "5"
        assert "IWAE_MAX_EVENT_STREAMS" in refused.json()["detail"]
        assert httpx.get(one_stream.url + "/healthz", timeout=10).status_code == 200
    # The server notices the client has gone at its next poll, and frees the place.
    wait_until(lambda: one_stream.app.state.streams.open == 0, "the place freed", 10)
    with httpx.stream("GET", one_stream.url + URL, timeout=10) as response:
        assert response.status_code == 200
