"""app.backpressure: at most `concurrency` model calls run, `queue` wait, the rest get 503;
a deadline and the client's disconnect stop a call between chunks; and through the API,
ops routes answer while every inference slot is taken."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import inference
from app.backpressure import InferenceGate
from app.errors import ClientDisconnected, DeadlineExceeded, Overloaded
from tests.app.digit import digit_png
from tests.support import wait_until


async def connected() -> dict[str, Any]:
    """An ASGI `receive` whose client never leaves."""
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


def disconnects_when(event: anyio.Event) -> Callable[[], Any]:
    async def receive() -> dict[str, Any]:
        await event.wait()
        return {"type": "http.disconnect"}

    return receive


async def run(gate: InferenceGate, fn: Callable[..., Any], *args: Any, receive=connected) -> Any:
    """Admit a call at `gate` and run `fn(*args)` there, as the routes do."""
    with gate.admit(receive) as call:
        return await call(fn, *args)


class Work:
    """A model call that counts how many run at once and holds until released."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.started = threading.Semaphore(0)
        self.release = threading.Event()

    def __call__(self, value: int) -> int:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.started.release()
        self.release.wait(10)
        with self.lock:
            self.running -= 1
        return value


def test_at_most_concurrency_calls_run_and_the_queue_is_bounded() -> None:
    work = Work()
    results: dict[int, Any] = {}

    async def main() -> None:
        gate = InferenceGate(concurrency=2, queue=1, timeout_s=30)

        async def submit(i: int) -> None:
            try:
                results[i] = await run(gate, work, i)
            except Overloaded as exc:
                results[i] = exc

        async with anyio.create_task_group() as tasks:
            for i in range(3):
                tasks.start_soon(submit, i)
            await anyio.sleep(0.2)  # two run, one waits
            assert (work.running, gate.admitted) == (2, 3)
            await submit(3)  # refused at once, without waiting
            assert isinstance(results[3], Overloaded)
            work.release.set()
        assert gate.admitted == 0

    anyio.run(main)
    assert [results[i] for i in range(3)] == [0, 1, 2]
    assert work.most == 2


def test_the_overloaded_answer_is_503_with_retry_after() -> None:
    assert issubclass(DeadlineExceeded, Overloaded)
    assert Overloaded.retry_after_s >= 1


def test_the_deadline_stops_a_call_between_chunks() -> None:
    """Each chunk advances a fake clock by 1 s: a 10 s deadline stops it after 10 chunks."""
    now = [0.0]
    chunks: list[int] = []

    def estimate(check: Callable[[], None]) -> None:
        for chunk in range(100):
            now[0] += 1.0
            chunks.append(chunk)
            check()

    async def main() -> None:
        gate = InferenceGate(concurrency=1, queue=0, timeout_s=10, clock=lambda: now[0])
        with (
            gate.admit(connected) as call,
            pytest.raises(DeadlineExceeded, match="IWAE_INFERENCE_TIMEOUT_S"),
        ):
            await call(estimate, call.check)

    anyio.run(main)
    assert len(chunks) == 11  # the check after the 11th chunk sees 11 s > 10 s


def test_a_wait_past_the_deadline_is_refused() -> None:
    work = Work()

    async def main() -> None:
        gate = InferenceGate(concurrency=1, queue=5, timeout_s=0.3)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run, gate, work, 0)
            await anyio.to_thread.run_sync(work.started.acquire)
            start = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="no model slot was free"):
                await run(gate, work, 1)
            assert time.monotonic() - start < 5
            work.release.set()

    anyio.run(main)


def test_a_disconnect_stops_the_running_call_at_its_next_check() -> None:
    checks: list[int] = []
    started = threading.Event()

    def estimate(check: Callable[[], None]) -> None:
        started.set()
        for chunk in range(1000):
            checks.append(chunk)
            check()
            time.sleep(0.01)

    async def main() -> None:
        left = anyio.Event()
        gate = InferenceGate(concurrency=1, queue=0, timeout_s=60)
        async with anyio.create_task_group() as tasks:

            async def leave() -> None:
                await anyio.to_thread.run_sync(started.wait)
                left.set()

            tasks.start_soon(leave)
            with gate.admit(disconnects_when(left)) as call, pytest.raises(ClientDisconnected):
                await call(estimate, call.check)
        assert gate.admitted == 0

    anyio.run(main)
    assert len(checks) < 100, "stopped long before the end"


def test_a_client_that_leaves_while_waiting_frees_its_place() -> None:
    work = Work()

    async def main() -> None:
        left = anyio.Event()
        gate = InferenceGate(concurrency=1, queue=1, timeout_s=60)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run, gate, work, 0)
            await anyio.to_thread.run_sync(work.started.acquire)
            left.set()
            with anyio.fail_after(5):
                with pytest.raises(ClientDisconnected):
                    await run(gate, work, 1, receive=disconnects_when(left))
            assert gate.admitted == 1
            work.release.set()

    anyio.run(main)
    assert work.most == 1


