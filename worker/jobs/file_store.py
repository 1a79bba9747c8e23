"""The embedded job store: one JSON file per job under `home/jobs/`, for a single machine.

- `{id}.json`: `{"boot": ..., "entry": Entry}`, always replaced atomically (temporary file,
  fsync, rename), so readers never lock.
- `.index`: the ids of the queued and running jobs and the count of jobs by status (finished
  statuses counting every job that ended so), kept with every change, so that the reaper,
  the active-job limit and `/metrics` read one file whatever the history.
- `.workers`: the workers that reported themselves (`report_worker`).
- `.lock`: an exclusive `flock` held around every read-modify-write, so the API and the
  worker processes never overwrite each other's changes.
- `studies/{id}.json`: a study (`StudyRecord`), written once, before its jobs.

The clock is this machine's monotonic clock, which every process here shares and which no
wall-clock step moves; times written before the last boot read as long past. Listing pages
scan the folder: fine for the single machine this mode is for. Finished jobs older than
`retention_s` are deleted by the reaper; the jobs of a study together with it, `retention_s`
after its last cell ended.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from models.files import write_atomic
from worker.jobs.record import (
    ACTIVE,
    STATUSES,
    WORKER_RETENTION_S,
    Entry,
    Instant,
    JobNotFound,
    JobRecord,
    JobStatus,
    StudyNotFound,
    StudyRecord,
    WorkerInfo,
    utcnow,
)
from worker.jobs.store import Insert, JobStore, newest_first

T = TypeVar("T")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class FileJobStore(JobStore):
    """Job store in a folder; safe across processes on one machine."""

    def __init__(self, root: Path, **limits: Any) -> None:
        super().__init__(**limits)
        self.root = Path(root)
        self._boot = _boot_id()

    # --- files ---------------------------------------------------------------------------

    def _path(self, job_id: str) -> Path:
        if not job_id or not job_id.isalnum():
            raise JobNotFound(job_id)  # never build a path from anything but a plain id
        return self.root / f"{job_id}.json"

    def _study_path(self, study_id: str) -> Path:
        if not study_id or not study_id.isalnum():
            raise StudyNotFound(study_id)
        return self.root / "studies" / f"{study_id}.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _clock(self) -> Instant:
        return Instant(t=time.monotonic(), wall=utcnow())

    def _read(self, job_id: str) -> Entry:
        try:
            data = json.loads(self._path(job_id).read_text())
        except FileNotFoundError:
            raise JobNotFound(job_id) from None
        entry = Entry.model_validate(data["entry"])
        if data.get("boot") != self._boot:  # monotonic times of an earlier boot: long past
            for name in ("lease_expires", "queued_since", "sent_at"):
                if getattr(entry, name) is not None:
                    setattr(entry, name, 0.0)
        return entry

    def _read_many(self, job_ids: Sequence[str]) -> list[Entry | None]:
        entries: list[Entry | None] = []
        for job_id in job_ids:
            try:
                entries.append(self._read(job_id))
            except JobNotFound:
                entries.append(None)
        return entries

    def _read_study(self, study_id: str) -> StudyRecord:
        try:
            return StudyRecord.model_validate_json(self._study_path(study_id).read_bytes())
        except FileNotFoundError:
            raise StudyNotFound(study_id) from None

    def _write(self, entry: Entry) -> None:
        data = {"boot": self._boot, "entry": entry.model_dump(mode="json")}
        write_atomic(self._path(entry.record.job_id), json.dumps(data).encode())

    def _entries(self) -> Iterator[Entry]:
        for path in self.root.glob("*.json"):
            try:
                yield self._read(path.stem)
            except JobNotFound:
                continue

    # --- storage -------------------------------------------------------------------------

    def _index(self) -> dict[str, Any]:
        """`.index`: the active ids and the counts by status, rebuilt if missing."""
        path = self.root / ".index"
        if path.exists():
            return json.loads(path.read_text())
        index: dict[str, Any] = {"active": [], "counts": dict.fromkeys(STATUSES, 0)}
        for entry in self._entries():
            self._count(index, entry, +1)
        return index

    @staticmethod
    def _count(index: dict[str, Any], entry: Entry, sign: int) -> None:
        status, job_id = entry.record.status, entry.record.job_id
        index["counts"][status] += sign
        if status in ACTIVE:
            active = set(index["active"])
            index["active"] = sorted(active | {job_id} if sign > 0 else active - {job_id})

    def _insert(self, make: Callable[[Instant, int], Insert]) -> Insert:
        with self._locked():
            index = self._index()
            insert = make(self._clock(), len(index["active"]))
            if insert.study is not None:
                study = insert.study
                write_atomic(self._study_path(study.study_id), study.model_dump_json().encode())
            for entry in insert.entries:
                self._count(index, entry, +1)
            # Index first: a crash in between lists an id with no entry (skipped), never a
            # queued job that no reaper would look at.
            write_atomic(self.root / ".index", json.dumps(index).encode())
            for entry in insert.entries:
                self._write(entry)
        return insert

    def _update(self, job_id: str, change: Callable[[Entry, Instant], T]) -> T:
        with self._locked():
            entry = self._read(job_id)
            before = entry.model_copy(deep=True)
            result = change(entry, self._clock())
            if entry == before:
                return result
            if entry.record.status == before.record.status:
                self._write(entry)
                return result
            index = self._index()  # read before the write: a rebuilt index sees the old state
            self._count(index, before, -1)
            self._count(index, entry, +1)
            # Entry first: a crash in between leaves a finished job listed as active (the
            # reaper skips it), never a running one missing from the list.
            self._write(entry)
            write_atomic(self.root / ".index", json.dumps(index).encode())
        return result

    def _active_ids(self) -> list[str]:
        return self._index()["active"] if self.root.exists() else []

    def _page(
        self, *, limit: int, cursor: str | None, status: JobStatus | None
    ) -> tuple[list[JobRecord], str | None]:
        records = [e.record for e in self._entries() if status in (None, e.record.status)]
        return newest_first(records, lambda r: r.created_at, limit=limit, cursor=cursor)

    def study_page(
        self, *, limit: int, cursor: str | None = None
    ) -> tuple[list[StudyRecord], str | None]:
        studies = []
        for path in (self.root / "studies").glob("*.json"):
            try:
                studies.append(self._read_study(path.stem))
            except StudyNotFound:
                continue
        return newest_first(studies, lambda s: s.created_at, limit=limit, cursor=cursor)

    def counts(self) -> dict[str, int]:
        return self._index()["counts"] if self.root.exists() else dict.fromkeys(STATUSES, 0)

    def report_worker(self, name: str, queues: list[str], outcome: str | None = None) -> None:
        path = self.root / ".workers"
        with self._locked():
            workers = json.loads(path.read_text()) if path.exists() else {}
            now = time.monotonic()
            workers = {  # an earlier boot's workers are gone too
                other: info
                for other, info in workers.items()
                if info.get("boot") == self._boot and info["seen"] >= now - WORKER_RETENTION_S
            }
            data = workers.setdefault(name, {"outcomes": {}})
            data.update(queues=queues, seen=now, boot=self._boot)
            if outcome is not None:
                data["outcomes"][outcome] = data["outcomes"].get(outcome, 0) + 1
            write_atomic(path, json.dumps(workers).encode())

    def workers(self) -> list[WorkerInfo]:
        path = self.root / ".workers"
        workers = json.loads(path.read_text()) if path.exists() else {}
        now = time.monotonic()
        infos = [
            WorkerInfo(
                name=name,
                queues=data["queues"],
                seen_s_ago=now - data["seen"] if data.get("boot") == self._boot else float("inf"),
                outcomes=data["outcomes"],
            )
            for name, data in workers.items()
        ]
        return sorted(infos, key=lambda w: w.seen_s_ago)

    def ping(self) -> bool:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".ping."):
                pass
            return True
        except OSError:
            return False

    def reap(
        self,
        on_settled: Callable[[str], None] | None = None,
        silent: Callable[[str, Entry], bool] | None = None,
    ) -> list[str]:
        self._drop_stale_ids()
        requeued = super().reap(on_settled, silent)
        if self.retention_s is not None:
            cutoff = utcnow() - timedelta(seconds=self.retention_s)
            for entry in self._entries():
                record = entry.record
                finished = record.finished_at
                if record.study_id is None and finished is not None and finished < cutoff:
                    self._path(record.job_id).unlink(missing_ok=True)
            self._forget_studies(cutoff)
        return requeued

    def _drop_stale_ids(self) -> None:
        """Unlist the active ids that a crash left behind, so they no longer count against
        `max_active_jobs`: one with no entry (the insert wrote the index, not the entry:
        counted as queued, uncounted here) or whose entry has ended (a change wrote the
        entry, not the index; its counts stay one off)."""
        with self._locked():
            index = self._index()
            stale = []
            for job_id in index["active"]:
                try:
                    if self._read(job_id).record.status not in ACTIVE:
                        stale.append(job_id)
                except JobNotFound:
                    stale.append(job_id)
                    index["counts"]["queued"] -= 1
                except ValueError:  # unreadable: left for the reaper to log
                    continue
            if stale:
                index["active"] = [job_id for job_id in index["active"] if job_id not in stale]
                write_atomic(self.root / ".index", json.dumps(index).encode())

    def _forget_studies(self, cutoff: datetime) -> None:
        """Delete each study that ended before `cutoff`, with its cells' records (which
        are kept as long as their study, so that none of its cells goes missing first)."""
        cursor = None
        while True:
            studies, cursor = self.study_page(limit=100, cursor=cursor)
            for study in studies:
                ended = self.view(study).ended_at
                if ended is not None and ended < cutoff:
                    for cell in study.cells:
                        self._path(cell.job_id).unlink(missing_ok=True)
                    self._study_path(study.study_id).unlink(missing_ok=True)
            if cursor is None:
                return
