"""A study on one machine: its cells in groups that train stacked, each cell in its own folder.

`out_dir/cells/<cell name>/` holds a cell's checkpoint and metrics (`models.run`); a cell
whose metrics were written by a checkpoint of the same config is not run again, and a cell
interrupted in training resumes from its last epoch. Cells whose training steps have the
same shapes (seeds, and objectives drawing as many samples at one K) train together as one
stacked model (`models.stacked`), each ending where it would alone; then each is evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from models.checkpoint import load_checkpoint
from models.config import TrainConfig
from models.data import Mnist
from models.progress import Callback, Progress, notify
from models.run import CHECKPOINT_NAME, METRICS_NAME, train_and_evaluate
from models.stacked import stack_groups, train_stacked
from models.study.grid import Cell, cell_config, shared_config
from models.study.report import write_report
from models.study.results import CellOutcome, study_results

CELLS_DIR = "cells"


def cell_dir(out_dir: Path, cell: Cell) -> Path:
    return Path(out_dir) / CELLS_DIR / cell.name


def run_study(
    base: TrainConfig,
    cells: Sequence[Cell],
    data: Mnist,
    out_dir: Path,
    callbacks: Sequence[Callback] = (),
) -> list[CellOutcome]:
    """Train and evaluate every cell of the grid, a stacked group at a time; one outcome per
    cell, in the grid's order.

    `callbacks` see a "cell" `Progress` as each cell starts (`done` = its index in `cells`;
    all of a group's cells before it trains), then the cells' training and evaluation
    progress (`models.run`; the members of a group report in turn at every step). A cell
    that raises or diverges is `failed` with the error and the study goes on. When a callback
    asks to stop, that cell is `cancelled`, the cells not finished yet stay `queued`, and
    nothing more runs.
    """
    configs = [cell_config(base, cell) for cell in cells]  # refuse a bad cell before training
    outcomes = [
        CellOutcome(cell=cell, status="queued", config=config.to_dict(), metrics=None)
        for cell, config in zip(cells, configs, strict=True)
    ]
    for group in stack_groups(configs):
        for index in group:
            if notify(callbacks, Progress("cell", index, len(cells))):
                outcomes[index].status = "cancelled"
                return outcomes
        members = [_Cell(outcomes[i], configs[i], cell_dir(out_dir, cells[i])) for i in group]
        if _run_group(members, data, callbacks):
            break
    return outcomes


class _Cell(NamedTuple):
    outcome: CellOutcome
    config: TrainConfig
    folder: Path


def _run_group(cells: list[_Cell], data: Mnist, callbacks: Sequence[Callback]) -> bool:
    """Train a group's unfinished cells stacked, then evaluate each; True when stopped."""
    pending = []
    for cell in cells:
        try:
            metrics = _finished_metrics(cell.folder, cell.config)
        except Exception as exc:  # one failed cell does not end the study
            _fail(cell.outcome, exc)
            continue
        if metrics is None:
            pending.append(cell)
        else:
            _succeed(cell, metrics)
    if len(pending) > 1:
        try:
            results = train_stacked(
                [c.config for c in pending],
                data.train_images,
                checkpoint_paths=[c.folder / CHECKPOINT_NAME for c in pending],
                callbacks=[callbacks] * len(pending),
            )
        except Exception as exc:
            for cell in pending:
                _fail(cell.outcome, exc)
            return False
        for cell, result in zip(pending, results, strict=True):
            if result.error is not None:
                cell.outcome.status, cell.outcome.error = "failed", result.error
            elif result.stopped:
                cell.outcome.status = "cancelled"
        if any(result.stopped for result in results):
            return True  # the cells trained to the end stay queued: evaluated on resume
        pending = [c for c in pending if c.outcome.status == "queued"]
    for cell in pending:  # train_and_evaluate finds a finished group's checkpoints: it evaluates
        try:
            run = train_and_evaluate(cell.config, data, cell.folder, callbacks)
        except Exception as exc:
            _fail(cell.outcome, exc)
            continue
        if run.stopped:
            cell.outcome.status = "cancelled"
            return True
        _succeed(cell, run.metrics)
    return False


def _succeed(cell: _Cell, metrics: dict[str, Any] | None) -> None:
    cell.outcome.status, cell.outcome.metrics = "succeeded", metrics
    cell.outcome.checkpoint = cell.folder / CHECKPOINT_NAME


def _fail(outcome: CellOutcome, exc: Exception) -> None:
    outcome.status, outcome.error = "failed", f"{type(exc).__name__}: {exc}"


def _finished_metrics(folder: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The metrics of a finished run of `config` in `folder`, None when there is none."""
    checkpoint, metrics = folder / CHECKPOINT_NAME, folder / METRICS_NAME
    if not (checkpoint.is_file() and metrics.is_file()):
        return None
    if load_checkpoint(checkpoint).config != config:
        return None
    return json.loads(metrics.read_text())


def write_study(
    base: TrainConfig, outcomes: Sequence[CellOutcome], data: Mnist, out_dir: Path
) -> dict[str, Any]:
    """results.json, report.html, figures/ and study.md of the outcomes in `out_dir`;
    returns the results."""
    results = study_results(outcomes, shared_config(base))
    checkpoints = {
        o.cell.name: o.checkpoint
        for o in outcomes
        if o.status == "succeeded" and o.checkpoint is not None
    }
    write_report(results, checkpoints, data.test_images, Path(out_dir))
    return results
