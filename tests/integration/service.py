"""A test deployment: settings, job store, real worker processes (`python -m worker`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from worker.jobs import JobRecord, JobStore, open_job_store
from worker.queue import enqueue_training
from worker.runner import settings_env
from worker.settings import WorkerSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

# A few seconds of training on 2 CPU cores.
TINY_CONFIG: dict[str, Any] = {
    "k": 5,
    "epochs": 2,
    "batch_size": 100,
    "train_size": 500,
    "eval_size": 100,
    "eval_k": 50,
    "model": {"latent_dim": 3, "hidden_dim": 32},
    "device": "cpu",
}


class Service:
    """One test's deployment: settings, job store, worker processes and their logs."""

    def __init__(self, settings: WorkerSettings, log_dir: Path) -> None:
        self.settings = settings
        self.store: JobStore = open_job_store(settings)
        self.log_dir = log_dir
        self.workers: list[subprocess.Popen[bytes]] = []
        self.signalled: set[int] = set()  # pids of the workers a test stops on purpose

    def start_worker(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, **settings_env(self.settings)}
        log = open(self.log_dir / f"worker-{len(self.workers)}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "--loglevel=info"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.workers.append(process)
        return process

    def signal_worker(self, worker: subprocess.Popen[bytes], sig: signal.Signals) -> int:
        """Send `sig` (SIGKILL: the worker is lost; SIGTERM: asked to stop); its exit code."""
        self.signalled.add(worker.pid)
        worker.send_signal(sig)
        return worker.wait(timeout=20)

    def submit(self, **changes: Any) -> str:
        """Create a job (TINY_CONFIG with `changes`) and queue it, as the API does."""
        job = self.store.create({**TINY_CONFIG, **changes})
        enqueue_training(job.job_id, settings=self.settings)
        return job.job_id

    def wait_for(
        self,
        job_id: str,
        condition: Callable[[JobRecord], bool],
        timeout: float = 60.0,
        what: str = "condition",
    ) -> JobRecord:
        """Poll the job store every 50 ms until `condition(record)` or the deadline."""
        return self.poll(lambda: self.store.get(job_id), condition, timeout, what)

    def poll(
        self, read: Callable[[], T], condition: Callable[[T], bool], timeout: float, what: str
    ) -> T:
        """`read()` every 50 ms until `condition` holds for it; fails at the deadline, or
        when a worker that no test stopped has exited."""
        deadline = time.monotonic() + timeout
        while True:
            value = read()
            if condition(value):
                return value
            if time.monotonic() > deadline:
                pytest.fail(
                    f"timed out after {timeout} s waiting for {what}: {value}\n{self.logs()}"
                )
            for worker in self.workers:
                if worker.pid not in self.signalled and worker.poll() is not None:
                    pytest.fail(f"worker exited with {worker.returncode}\n{self.logs()}")
            time.sleep(0.05)

    def wait_finished(self, job_id: str, timeout: float = 60.0) -> JobRecord:
        return self.wait_for(job_id, lambda r: r.finished, timeout, "the job to finish")

    def log_text(self) -> str:
        """Every worker's whole log."""
        return "\n".join(p.read_text(errors="replace") for p in self.log_dir.glob("worker-*.log"))

    def logs(self) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("worker-*.log")):
            parts.append(f"--- {path.name} (last 3000 characters) ---\n{path.read_text()[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait(timeout=10)
        self.store.close()
