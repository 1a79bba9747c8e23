"""`serve(host, port)`: the API under uvicorn, plus a local worker in the embedded mode.

Without IWAE_BROKER_URL (embedded mode) the command also starts one training worker as a
child process sharing IWAE_HOME, so that `iwae serve` alone trains and serves, and starts
it again when it exits on its own (its watchdog ends it when training hangs); with a broker
URL it runs the API only and workers are started with `iwae worker`.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import subprocess
import threading
from types import FrameType

import uvicorn

from app.errors import UnsafeExposure
from app.hosts import LOOPBACK_HOSTS
from app.main import create_app
from app.settings import Settings, get_settings
from worker.queue import start_local_worker_process

log = logging.getLogger(__name__)

# How long a stopping local worker may take before it is killed. Its job is not lost: the
# lease expires and the next worker resumes it from the last checkpoint.
WORKER_STOP_GRACE_S = 10.0
# How long a stopping server waits for requests still open. An event stream
# (GET /jobs/{job_id}/events) stays open as long as its job runs, so without a limit one
# open browser tab would keep the server from stopping; after it, open requests are cancelled.
SHUTDOWN_GRACE_S = 5.0
UVICORN_OPTIONS = {"log_level": "info", "timeout_graceful_shutdown": SHUTDOWN_GRACE_S}
# Pause before a local worker that exited is started again, so one that cannot start at all
# does not spin.
WORKER_RESTART_DELAY_S = 1.0


def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the API until SIGINT/SIGTERM; in embedded mode, with a local worker alongside."""
    settings = get_settings()
    check_exposure(host, settings)
    if settings.allowed_hosts is None and settings.api_token is None and is_loopback(host):
        # Anonymous on loopback: a browser must not reach it under another site's name.
        settings = settings.model_copy(update={"allowed_hosts": LOOPBACK_HOSTS})
    app = create_app(settings)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again; with the
    # default handler the process would die there, skipping the `finally` that stops the
    # worker. As an exception, it unwinds.
    previous = signal.signal(signal.SIGTERM, _exit)
    worker = LocalWorker(settings) if settings.embedded else None
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            limit_concurrency=settings.http_concurrency,
            **UVICORN_OPTIONS,
        )
    finally:
        if worker is not None:
            worker.stop()
        signal.signal(signal.SIGTERM, previous)


class LocalWorker:
    """The embedded mode's worker process, started again whenever it exits before `stop()`:
    a worker's watchdog ends it when training hangs, and something must start a fresh one."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.process = start_local_worker_process(settings)
        self._thread = threading.Thread(target=self._supervise, name="iwae-local-worker")
        self._thread.daemon = True
        self._thread.start()

    def _supervise(self) -> None:
        while True:
            code = self.process.wait()
            if self._stopping.wait(WORKER_RESTART_DELAY_S):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                log.error("the local worker exited with status %s; starting another", code)
                self.process = start_local_worker_process(self._settings)

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
        stop_worker(self.process)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches: 127.0.0.0/8, ::1 and `localhost`.

    Any other name counts as reachable from outside: it may resolve to anything.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, settings: Settings) -> None:
    """Refuse to serve anonymously on an address other machines can reach.

    Without IWAE_API_TOKEN anyone who reaches the port can queue training jobs (hours of a
    GPU each), so that needs an explicit IWAE_ALLOW_ANONYMOUS; on a loopback address the
    machine's own users are trusted.
    """
    if settings.api_token is not None or settings.allow_anonymous or is_loopback(host):
        return
    raise UnsafeExposure(
        f"refusing to listen on {host} without IWAE_API_TOKEN: anyone who reaches this "
        "address could queue training jobs. Set IWAE_API_TOKEN (clients then send "
        "'Authorization: Bearer <token>'), listen on 127.0.0.1, or set "
        "IWAE_ALLOW_ANONYMOUS=1 to serve anonymously on purpose."
    )


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def stop_worker(worker: subprocess.Popen[bytes], grace_s: float = WORKER_STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL after `grace_s`: a training job could otherwise hold exit for hours."""
    if worker.poll() is not None:
        return
    worker.terminate()
    try:
        worker.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("local worker still busy after %.0f s; killing it", grace_s)
        worker.kill()
        worker.wait()
