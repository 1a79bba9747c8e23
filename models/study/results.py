"""What a K study found: each cell's outcome, the study's status, and `results.json`.

Every number of the report comes from `study_results`, which keeps each cell's metrics
with the config and seed that produced them, and summarizes each (objective, K) by the
mean and the standard deviation over its succeeded seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.snr import loglog_slope
from models.spread import mean_sd
from models.status import STATUSES, StudyStatus
from models.study.grid import Cell

# The metrics of a cell kept in results.json (the per-epoch loss and K histories are left
# out; the learning curve, a few points of the test bound, is kept).
CELL_METRICS = (
    "test_loglik",
    "test_loglik_std_error",
    "test_elbo",
    "test_gap",
    "active_units",
    "eval_k",
    "eval_size",
    "mc_std_error_mean",
    "ess_mean",
    "pareto_k_mean",
    "pareto_k_above_0_7",
    "train_seconds",
    "epochs",
    "steps",
    "seconds_per_epoch",
    "images_per_s",
    "gradient_snr",
    "imputation",
    "learning_curve",
)


@dataclass
class CellOutcome:
    """Where one cell stands. `config` is its full `TrainConfig` as a dict; `metrics` the
    run's metrics once it succeeded; `checkpoint` its model.safetensors."""

    cell: Cell
    status: str
    config: dict[str, Any]
    metrics: dict[str, Any] | None
    error: str | None = None
    job_id: str | None = None
    checkpoint: Path | None = None


def study_status(statuses: Sequence[str]) -> StudyStatus:
    """The study's status from its cells' job statuses.

    queued while no cell has started; running while any cell is unfinished and one has
    started or ended; once all have ended: cancelled if any was cancelled, succeeded if
    all succeeded, partial if some succeeded and others failed, failed if none succeeded.
    """
    if not statuses:
        raise ValueError("a study has at least one cell")
    unknown = set(statuses) - set(STATUSES)
    if unknown:
        raise ValueError(f"unknown cell statuses {sorted(unknown)}")
    if all(s == "queued" for s in statuses):
        return "queued"
    if any(s in ("queued", "running") for s in statuses):
        return "running"
    if "cancelled" in statuses:
        return "cancelled"
    if all(s == "succeeded" for s in statuses):
        return "succeeded"
    return "partial" if "succeeded" in statuses else "failed"


# The study's SNR summary: the root-mean-square over parameters of the bias-corrected SNR
# (`models.snr.SNRSummary.rms`), unbiased at the SNR^2 level before one square root; the
# median of each parameter's clipped square root reads low at small SNR (a true 0.1 read
# 0.024-0.033 from 100 draws, the RMS 0.099-0.103: tests/models/test_snr.py).
SNR_SUMMARY = "rms"


def _snr(network: str) -> Callable[[dict[str, Any]], float | None]:
    def read(metrics: dict[str, Any]) -> float | None:
        snr = metrics.get("gradient_snr")
        # A record written before the summary existed has none: not measured, not an error.
        return None if snr is None else snr[network].get(SNR_SUMMARY)

    return read


def _total_units(metrics: dict[str, Any]) -> float | None:
    units = metrics.get("active_units")
    return None if units is None else float(sum(units))


# The summarized quantities: name -> how to read it from a cell's metrics (None: not measured).
SUMMARY_METRICS: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "test_loglik": lambda m: m.get("test_loglik"),
    "test_elbo": lambda m: m.get("test_elbo"),
    "test_gap": lambda m: m.get("test_gap"),
    "active_units": _total_units,
    "seconds_per_epoch": lambda m: m.get("seconds_per_epoch"),
    "images_per_s": lambda m: m.get("images_per_s"),
    "snr_encoder": _snr("encoder"),
    "snr_decoder": _snr("decoder"),
}


