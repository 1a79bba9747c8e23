"""Helpers shared by the test folders: the real MNIST folder, a free port, the tiny job that
the integration and web tests train, and a poll loop with a deadline.

Fixtures stay in the `conftest.py` of the folder that uses them; these are plain functions
and constants, imported where needed (`from tests.support import ...`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from models.data import MNIST_FILES

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
# Nothing is downloaded: MNIST is read from here (../shared/data/mnist beside the repository).
MNIST_DIR = Path(os.environ.get("IWAE_DATA_DIR") or REPO_ROOT.parent / "shared/data/mnist")

# The network of every tiny job: small enough to train in seconds on 2 CPU cores.
TINY_NETWORK: dict[str, Any] = {"latent_dim": 3, "hidden_dim": 32}
_TINY_RUN: dict[str, Any] = {
    "k": 5,
    "epochs": 2,
    "batch_size": 100,
    "train_size": 500,
    "eval_size": 100,
    "eval_k": 50,
}
# A few seconds of training (10 steps, a 100-image evaluation): as POST /train's body ...
TINY_JOB: dict[str, Any] = {**_TINY_RUN, **TINY_NETWORK}
# ... and as the config that the job store records (what `JobStore.create` takes).
TINY_CONFIG: dict[str, Any] = {**_TINY_RUN, "model": TINY_NETWORK, "device": "cpu"}


def mnist_files() -> dict[str, Path]:
    """The real MNIST files in MNIST_DIR by name (gz or raw); skips the test if one is absent."""
    found = {}
    for name in MNIST_FILES:
        existing = [p for p in (MNIST_DIR / f"{name}.gz", MNIST_DIR / name) if p.is_file()]
        if not existing:
            pytest.skip(f"real MNIST not found: no {name}(.gz) in {MNIST_DIR} (set IWAE_DATA_DIR)")
        found[name] = existing[0]
    return found


def require_mnist() -> Path:
    """MNIST_DIR, once it holds the four MNIST files; skips the test otherwise."""
    mnist_files()
    return MNIST_DIR


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(
    condition: Callable[[], T],
    what: str,
    timeout: float,
    *,
    interval: float = 0.05,
    retry_on: tuple[type[Exception], ...] = (),
    check: Callable[[], None] | None = None,
    details: Callable[[], str] | None = None,
) -> T:
    """`condition()`'s first truthy value, asked every `interval` seconds; the test fails
    after `timeout` seconds, naming `what` and adding `details()` (a log, say).

    `retry_on`: exceptions that mean "not yet" (a server not listening yet, a Redis
    restarting). `check()` runs after each miss and may fail the test sooner (a process
    that exited).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except retry_on:
            value = None
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() > deadline:
            more = "" if details is None else f"\n{details()}"
            pytest.fail(f"timed out after {timeout} s waiting for {what}{more}")
        time.sleep(interval)
