"""The file backend: objects are files under a root folder (`IWAE_HOME` by default).

A fenced write takes the folder's lock (`flock` on its `.lock` file), reads which writer last
wrote each file of the folder (`.writers.json`), refuses a stale writer, records the new one,
then renames the new bytes into place, all before releasing the lock: the check and the
replacement are one step for every process of this host, and for the hosts of a network file
system whose locks work (NFSv4). The writers file is updated before the data, so a crash in
between leaves the newer claim recorded, never the older.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from models.files import write_atomic
from models.storage.base import ObjectInfo, Writer, check_writer

LOCK_NAME = ".lock"
WRITERS_NAME = ".writers.json"


class FileStorage:
    """Objects as files under `root`, key `a/b/c` at `root/a/b/c` (today's layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put(self, key: str, data: bytes, writer: Writer | None = None) -> None:
        path = self._path(key)
        if writer is None:
            write_atomic(path, data)
            return
        with self._claimed(key, path, writer):
            write_atomic(path, data)

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo(key, f"{st.st_mtime_ns}-{st.st_size}", st.st_mtime)

    def list(self, prefix: str) -> list[ObjectInfo]:
        found = []
        top = self._path(prefix.rstrip("/"))
        for folder, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # builds, temporary files
            for name in files:
                if name.startswith("."):
                    continue
                key = Path(folder, name).relative_to(self.root).as_posix()
                info = self.stat(key)
                if info is not None:
                    found.append(info)
        return found

    def delete(self, key: str, writer: Writer | None = None) -> None:
        path = self._path(key)
        if writer is None:
            path.unlink(missing_ok=True)
            return
        if not path.parent.is_dir():
            return
        with self._claimed(key, path, writer):
            path.unlink(missing_ok=True)

    def fetch(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.exists() else None  # a folder in its place fails to load

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise ValueError(f"not a storage key: {key!r}")
        return self.root.joinpath(*parts)

    @contextlib.contextmanager
    def _claimed(self, key: str, path: Path, writer: Writer) -> Iterator[None]:
        """Hold the folder's lock, with `writer` checked and recorded as the file's last."""
        folder = path.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            writers = _read_writers(folder / WRITERS_NAME)
            holder = writers.get(path.name)
            check_writer(key, writer, holder)
            if holder != writer:
                writers[path.name] = writer
                record = {name: [w.fence, w.attempt] for name, w in writers.items()}
                write_atomic(folder / WRITERS_NAME, json.dumps(record).encode())
            yield
        finally:
            os.close(fd)  # releases the lock


def _read_writers(path: Path) -> dict[str, Writer]:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return {name: Writer(int(fence), str(attempt)) for name, (fence, attempt) in record.items()}
