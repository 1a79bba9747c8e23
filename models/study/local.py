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
from models.curve import CURVE_NAME, CurveRecorder, CurveSpec, read_curve
from models.data import Mnist, binarized_test_images
from models.progress import Callback, Progress, notify
from models.run import CHECKPOINT_NAME, METRICS_NAME, train_and_evaluate
from models.stacked import stack_groups, stack_key, train_stacked
from models.study.grid import Cell, cell_config, shared_config
from models.study.report import write_report
from models.study.results import CellOutcome, study_results
from models.training import resolve_device

CELLS_DIR = "cells"


def cell_dir(out_dir: Path, cell: Cell) -> Path:
    return Path(out_dir) / CELLS_DIR / cell.name


def run_study(
    base: TrainConfig,
    cells: Sequence[Cell],
    data: Mnist,
    out_dir: Path,
    callbacks: Sequence[Callback] = (),
    curve: CurveSpec | None = None,
) -> list[CellOutcome]:
    """Train and evaluate every cell of the grid, a stacked group at a time; one outcome per
    cell, in the grid's order.

    `callbacks` see a "cell" `Progress` as each cell starts (`done` = its index in `cells`;
    all of a group's cells before it trains), then the cells' training and evaluation
    progress (`models.run`; the members of a group report in turn at every step). A cell
    that raises or diverges is `failed` with the error and the study goes on. When a callback
    asks to stop, that cell is `cancelled`, the cells not finished yet stay `queued`, and
    nothing more runs. With `curve`, each cell that trains stacked (every cell the fast path
    covers) records its learning curve in its folder (`models.curve`), and its metrics carry
    it as "learning_curve".
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
        if _run_group(members, data, callbacks, curve):
            break
    return outcomes


def study_outcomes(base: TrainConfig, cells: Sequence[Cell], out_dir: Path) -> list[CellOutcome]:
    """Where each cell stands in `out_dir`, training nothing: `succeeded` with its metrics
    when its folder holds a finished run of its config, `queued` otherwise."""
    outcomes = []
    for cell in cells:
        config = cell_config(base, cell)
        outcome = CellOutcome(cell=cell, status="queued", config=config.to_dict(), metrics=None)
        folder = cell_dir(out_dir, cell)
        metrics = _finished_metrics(folder, config)
        if metrics is not None:
            _succeed(_Cell(outcome, config, folder), metrics)
        outcomes.append(outcome)
    return outcomes


class _Cell(NamedTuple):
    outcome: CellOutcome
    config: TrainConfig
    folder: Path


def _run_group(
    cells: list[_Cell], data: Mnist, callbacks: Sequence[Callback], curve: CurveSpec | None
) -> bool:
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
    if len(pending) > 1 or (pending and curve and stack_key(pending[0].config) is not None):
        try:
            results = train_stacked(
                [c.config for c in pending],
                data.train_images,
                checkpoint_paths=[c.folder / CHECKPOINT_NAME for c in pending],
                callbacks=[callbacks] * len(pending),
                epoch_ends=_curve_recorders(pending, data, curve),
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


def _curve_recorders(
    cells: list[_Cell], data: Mnist, curve: CurveSpec | None
) -> list[CurveRecorder | None]:
    """Each cell's learning-curve recorder, all on one copy of the curve's test images."""
    if curve is None:
        return [None] * len(cells)
    device = resolve_device(cells[0].config.device)  # one stack group: one device
    test_x = binarized_test_images(data.test_images[: curve.size]).to(device)
    return [CurveRecorder(curve, test_x, c.config.seed, c.folder / CURVE_NAME) for c in cells]


def _succeed(cell: _Cell, metrics: dict[str, Any] | None) -> None:
    points = read_curve(cell.folder / CURVE_NAME)
    if metrics is not None and points:
        metrics = metrics | {"learning_curve": points}
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
