"""Study reports built on read and kept in the storage, one folder per state of the study's
cells.

The service builds a study's report (`models.study.report.write_report`) when it is first
asked for, from what its `ReportSource` says the cells are now, and keeps it in the storage
under `studies/{study_id}/{fingerprint}/` (`models.storage.layout`): the fingerprint changes
when a cell changes status, and the next read builds the report again (progress of a running
cell does not change it). With an object store, each API host also keeps the reports it
served in a local cache folder, and a report another host built is downloaded, not rebuilt.
Each build also deletes the reports of studies not built for `retention_s` (their records
expire after as long), so the reports do not grow with every study ever reported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from models.data import DataError
from models.files import write_atomic
from models.storage import Storage
from models.storage.layout import STUDIES, report_prefix
from models.study.report import REPORT_NAME, write_report
from models.study.results import CellOutcome, study_results

log = logging.getLogger(__name__)

# Reports of earlier fingerprints are deleted once this old (a reader may still hold one).
STALE_S = 600.0


class StudyNotReady(Exception):
    """The report needs at least one succeeded cell."""


class ReportUnavailable(RuntimeError):
    """The report cannot be built on this server (the MNIST test images cannot be read)."""


class ReportSource(Protocol):
    """A study as its report needs it (the job store's `StudyView`)."""

    @property
    def study_id(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def statuses(self) -> list[str]: ...

    @property
    def base_config(self) -> dict[str, Any]: ...

    def outcomes(self, checkpoint: Callable[[str], Path | None]) -> list[CellOutcome]: ...


class StudyReports:
    """Each study's report folder (`write_report`'s: report.html, results.json, figures/,
    study.md), built on first read for the study's fingerprint and kept in `storage`; a
    local folder of it (under `cache_dir` when the storage is an object store) is served.

    Safe from many threads (one builds a study at a time; the others wait and reuse it) and
    many processes (a build goes to a temporary folder renamed into place whole; to an
    object store, `report.html` is uploaded last, so a report whose `report.html` is there
    is whole).
    """

    def __init__(
        self,
        storage: Storage,
        cache_dir: Path,
        checkpoint: Callable[[str], Path | None],
        test_images: Callable[[], Tensor],
        retention_s: float = float("inf"),
    ) -> None:
        self.storage = storage
        self.retention_s = retention_s
        local = storage.local_path(STUDIES)
        self.remote = local is None
        self.root = Path(cache_dir) / STUDIES if local is None else local
        self.checkpoint = checkpoint
        self._load_test_images = test_images
        self._test_images: Tensor | None = None
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}

    def folder(self, view: ReportSource) -> Path:
        """The report folder of the study as `view` shows it; `StudyNotReady` while no
        cell has succeeded."""
        if "succeeded" not in view.statuses:
            counts = {s: view.statuses.count(s) for s in dict.fromkeys(view.statuses)}
            raise StudyNotReady(
                "the report needs at least one succeeded cell; the cells are now "
                + ", ".join(f"{n} {status}" for status, n in counts.items())
            )
        study_dir = self.root / view.study_id
        target = study_dir / view.fingerprint
        if target.is_dir():
            return target
        with self._lock:
            building = self._building.setdefault(view.study_id, threading.Lock())
        with building:
            if not target.is_dir():
                self._make(view, target)
        return target

    def _make(self, view: ReportSource, target: Path) -> None:
        """Fill `target` whole: with the stored report, or a new build stored first."""
        prefix = report_prefix(view.study_id, view.fingerprint)
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
        try:
            if not self._download(prefix, scratch):
                self._build(view, scratch)
                if self.remote:
                    self._upload(prefix, scratch)
            os.rename(scratch, target)  # whole, or not at all (another process was first)
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self._prune(view.study_id, prefix, target)

    def _build(self, view: ReportSource, scratch: Path) -> None:
        outcomes = view.outcomes(self.checkpoint)
        checkpoints = {o.cell.name: o.checkpoint for o in outcomes if o.checkpoint is not None}
        results = study_results(outcomes, view.base_config)
        write_report(results, checkpoints, self.test_images(), scratch)

    def _download(self, prefix: str, scratch: Path) -> bool:
        """Copy the stored report into `scratch`; False when there is none whole."""
        if not self.remote:
            return False
        objects = self.storage.list(prefix)
        if prefix + REPORT_NAME not in {o.key for o in objects}:
            return False
        for item in objects:
            data = self.storage.get(item.key)
            if data is None:  # pruned meanwhile: build it instead
                return False
            write_atomic(scratch.joinpath(*item.key[len(prefix) :].split("/")), data)
        return True

    def _upload(self, prefix: str, scratch: Path) -> None:
        files = [p for p in scratch.rglob("*") if p.is_file()]
        for path in sorted(files, key=lambda p: p.name == REPORT_NAME):  # report.html last
            self.storage.put(prefix + path.relative_to(scratch).as_posix(), path.read_bytes())

    def _prune(self, study_id: str, prefix: str, target: Path) -> None:
        """Delete earlier fingerprints' reports, and crashed builds, once `STALE_S` old, and
        other studies' reports not built for `retention_s`."""
        stale = time.time() - STALE_S
        _prune_folder(target.parent, stale, keep=target)
        expired = time.time() - self.retention_s
        _prune_folder(self.root, expired, keep=target.parent)
        if self.remote:
            for item in self.storage.list(report_prefix(study_id)):
                if not item.key.startswith(prefix) and item.modified < stale:
                    self.storage.delete(item.key)
            for item in self.storage.list(f"{STUDIES}/"):
                if not item.key.startswith(report_prefix(study_id)) and item.modified < expired:
                    self.storage.delete(item.key)

    def test_images(self) -> Tensor:
        """The MNIST test images `[10000, 784]`, read once."""
        with self._lock:
            if self._test_images is None:
                try:
                    self._test_images = self._load_test_images()
                except (DataError, OSError) as exc:
                    log.error("cannot read the MNIST test images: %s", exc)
                    raise ReportUnavailable(
                        "the report needs the MNIST test images, which this server cannot "
                        "read (see its log)"
                    ) from exc
            return self._test_images


def _prune_folder(folder: Path, before: float, keep: Path) -> None:
    """Delete the entries of `folder` but `keep` last modified before `before` (a time)."""
    for old in folder.iterdir():
        with contextlib.suppress(FileNotFoundError):  # another process pruned it first
            if old != keep and old.stat().st_mtime < before:
                shutil.rmtree(old, ignore_errors=True)
