"""A study as the service sees it: its record, its cells' job records, and what follows.

The study record (`StudyRecord`) is fixed at creation; everything else is read from the
cells' job records every time: each cell's status, the study's status, `results.json`
(`models.study.study_results`), and the report (`models.study.report.write_report`). So the
results and the report survive any process dying: no worker callback has to run for them.

The report is built on read from a `StudyView` and kept on disk by
`models.study.cache.StudyReports`, under the view's `fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from models.config import TrainConfig
from models.study.grid import Cell, cell_config
from models.study.results import CellOutcome, study_results, study_status
from worker.jobs.record import JobRecord, StudyCell, StudyRecord

log = logging.getLogger(__name__)

# A cell whose job record was never created: the API stopped while storing the study (the
# file store only; a study's records are deleted together, `retention_s` after it ended).
MISSING = "missing"
MISSING_ERROR = "its job record is missing: the server stopped while creating the study"


@dataclass(frozen=True)
class StudyView:
    """A study and its cells' job records, in the study's order (None where missing)."""

    study: StudyRecord
    records: list[JobRecord | None]

    @property
    def study_id(self) -> str:
        return self.study.study_id

    @property
    def base_config(self) -> dict[str, Any]:
        """The study's base training options, as `results.json` reports them."""
        return self.study.config

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
