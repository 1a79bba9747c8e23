"""A study as the service sees it: its record, its cells' job records, and what follows.

The study record (`StudyRecord`) is fixed at creation; everything else is read from the
cells' job records every time: each cell's status, the study's status, `results.json`
(`models.study.study_results`), and the report (`models.study.report.write_report`). So the
results and the report survive any process dying: no worker callback has to run for them.

The report is built on read and kept on disk under `root/{study_id}/{fingerprint}/`, the
fingerprint hashing every cell's (job id, status): a cell that finishes changes it, and the
next read builds the report again (progress of a running cell does not).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import Tensor

from models.config import TrainConfig
from models.data import DataError
from models.study.grid import Cell, cell_config
from models.study.report import write_report
from models.study.results import CellOutcome, study_results, study_status
from worker.jobs.record import JobRecord, StudyCell, StudyRecord

log = logging.getLogger(__name__)

# Reports of earlier fingerprints are deleted once this old (a reader may still hold one).
STALE_S = 600.0
# A cell whose job record was never created: the API stopped while storing the study (the
# file store only; a study's records are deleted together, `retention_s` after it ended).
MISSING = "missing"
MISSING_ERROR = "its job record is missing: the server stopped while creating the study"


class StudyNotReady(Exception):
    """The report needs at least one succeeded cell."""


class ReportUnavailable(RuntimeError):
    """The report cannot be built on this server (the MNIST test images cannot be read)."""


@dataclass(frozen=True)
class StudyView:
    """A study and its cells' job records, in the study's order (None where missing)."""

    study: StudyRecord
    records: list[JobRecord | None]

    @property
    def statuses(self) -> list[str]:
        """Each cell's job status, or "missing"."""
        return [MISSING if r is None else r.status for r in self.records]

    @property
    def status(self) -> str:
        """queued | running | succeeded | partial | failed | cancelled (a missing cell
        counts as failed)."""
        return study_status(["failed" if s == MISSING else s for s in self.statuses])

    @property
    def ended_at(self) -> datetime | None:
        """When its last cell ended; None while one is queued or running."""
        if any(r is not None and not r.finished for r in self.records):
            return None
        ends = [r.finished_at for r in self.records if r is not None and r.finished_at]
        return max(ends, default=self.study.created_at)

    @cached_property
    def fingerprint(self) -> str:
        """Changes exactly when a cell's job changes status (or a record goes missing)."""
        pairs = [[c.job_id, s] for c, s in zip(self.study.cells, self.statuses, strict=True)]
        return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]

    def outcomes(self, checkpoint: Callable[[str], Path | None]) -> list[CellOutcome]:
        """Each cell as `models.study` reads it; `checkpoint(model_id)` is the trained
        model's checkpoint (None when it is not listed)."""
        return [
            self._outcome(c, r, checkpoint)
            for c, r in zip(self.study.cells, self.records, strict=True)
        ]

    def results(self, checkpoint: Callable[[str], Path | None]) -> dict[str, Any]:
        """`results.json`: every cell with its numbers, and the summary per (objective, K)."""
        return study_results(self.outcomes(checkpoint), self.study.config)

    def _outcome(
        self,
        cell: StudyCell,
        record: JobRecord | None,
        checkpoint: Callable[[str], Path | None],
    ) -> CellOutcome:
        grid_cell = Cell(cell.objective, cell.k, cell.seed)
        if record is None:
            config = cell_config(TrainConfig.from_dict(self.study.config), grid_cell)
            return CellOutcome(
                grid_cell, "failed", config.to_dict(), None, MISSING_ERROR, cell.job_id
            )
        finished_model = record.model_id if record.status == "succeeded" else None
        return CellOutcome(
            cell=grid_cell,
            status=record.status,
            config=record.config,
            metrics=record.metrics,
            error=record.error,
            job_id=record.job_id,
            checkpoint=None if finished_model is None else checkpoint(finished_model),
        )


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
    ) -> None:
        self.root = Path(root)
        self.checkpoint = checkpoint
        self._load_test_images = test_images
        self._test_images: Tensor | None = None
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}

    def folder(self, view: StudyView) -> Path:
        """The report folder of the study as `view` shows it; `StudyNotReady` while no
        cell has succeeded."""
        if "succeeded" not in view.statuses:
            counts = {s: view.statuses.count(s) for s in dict.fromkeys(view.statuses)}
            raise StudyNotReady(
                "the report needs at least one succeeded cell; the cells are now "
                + ", ".join(f"{n} {status}" for status, n in counts.items())
            )
        study_dir = self.root / view.study.study_id
        target = study_dir / view.fingerprint
        if target.is_dir():
            return target
        with self._lock:
            building = self._building.setdefault(view.study.study_id, threading.Lock())
        with building:
            if not target.is_dir():
                self._build(view, target)
        return target

    def _build(self, view: StudyView, target: Path) -> None:
        outcomes = view.outcomes(self.checkpoint)
        checkpoints = {o.cell.name: o.checkpoint for o in outcomes if o.checkpoint is not None}
        results = study_results(outcomes, view.study.config)
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
        stale = time.time() - STALE_S
        for old in target.parent.iterdir():  # earlier fingerprints, and crashed builds
            with contextlib.suppress(FileNotFoundError):  # another process pruned it first
                if old != target and old.stat().st_mtime < stale:
                    shutil.rmtree(old, ignore_errors=True)

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
