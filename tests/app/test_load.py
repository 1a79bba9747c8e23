"""The limits under real load: uvicorn on a free 127.0.0.1 port serving a Burda-sized model.

30 clients ask for k=100000 log-likelihoods at once (about a second of CPU each): the gate
runs IWAE_INFERENCE_CONCURRENCY of them, queues IWAE_INFERENCE_QUEUE, answers the rest 503
with Retry-After at once, and /healthz keeps answering fast all along, since it never waits
behind inference. A client that hangs up stops its call at the next chunk (recorded as 499),
and an oversize training job is refused with 422 before anything is queued.
Uploads at the pixel limit, square or as thin as allowed, keep the server's peak memory to
a few bytes per pixel for each call the gate lets in; IWAE_MAX_EVENT_STREAMS event streams
stay open while one more gets 429 and the other routes answer as fast as before.
`python -m pytest -q -s tests/app/test_load.py` prints the measured figures.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from models.config import TrainConfig
from tests.app.digit import digit_png
from tests.support import REPO_ROOT, free_port, wait_until

pytestmark = pytest.mark.load

CLIENTS = 30
CONCURRENCY = 2
QUEUE = 2
STREAMS = 8
MAX_PIXELS = 4_000_000
HEALTHZ_BOUND_S = 1.0  # generous: CI is a loaded 2-core machine; queued, it would take seconds


@pytest.fixture
def tiny_config() -> TrainConfig:
    """Overrides the shared tiny model: Burda's one-layer model, so k=100000 takes ~1 s."""
    return TrainConfig(k=1, device="cpu")


@dataclass(frozen=True)
class Served:
    url: str
    pid: int


@pytest.fixture
def served(home: Path, tiny_model: str, tmp_path: Path) -> Iterator[Served]:
    """The API under uvicorn in its own process (embedded mode, no worker)."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("IWAE_")}
    env.update(
        IWAE_HOME=str(home),
        IWAE_DATA_DIR=str(home / "data"),
        IWAE_INFERENCE_CONCURRENCY=str(CONCURRENCY),
        IWAE_INFERENCE_QUEUE=str(QUEUE),
        IWAE_TORCH_THREADS="1",
        IWAE_MAX_EVENT_STREAMS=str(STREAMS),
        IWAE_MAX_IMAGE_PIXELS=str(MAX_PIXELS),
    )
    command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
    with open(tmp_path / "server.log", "wb") as log:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def running() -> None:
        assert process.poll() is None, (tmp_path / "server.log").read_text()

    try:
        wait_until(
            lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200,
            "the server to start",
            60,
            interval=0.1,
            retry_on=(httpx.TransportError,),
            check=running,
        )
        yield Served(url, process.pid)
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture
def server(served: Served) -> str:
    """The served API's base URL."""
    return served.url


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM, Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc (Linux only)")


def probe_while(url: str, busy: Callable[[], bool]) -> list[float]:
    """GET /healthz every 50 ms while `busy()`: the latency of each, in seconds."""
    latencies = []
    with httpx.Client(timeout=30) as client:
        while busy():
            start = time.perf_counter()
            assert client.get(f"{url}/healthz").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)
    return latencies


