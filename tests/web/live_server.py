"""`LiveServer`: a real `iwae serve` (embedded mode) in a child process, on a free 127.0.0.1
port, with IWAE_HOME in a temporary folder and real MNIST from IWAE_DATA_DIR (or
../shared/data/mnist beside the repository); its local worker trains tiny models in seconds."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import MNIST_DIR, REPO_ROOT, TINY_JOB, free_port, wait_until

SERVE = "import sys; from app.cli import main; sys.exit(main())"  # `iwae`, wherever it is


class LiveServer:
    """`iwae serve` in a child process, with IWAE_API_TOKEN set to `token`; `url`, an httpx
    `client` that sends the token, and the server's log on failure."""

    def __init__(self, home: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.token = secrets.token_hex(8)
        self.log_path = home.parent / "serve.log"
        env = {name: value for name, value in os.environ.items() if not name.startswith("IWAE_")}
        env.update(
            IWAE_HOME=str(home),
            IWAE_DATA_DIR=str(MNIST_DIR),
            IWAE_DEVICE="cpu",
            IWAE_PROGRESS_INTERVAL_S="0.2",
            IWAE_TORCH_THREADS="1",
            IWAE_API_TOKEN=self.token,
        )
        port = self.url.rsplit(":", 1)[1]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", SERVE, "serve", "--port", port],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.client = httpx.Client(
            base_url=self.url, timeout=10, headers={"Authorization": f"Bearer {self.token}"}
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.poll(lambda: self.client.get("/readyz").status_code == 200, timeout, "readyz")

    def poll(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        wait_until(
            condition,
            what,
            timeout,
            interval=0.1,
            retry_on=(httpx.TransportError,),  # not listening yet
            check=self._check_running,
            details=self.logs,
        )

    def _check_running(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"iwae serve exited with {self.process.returncode}\n{self.logs()}")

    def train(self, **changes: Any) -> str:
        response = self.client.post("/train", json={**TINY_JOB, **changes})
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    def wait_finished(self, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        job: dict[str, Any] = {}

        def finished() -> bool:
            job.update(self.client.get(f"/jobs/{job_id}").json())
            return job["status"] in ("succeeded", "failed", "cancelled")

        self.poll(finished, timeout, f"job {job_id} to finish")
        return job

    def logs(self) -> str:
        return f"--- iwae serve (last 4000 characters) ---\n{self.log_path.read_text()[-4000:]}"

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
