"""Starting workers: `iwae worker` in the foreground, or a local worker process for
`iwae serve` in the embedded mode.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping

from worker.celery_app import consumed_queues, create_celery_app, prepare_storage
from worker.settings import WorkerSettings, get_worker_settings


def run_worker(loglevel: str = "info", *, settings: WorkerSettings | None = None) -> None:
    """Run a Celery worker in this process until it is stopped (SIGTERM or Ctrl-C).

    Solo pool, one job at a time, consuming `consumed_queues(settings)`; its reaper thread
    starts when it is ready. Returns when the worker stops.
    """
    settings = settings or get_worker_settings()
    prepare_storage(settings)
    app = create_celery_app(settings)
    app.worker_main(worker_argv(settings, loglevel))


def worker_argv(settings: WorkerSettings, loglevel: str = "info") -> list[str]:
    return [
        "worker",
        f"--loglevel={loglevel}",
        "--pool=solo",
        "--concurrency=1",
        f"--queues={','.join(consumed_queues(settings))}",
        f"--hostname=iwae-{os.getpid()}@{socket.gethostname()}",
        # Cluster chatter that a solo worker busy training cannot answer anyway.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def start_local_worker_process(
    settings: WorkerSettings | None = None,
    *,
    loglevel: str = "info",
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `python -m worker` as a child process with these settings (for `iwae serve`).

    The child inherits this process's environment (or `env`) with every `WorkerSettings`
    field set from `settings`, and its stdout/stderr. The caller stops it with
    `terminate()` and `wait()`.
    """
    settings = settings or get_worker_settings()
    child_env = dict(os.environ if env is None else env)
    child_env.update(settings_env(settings))
    return subprocess.Popen(
        [sys.executable, "-m", "worker", f"--loglevel={loglevel}"], env=child_env
    )


def settings_env(settings: WorkerSettings) -> dict[str, str]:
    """The `IWAE_*` environment variables that reproduce `settings` in another process."""
    env = {}
    for name in WorkerSettings.model_fields:
        value = getattr(settings, name)
        env[f"IWAE_{name.upper()}"] = "" if value is None else str(value)
    return env