def test_an_oversize_job_gets_422_and_thirty_k100000_scorings_shed_load_while_healthz_stays_fast(
    server: str,
) -> None:
    oversize = {"k": 5000, "objective": "miwae", "m": 64, "batch_size": 10_000}
    response = httpx.post(f"{server}/train", json=oversize, timeout=30)
    assert response.status_code == 422
    assert "IWAE_MAX_SAMPLES_PER_STEP" in response.json()["detail"][0]["msg"]
    assert httpx.get(f"{server}/jobs", timeout=30).json()["jobs"] == []

    image = digit_png()

    # One client for all threads: a client per request would spend seconds of this
    # process's CPU building SSL contexts, and time that instead of the server.
    clients = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=CLIENTS))

    def score(seed: int) -> tuple[httpx.Response, float]:
        start = time.perf_counter()
        response = clients.post(
            f"{server}/loglik",
            params={"k": 100_000, "seed": seed},
            files={"file": ("digit.png", image, "image/png")},
        )
        return response, time.perf_counter() - start

    done = threading.Event()
    with clients, ThreadPoolExecutor(CLIENTS + 1) as pool:
        probe = pool.submit(probe_while, server, lambda: not done.is_set())
        start = time.perf_counter()
        results = list(pool.map(score, range(CLIENTS)))
        elapsed = time.perf_counter() - start
        done.set()
        latencies = probe.result()

    codes = Counter(response.status_code for response, _ in results)
    assert set(codes) <= {200, 503}, codes
    for response, _ in results:
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1
            assert "busy" in response.json()["detail"]
    # Only the calls that ran or waited succeed; at least the queue's worth are shed.
    assert CONCURRENCY <= codes[200] <= CLIENTS - QUEUE, codes
    refused = [seconds for response, seconds in results if response.status_code == 503]
    served = [seconds for response, seconds in results if response.status_code == 200]
    assert len(latencies) >= 5, "the probe ran during the load"
    assert max(latencies) < HEALTHZ_BOUND_S, sorted(latencies)[-5:]
    print(
        f"\n{CLIENTS} clients, k=100000, concurrency {CONCURRENCY}, queue {QUEUE}: "
        f"{dict(codes)} in {elapsed:.1f} s; 200s took {min(served):.2f}-{max(served):.2f} s, "
        f"503s {min(refused):.3f}-{max(refused):.3f} s; /healthz max {max(latencies):.3f} s, "
        f"median {sorted(latencies)[len(latencies) // 2]:.3f} s over {len(latencies)} probes"
    )


def test_a_client_that_hangs_up_stops_its_scoring(server: str) -> None:
    """Its call stops at the next chunk: the server records 499 long before k=100000 ends."""
    image = digit_png()
    start = time.perf_counter()
    files = {"file": ("digit.png", image, "image/png")}
    full = httpx.post(f"{server}/loglik", params={"k": 100_000}, files=files, timeout=120)
    assert full.status_code == 200
    full_s = time.perf_counter() - start
    request = httpx.Request(
        "POST",
        f"{server}/loglik",
        params={"k": 100_000},
        files=files,
    )
    body = request.read()
    head = [
        f"POST {request.url.raw_path.decode()} HTTP/1.1",
        f"Host: {request.url.netloc.decode()}",
    ]
    head += [f"{name}: {value}" for name, value in request.headers.items() if name != "host"]
    with socket.create_connection(("127.0.0.1", request.url.port), timeout=10) as connection:
        connection.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + body)
        time.sleep(0.1)  # the call has started
    hung_up = time.perf_counter()
    line = 'iwae_http_requests_total{method="POST",route="/loglik",status="499"} 1.0'
    while line not in httpx.get(f"{server}/metrics", timeout=30).text:
        assert time.perf_counter() - hung_up < 30, "the call was not stopped"
        time.sleep(0.02)
    stopped_s = time.perf_counter() - hung_up
    print(f"\nk=100000 takes {full_s:.2f} s; stopped {stopped_s:.3f} s after the client hung up")
    assert stopped_s < full_s / 2


