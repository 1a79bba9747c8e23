"""The storage interface both backends implement, and the fencing rule they share.

A key is a `/`-separated path such as `models/{id}/model.safetensors` (`layout`). Every write
replaces the whole object at once: readers see the old bytes or the new, never a mix.

Fencing at the storage: a job's files are written by a `Writer`, the fence of the job's claim
and an id of the attempt (one claim, one process). A backend refuses (`StaleWrite`) to
replace or delete an object last written by a newer fence, or by another attempt under the
same fence, and it decides that atomically with the write (a lock and a rename in a folder,
a conditional write in S3). So the lease check before a write (`worker.lease`) is not the
only guard: even when the job store lost writes and handed one fence to two attempts, the
first attempt to write a file keeps it, and the other stops at its first write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Writer:
    """Who writes: the fence of a job's claim and the id of this attempt at it."""

    fence: int
    attempt: str

    def may_replace(self, holder: Writer | None) -> bool:
        """True when an object last written by `holder` may be replaced by this writer."""
        return holder is None or holder.fence < self.fence or holder == self


class StaleWrite(Exception):
    """The object was last written by a newer fence or another attempt: write nothing more."""

    def __init__(self, key: str, writer: Writer, holder: Writer | None) -> None:
        super().__init__(f"{key}: written by {holder}, so {writer} may not replace it")
        self.key = key
        self.writer = writer
        self.holder = holder


def check_writer(key: str, writer: Writer | None, holder: Writer | None) -> None:
    """Raise `StaleWrite` unless `writer` may replace what `holder` wrote (unfenced writes,
    `writer` None, are the command line's and the reports': never refused)."""
    if writer is not None and not writer.may_replace(holder):
        raise StaleWrite(key, writer, holder)


@dataclass(frozen=True)
class ObjectInfo:
    """An object's key, a stamp that changes whenever it is replaced, and when it was."""

    key: str
    stamp: str
    modified: float


class Storage(Protocol):
    """Objects under keys, in a local folder (`FileStorage`) or a bucket (`S3Storage`)."""

    def put(self, key: str, data: bytes, writer: Writer | None = None) -> None:
        """Replace the object atomically; `StaleWrite` when `writer` may not."""
        ...

    def get(self, key: str) -> bytes | None:
        """The object's bytes; None when it does not exist."""
        ...

    def stat(self, key: str) -> ObjectInfo | None:
        """The object's stamp; None when it does not exist."""
        ...

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with `prefix` (a folder ending in `/`)."""
        ...

    def delete(self, key: str, writer: Writer | None = None) -> None:
        """Remove the object if it exists; `StaleWrite` when `writer` may not."""
        ...

    def fetch(self, key: str) -> Path | None:
        """A file on this host holding the object's current bytes (S3: a download cached
        until the object changes); None when the object does not exist."""
        ...

    def local_path(self, key: str) -> Path | None:
        """Where the object lies on this host when the store is a local folder, else None."""
        ...
