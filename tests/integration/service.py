"""A test deployment: settings, job store, real worker processes (`python -m worker`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support import REPO_ROOT, TINY_CONFIG, wait_until
from worker.jobs import JobRecord, JobStore, open_job_store
from worker.queue import enqueue_training
from worker.runner import settings_env
from worker.settings import WorkerSettings

T = TypeVar("T")


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
        seen: list[T] = []

        def holds() -> bool:
            seen[:] = [read()]
            return condition(seen[0])

        def details() -> str:
            return f"last read: {seen[0]}\n{self.logs()}"

        wait_until(holds, what, timeout, check=self._check_workers, details=details)
        return seen[0]

    def _check_workers(self) -> None:
        """Fails the test when a worker that no test stopped has exited."""
        for worker in self.workers:
            if worker.pid not in self.signalled and worker.poll() is not None:
                pytest.fail(f"worker exited with {worker.returncode}\n{self.logs()}")

    def wait_finished(self, job_id: str, timeout: float = 60.0) -> JobRecord:
        return self.wait_for(job_id, lambda r: r.finished, timeout, "the job to finish")

    def wait_checkpointed(self, job_id: str) -> JobRecord:
        """The job past its first epoch's checkpoint (model_id appears with it), still
        training: a worker killed now leaves a run to resume."""
        return self.wait_for(
            job_id,
            lambda r: r.model_id is not None and r.status == "running",
            what="the first checkpoint",
        )

    def wait_resumed(self, job_id: str, timeout: float) -> JobRecord:
        """The job's record at its second attempt's first progress report."""
        return self.wait_for(
            job_id,
            lambda r: r.attempts == 2 and r.progress is not None,
            timeout,
            "the second attempt's first progress",
        )

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
