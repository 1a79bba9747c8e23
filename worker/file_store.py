"""The embedded job store: one JSON file per job under `home/jobs/`, for a single machine.

- `{id}.json`: `{"record": JobRecord, "lease_token", "lease_expires_at", "awaiting_since"}`,
  always replaced atomically (temporary file, fsync, rename), so readers never lock.
- `{id}.cancel`: exists once a cancel was requested; the training callback checks it every
  step, which costs one `stat`.
- `.lock`: an exclusive `flock` held around every read-modify-write, so the API and the
  worker processes never overwrite each other's changes.

Leases expire by this machine's clock (`time.time()`), which every process here shares.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from models.files import write_atomic
from worker.jobs import (
    ClaimRefused,
    JobAlreadyFinished,
    JobNotFound,
    JobRecord,
    JobStore,
    Lease,
    lost_error,
    utcnow,
)


class FileJobStore(JobStore):
    """Job store in a folder; safe across processes on one machine."""

    def __init__(self, root: Path, *, lease_s: float, max_attempts: int) -> None:
        super().__init__(lease_s=lease_s, max_attempts=max_attempts)
        self.root = Path(root)

    # --- files ---------------------------------------------------------------------------

    def _path(self, job_id: str) -> Path:
        if not job_id or not job_id.isalnum():
            raise JobNotFound(job_id)  # never build a path from anything but a plain id
        return self.root / f"{job_id}.json"

    def _cancel_flag(self, job_id: str) -> Path:
        return self.root / f"{job_id}.cancel"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read(self, job_id: str) -> dict[str, Any]:
        try:
            return json.loads(self._path(job_id).read_text())
        except FileNotFoundError:
            raise JobNotFound(job_id) from None

    def _write(self, job_id: str, entry: dict[str, Any]) -> None:
        write_atomic(self._path(job_id), json.dumps(entry).encode())

    @contextlib.contextmanager
    def _modify(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Lock, read the entry, let the caller change it, write it back."""
        with self._locked():
            entry = self._read(job_id)
            before = json.dumps(entry)
            try:
                yield entry
            finally:  # also when the caller raises after settling the job (claim refused)
                if json.dumps(entry) != before:
                    self._write(job_id, entry)

    # --- API side ------------------------------------------------------------------------

    def create(self, config: dict[str, Any]) -> JobRecord:
        now = utcnow()
        record = JobRecord(
            job_id=uuid.uuid4().hex,
            status="queued",
            config=config,
            created_at=now,
            updated_at=now,
        )
        entry = {
            "record": record.model_dump(mode="json"),
            "lease_token": None,
            "lease_expires_at": None,
            "awaiting_since": time.time(),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        self._write(record.job_id, entry)
        return record

    def get(self, job_id: str) -> JobRecord:
        return JobRecord.model_validate(self._read(job_id)["record"])

    def list(self) -> list[JobRecord]:
        records = []
        for path in self.root.glob("*.json"):
            try:
                records.append(self.get(path.stem))
            except JobNotFound:
                continue
        return sorted(records, key=lambda r: r.created_at, reverse=True)

    def request_cancel(self, job_id: str) -> JobRecord:
        with self._modify(job_id) as entry:
            record = entry["record"]
            if record["status"] in ("succeeded", "failed"):
                raise JobAlreadyFinished(job_id, record["status"])
            if record["status"] != "cancelled":
                self._cancel_flag(job_id).touch()
                record["cancel_requested"] = True
                record["updated_at"] = _now()
            if record["status"] == "queued":
                record["status"] = "cancelled"
                record["finished_at"] = record["updated_at"]
                entry["awaiting_since"] = None
        return JobRecord.model_validate(entry["record"])

    def ping(self) -> bool:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".ping."):
                pass
            return True
        except OSError:
            return False

    # --- worker side ---------------------------------------------------------------------

    def claim(self, job_id: str, worker: str) -> Lease:
        token = uuid.uuid4().hex
        with self._modify(job_id) as entry:
            record = entry["record"]
            if record["status"] == "running":
                if not _expired(entry):
                    raise ClaimRefused(job_id, "running")
                outcome = self._settle_lost(entry)
                if outcome != "requeue":
                    raise ClaimRefused(job_id, outcome)
            elif record["status"] != "queued":
                raise ClaimRefused(job_id, "finished")
            now = _now()
            record.update(
                status="running",
                attempts=record["attempts"] + 1,
                worker=worker,
                progress=None,
                started_at=now,
                updated_at=now,
            )
            entry.update(
                lease_token=token,
                lease_expires_at=time.time() + self.lease_s,
                awaiting_since=None,
            )
        return Lease(job_id=job_id, token=token, record=JobRecord.model_validate(record))

    def renew(self, lease: Lease) -> bool:
        with self._modify(lease.job_id) as entry:
            if not _ours(entry, lease):
                return False
            entry["lease_expires_at"] = time.time() + self.lease_s
        return True

    def update_progress(
        self, lease: Lease, progress: dict[str, Any], *, model_id: str | None = None
    ) -> bool:
        with self._modify(lease.job_id) as entry:
            if not _ours(entry, lease):
                return False
            entry["record"].update(progress=progress, updated_at=_now())
            if model_id is not None:
                entry["record"]["model_id"] = model_id
        return True

    def cancel_requested(self, job_id: str) -> bool:
        return self._cancel_flag(job_id).exists()

    def finish(
        self,
        lease: Lease,
        status: Literal["succeeded", "failed", "cancelled"],
        *,
        metrics: dict[str, Any] | None = None,
        error: str | None = None,
        model_id: str | None = None,
    ) -> bool:
        with self._modify(lease.job_id) as entry:
            if not _ours(entry, lease):
                return False
            record = entry["record"]
            now = _now()
            record.update(status=status, finished_at=now, updated_at=now)
            for key, value in (("metrics", metrics), ("error", error), ("model_id", model_id)):
                if value is not None:
                    record[key] = value
            entry.update(lease_token=None, lease_expires_at=None)
        return True

    def release(self, lease: Lease) -> bool:
        with self._modify(lease.job_id) as entry:
            if not _ours(entry, lease):
                return False
            record = entry["record"]
            record.update(status="queued", attempts=record["attempts"] - 1, updated_at=_now())
            entry.update(lease_token=None, lease_expires_at=None, awaiting_since=time.time())
        return True

    def reap(self) -> list[str]:
        requeued = []
        for path in sorted(self.root.glob("*.json")):
            job_id = path.stem
            try:
                if self.get(job_id).status != "running":
                    continue  # cheap unlocked check first; re-checked under the lock
                with self._modify(job_id) as entry:
                    if entry["record"]["status"] != "running" or not _expired(entry):
                        continue
                    if self._settle_lost(entry) != "requeue":
                        continue
                    entry["record"].update(status="queued", updated_at=_now())
                    entry.update(
                        lease_token=None, lease_expires_at=None, awaiting_since=time.time()
                    )
                requeued.append(job_id)
            except JobNotFound:
                continue
        return requeued

    def awaiting_message(self, older_than_s: float = 0.0) -> list[str]:
        cutoff = time.time() - older_than_s
        ids = []
        for path in sorted(self.root.glob("*.json")):
            try:
                entry = self._read(path.stem)
            except JobNotFound:
                continue
            since = entry.get("awaiting_since")
            if entry["record"]["status"] == "queued" and since is not None and since <= cutoff:
                ids.append(path.stem)
        return ids

    def mark_enqueued(self, job_id: str) -> None:
        with self._modify(job_id) as entry:
            entry["awaiting_since"] = None

    # --- helpers -------------------------------------------------------------------------

    def _settle_lost(self, entry: dict[str, Any]) -> str:
        """A running job whose lease expired: cancel, fail (attempts used up) or "requeue"."""
        record = entry["record"]
        now = _now()
        if record["cancel_requested"]:
            record.update(status="cancelled", finished_at=now, updated_at=now)
            outcome = "cancelled"
        elif record["attempts"] >= self.max_attempts:
            record.update(
                status="failed",
                error=lost_error(record["attempts"]),
                finished_at=now,
                updated_at=now,
            )
            outcome = "exhausted"
        else:
            return "requeue"
        entry.update(lease_token=None, lease_expires_at=None)
        return outcome


def _expired(entry: dict[str, Any]) -> bool:
    expires = entry.get("lease_expires_at")
    return expires is None or expires <= time.time()


def _ours(entry: dict[str, Any], lease: Lease) -> bool:
    return entry["record"]["status"] == "running" and entry.get("lease_token") == lease.token


def _now() -> str:
    return utcnow().isoformat()
