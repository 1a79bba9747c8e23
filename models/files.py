"""Crash-safe file writes shared by checkpoints, metrics, downloads and job records."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

Fence = Callable[[Path], None]


def write_atomic(path: Path, data: bytes, *, fence: Fence | None = None) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a mix.

    `fence(path)` is called once the data is on disk, just before it replaces the old file;
    it raises to cancel the write (a worker that may have lost its job must not write).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if fence is not None:
            fence(path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