# --- through the API ------------------------------------------------------------------------


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Work:
    """GET /samples holds its inference slot until `held.release` is set."""
    work = Work()
    monkeypatch.setattr(
        inference, "sample", lambda served, n, seed=None: np.zeros((work(n), 784), np.float32)
    )
    return work


def test_past_the_queue_model_routes_answer_503_and_ops_routes_still_answer(
    make_client: Callable[..., TestClient], tiny_model: str, held: Work
) -> None:
    client = make_client(inference_concurrency=1, inference_queue=1)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.get, "/samples")
        assert held.started.acquire(timeout=10)
        waiting = pool.submit(client.get, "/samples")
        gate = client.app.state.gate
        wait_until(lambda: gate.admitted >= 2, "the second request at the gate", 10, interval=0.01)

        refused = client.get("/samples", params={"format": "json"})
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert "the server is busy" in refused.json()["detail"]
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(path).status_code == 200, path
        held.release.set()
        assert running.result(10).status_code == waiting.result(10).status_code == 200


def test_a_refused_upload_is_never_decoded(
    make_client: Callable[..., TestClient],
    tiny_model: str,
    held: Work,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app import uploads

    decoded = []
    monkeypatch.setattr(uploads, "preprocess", lambda data, max_pixels: decoded.append(data))
    client = make_client(inference_concurrency=1, inference_queue=0)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.get, "/samples")
        assert held.started.acquire(timeout=10)
        refused = client.post("/loglik", files={"file": ("d.png", digit_png())})
        held.release.set()
        assert running.result(10).status_code == 200
    assert refused.status_code == 503
    assert decoded == []


@pytest.mark.parametrize("route", ["/loglik", "/reconstruct", "/impute"])
def test_every_model_route_goes_through_the_gate(
    make_client: Callable[..., TestClient], tiny_model: str, held: Work, route: str
) -> None:
    client = make_client(inference_concurrency=1, inference_queue=0)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.get, "/samples")
        assert held.started.acquire(timeout=10)
        refused = client.post(route, files={"file": ("d.png", digit_png())})
        held.release.set()
        assert running.result(10).status_code == 200
    assert refused.status_code == 503, refused.text


def test_ops_routes_answer_while_the_default_thread_pool_is_exhausted(
    client: TestClient, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload being decoded holds the only thread of FastAPI's pool: health, readiness
    and metrics must not wait for it (on a sync route they would queue behind it)."""
    from app import uploads

    decoding, release = threading.Event(), threading.Event()

    def slow_preprocess(data: bytes, max_pixels: int) -> np.ndarray:
        decoding.set()
        release.wait(10)
        return np.zeros(784, np.float32)

    monkeypatch.setattr(uploads, "preprocess", slow_preprocess)
    limiter = client.portal.call(anyio.to_thread.current_default_thread_limiter)
    client.portal.call(setattr, limiter, "total_tokens", 1)
    with ThreadPoolExecutor(4) as pool:
        upload = pool.submit(client.post, "/reconstruct", files={"file": ("d.png", digit_png())})
        assert decoding.wait(10)
        probes = {
            path: pool.submit(client.get, path) for path in ("/healthz", "/readyz", "/metrics")
        }
        try:
            statuses = {
                path: probe.result(timeout=10).status_code for path, probe in probes.items()
            }
        finally:
            release.set()
        assert statuses == {"/healthz": 200, "/readyz": 200, "/metrics": 200}
        assert upload.result(10).status_code == 200


def test_loglik_past_its_deadline_is_503(
    make_client: Callable[..., TestClient], tiny_model: str
) -> None:
    client = make_client(inference_timeout_s=1e-6, loglik_chunk_size=10)
    response = client.post("/loglik", files={"file": ("d.png", digit_png())}, params={"k": 1000})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert "IWAE_INFERENCE_TIMEOUT_S" in response.json()["detail"]


def test_a_body_the_route_does_not_read_does_not_break_the_watch(
    make_client: Callable[..., TestClient], tiny_model: str
) -> None:
    """GET /samples never reads a body; one over the size limit must not turn into a 500."""
    client = make_client(max_upload_bytes=100)
    assert client.request("GET", "/samples", content=b"x" * 1000).status_code == 200


def test_the_gate_runs_one_call_per_core_by_default(
    make_client: Callable[..., TestClient], make_settings: Callable[..., Any]
) -> None:
    import os

    assert make_client().app.state.gate.concurrency == len(os.sched_getaffinity(0))
    assert make_settings(inference_concurrency=3).inference_slots == 3
