"""Study reports built on read and kept on disk, one folder per state of the study's cells.

The service builds a study's report (`models.study.report.write_report`) when it is first
asked for, from what its `ReportSource` says the cells are now, and keeps it under
`root/{study_id}/{fingerprint}/`: the fingerprint changes when a cell changes status, and
the next read builds the report again (progress of a running cell does not change it).
Each build also deletes the folders of studies not built for `retention_s` (their records
expire after as long), so the folder does not grow with every study ever reported.
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
from models.study.report import write_report
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
    study.md), built on first read for the study's fingerprint and kept under `root`.

    Safe from many threads (one builds a study at a time; the others wait and reuse it) and
    many processes (a build goes to a temporary folder renamed into place whole).
    """

    def __init__(
        self,
        root: Path,
        checkpoint: Callable[[str], Path | None],
        test_images: Callable[[], Tensor],
        retention_s: float = float("inf"),
    ) -> None:
        self.root = Path(root)
        self.retention_s = retention_s
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
                self._build(view, target)
        return target

    def _build(self, view: ReportSource, target: Path) -> None:
        outcomes = view.outcomes(self.checkpoint)
        checkpoints = {o.cell.name: o.checkpoint for o in outcomes if o.checkpoint is not None}
        results = study_results(outcomes, view.base_config)
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
        try:
            write_report(results, checkpoints, self.test_images(), scratch)
            os.rename(scratch, target)  # whole, or not at all (another process was first)
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _prune(target.parent, time.time() - STALE_S, keep=target)  # earlier fingerprints
        _prune(self.root, time.time() - self.retention_s, keep=target.parent)  # old studies

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


def _prune(folder: Path, before: float, keep: Path) -> None:
    """Delete the entries of `folder` but `keep` last modified before `before` (a time)."""
    for old in folder.iterdir():
        with contextlib.suppress(FileNotFoundError):  # another process pruned it first
            if old != keep and old.stat().st_mtime < before:
                shutil.rmtree(old, ignore_errors=True)