def study_results(outcomes: Sequence[CellOutcome], base_config: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready results of a study (results.json).

    {"config": base_config, "status", "cells": [one per outcome: name, objective, k, seed,
    status, job_id, error, config, metrics (the `CELL_METRICS` measured)], "summary": [one
    per (objective, k) in grid order, over its succeeded cells: n, seeds, and {"mean", "sd",
    "n"} of each of `SUMMARY_METRICS` plus "active_units_per_layer" (a list, bottom layer
    first)], "snr_slopes": {objective: {"encoder", "decoder"}}, "learning_curves": [one per
    (objective, k) whose cells recorded a learning curve: eval_k, images, epochs,
    test_bound: [{"mean", "sd", "n"} per epoch]]}.

    The SNR slopes are least-squares fits of log SNR (`SNR_SUMMARY` over parameters) against log K
    over every succeeded cell of the objective (Rainforth et al., 2018, theorem 1: about
    -1/2 for IWAE's encoder and +1/2 for its decoder); None with fewer than two K.
    """
    groups: dict[tuple[str, int], list[CellOutcome]] = {}
    for outcome in outcomes:
        groups.setdefault((outcome.cell.objective, outcome.cell.k), []).append(outcome)
    summary = []
    for (objective, k), group in groups.items():
        succeeded = _succeeded(group)
        done = [o.metrics for o in succeeded]
        row: dict[str, Any] = {
            "objective": objective,
            "k": k,
            "n": len(done),
            "seeds": [o.cell.seed for o in succeeded],
        }
        for name, read in SUMMARY_METRICS.items():
            row[name] = mean_sd([v for m in done if (v := read(m)) is not None])
        per_layer = [m["active_units"] for m in done if m.get("active_units") is not None]
        row["active_units_per_layer"] = [
            mean_sd(list(layer)) for layer in zip(*per_layer, strict=True)
        ]
        summary.append(row)
    return {
        "config": base_config,
        "status": study_status([o.status for o in outcomes]),
        "cells": [_cell_entry(o) for o in outcomes],
        "summary": summary,
        "snr_slopes": _snr_slopes(outcomes),
        "learning_curves": _learning_curves(groups),
    }


def _learning_curves(groups: dict[tuple[str, int], list[CellOutcome]]) -> list[dict[str, Any]]:
    """Per (objective, K) with a learning curve: at each epoch that every succeeded seed
    recorded, the mean and sd over seeds of the curve's test bound (`models.curve`)."""
    curves = []
    for (objective, k), group in groups.items():
        recorded = [o.metrics.get("learning_curve") for o in _succeeded(group)]
        recorded = [points for points in recorded if points]
        if not recorded:
            continue
        per_seed = [{p["epoch"]: p["test_bound"] for p in points} for points in recorded]
        epochs = sorted(set.intersection(*(set(points) for points in per_seed)))
        curves.append(
            {
                "objective": objective,
                "k": k,
                "eval_k": recorded[0][0]["k"],
                "images": recorded[0][0]["images"],
                "epochs": epochs,
                "test_bound": [mean_sd([points[e] for points in per_seed]) for e in epochs],
            }
        )
    return curves


def _succeeded(outcomes: Sequence[CellOutcome]) -> list[CellOutcome]:
    return [o for o in outcomes if o.status == "succeeded" and o.metrics is not None]


def _cell_entry(outcome: CellOutcome) -> dict[str, Any]:
    metrics = outcome.metrics
    return {
        "name": outcome.cell.name,
        "objective": outcome.cell.objective,
        "k": outcome.cell.k,
        "seed": outcome.cell.seed,
        "status": outcome.status,
        "job_id": outcome.job_id,
        "error": outcome.error,
        "config": outcome.config,
        "metrics": None
        if metrics is None
        else {name: metrics[name] for name in CELL_METRICS if name in metrics},
    }


def _snr_slopes(outcomes: Sequence[CellOutcome]) -> dict[str, dict[str, float | None]]:
    slopes = {}
    for objective in dict.fromkeys(o.cell.objective for o in outcomes):
        slopes[objective] = {}
        for network in ("encoder", "decoder"):
            read = SUMMARY_METRICS[f"snr_{network}"]
            points = [
                (o.cell.k, v)
                for o in _succeeded(outcomes)
                if o.cell.objective == objective and (v := read(o.metrics)) is not None
            ]
            ks, values = [p[0] for p in points], [p[1] for p in points]
            slopes[objective][network] = loglog_slope(ks, values) if len(set(ks)) > 1 else None
    return slopes
