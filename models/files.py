"""Crash-safe file writes shared by checkpoints, metrics, downloads and job records."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

Write = Callable[[Path, bytes], None]
"""How a run stores one of its files: `write(path, data)` replaces `path` with `data`
atomically, or raises to refuse. `write_atomic` by default; the worker's stores the file in
the job's storage under the fence of its claim (`worker.job_files`)."""


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
