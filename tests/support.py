"""Helpers shared by the test packages."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest


def poll(
    what: str,
    condition: Callable[[], Any],
    timeout: float,
    *,
    transient: tuple[type[BaseException], ...] = (),
    logs: Callable[[], object] = lambda: "",
    interval: float = 0.05,
) -> Any:
    """`condition()` once truthy; an exception of `transient` counts as not yet (a restart
    under way). At the deadline the test fails, naming `what` and showing `logs()`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
            if value:
                return value
        except transient:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{logs()}")
        time.sleep(interval)
