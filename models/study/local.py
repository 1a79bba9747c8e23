"""A study on one machine: its cells one after another, each in its own folder.

`out_dir/cells/<cell name>/` holds a cell's checkpoint and metrics (`models.run`); a cell
whose metrics were written by a checkpoint of the same config is not run again, and a cell
interrupted in training resumes from its last epoch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.checkpoint import load_checkpoint
from models.config import TrainConfig
from models.data import Mnist
from models.progress import Callback, Progress, notify
from models.run import CHECKPOINT_NAME, METRICS_NAME, train_and_evaluate
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
    """Train and evaluate every cell of the grid, in order; one outcome per cell.

    `callbacks` see a "cell" `Progress` as each cell starts (`done` = its index in `cells`),
    then that cell's training and evaluation progress (`models.run`). A cell that raises is
    `failed` with the error and the study goes on. When a callback asks to stop, that cell
    is `cancelled`, the later ones stay `queued`, and nothing more runs.
    """
    configs = [cell_config(base, cell) for cell in cells]  # refuse a bad cell before training
    outcomes = []
    stopped = False
    for index, (cell, config) in enumerate(zip(cells, configs, strict=True)):
        outcome = CellOutcome(cell=cell, status="queued", config=config.to_dict(), metrics=None)
        outcomes.append(outcome)
        if stopped:
            continue
        if notify(callbacks, Progress("cell", index, len(cells))):
            stopped, outcome.status = True, "cancelled"
            continue
        folder = cell_dir(out_dir, cell)
        try:
            metrics = _finished_metrics(folder, config)
            if metrics is None:
                run = train_and_evaluate(config, data, folder, callbacks)
                stopped, metrics = run.stopped, run.metrics
        except Exception as exc:  # one failed cell does not end the study
            outcome.status, outcome.error = "failed", f"{type(exc).__name__}: {exc}"
            continue
        if stopped:
            outcome.status = "cancelled"
        else:
            outcome.status, outcome.metrics = "succeeded", metrics
            outcome.checkpoint = folder / CHECKPOINT_NAME
    return outcomes


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