def picture(width: int, height: int) -> bytes:
    """A PNG of a thick bar of ink across the middle of a dark `width` x `height` field."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def mask_of_left_half(width: int, height: int) -> bytes:
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, : width // 2] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_uploads_at_the_pixel_limit_take_memory_by_their_pixels_not_their_shape(
    served: Served,
) -> None:
    """Eight clients at once send pictures of 3.94 Mpx, square (1984 x 1984) or as thin as
    allowed (10500 x 375, 28:1), to /impute and /loglik. The gate lets 4 in at a time, and
    each holds a few bytes per pixel: the peak grows by well under 4 x 32 bytes x 4 Mpx
    (padded to a square first, one thin picture held 3 x 10500^2 floats, 1.3 GB)."""
    shapes = {"square": (1984, 1984), "thin": (10_500, 375)}
    uploads = {name: (picture(*size), mask_of_left_half(*size)) for name, size in shapes.items()}
    small = (picture(56, 56), mask_of_left_half(56, 56))

    def send(client: httpx.Client, route: str, images: tuple[bytes, bytes]) -> int:
        files = {"file": ("digit.png", images[0], "image/png")}
        params = {"k": 50}
        if route == "/impute":
            files["mask"] = ("mask.png", images[1], "image/png")
            params["n"] = 2
        return client.post(f"{served.url}{route}", params=params, files=files).status_code

    with httpx.Client(timeout=120) as client:
        assert send(client, "/impute", small) == send(client, "/loglik", small) == 200  # warm
        before = peak_rss_bytes(served.pid)
        work = [
            (route, uploads[name])
            for name in ("thin", "square")
            for route in ("/impute", "/loglik")
            for _ in range(2)
        ]
        with ThreadPoolExecutor(len(work)) as pool:
            codes = list(pool.map(lambda job: send(client, *job), work))
    grown = peak_rss_bytes(served.pid) - before
    assert set(codes) <= {200, 503}, codes  # 503: past the gate's queue, refused at once
    assert codes.count(200) >= CONCURRENCY + QUEUE
    budget = (CONCURRENCY + QUEUE) * 32 * MAX_PIXELS
    print(
        f"\n{len(work)} uploads of 3.94 Mpx (square and 28:1): {dict(Counter(codes))}; peak "
        f"RSS +{grown / 2**20:.0f} MiB, {grown / ((CONCURRENCY + QUEUE) * MAX_PIXELS):.1f} "
        f"bytes per admitted pixel (budget {budget / 2**20:.0f} MiB)"
    )
    assert grown < budget


def test_event_streams_past_the_limit_get_429_while_other_routes_answer(server: str) -> None:
    """STREAMS streams of a queued job (no worker: they stay open, polling the store) hold
    every place; one more gets 429 with Retry-After at once, and /healthz and GET /jobs/{id}
    answer as fast as with no stream open (the streams' reads have threads of their own)."""
    job = httpx.post(f"{server}/train", json={"k": 1, "epochs": 1}, timeout=30).json()
    url = f"{server}/jobs/{job['job_id']}/events"

    def timed_reads() -> list[float]:
        latencies = []
        with httpx.Client(timeout=30) as client:
            for path in ["/healthz", f"/jobs/{job['job_id']}"] * 10:
                start = time.perf_counter()
                assert client.get(server + path).status_code == 200
                latencies.append(time.perf_counter() - start)
        return latencies

    idle = timed_reads()
    with ExitStack() as streams:
        for _ in range(STREAMS):
            response = streams.enter_context(httpx.stream("GET", url, timeout=30))
            lines = response.iter_lines()  # kept: closing the iterator would close the stream
            streams.callback(lines.close)
            assert next(lines) == "event: job"
        start = time.perf_counter()
        refused = httpx.get(url, timeout=30)
        refused_s = time.perf_counter() - start
        busy = timed_reads()
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "5"
    assert max(busy) < HEALTHZ_BOUND_S, sorted(busy)[-3:]
    wait_until(lambda: _stream_opens(url), "a place freed once the streams closed", 30)
    print(
        f"\n{STREAMS} event streams open: one more refused 429 in {refused_s * 1000:.0f} ms; "
        f"/healthz and GET /jobs/{{id}} median {np.median(idle) * 1000:.1f} ms idle, "
        f"{np.median(busy) * 1000:.1f} ms (max {max(busy) * 1000:.0f}) with the streams open"
    )


def _stream_opens(url: str) -> bool:
    with httpx.stream("GET", url, timeout=30) as response:
        return response.status_code == 200
