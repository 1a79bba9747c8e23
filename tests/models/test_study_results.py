"""A study's status from its cells, and its results: every cell, summaries over seeds."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from models.study.grid import Cell
from models.study.results import STATUSES, CellOutcome, study_results, study_status


def metrics(loglik: float, units: list[int], enc: float, dec: float, **extra) -> dict:
    return {
        "test_loglik": loglik,
        "test_loglik_std_error": 0.5,
        "test_elbo": loglik - 4.0,
        "test_gap": 4.0,
        "active_units": units,
        "seconds_per_epoch": 2.0,
        "images_per_s": 100.0,
        "gradient_snr": {
            "encoder": {"median": 1.0, "rms": enc, "direction": 1.0, "parameters": 9},
            "decoder": {"median": 1.0, "rms": dec, "direction": 1.0, "parameters": 9},
        },
        "k_per_epoch": [1, 1],
        **extra,
    }


def outcome(objective: str, k: int, seed: int, m: dict | None, status: str = "succeeded"):
    return CellOutcome(
        cell=Cell(objective, k, seed),
        status=status,
        config={"objective": objective, "k": k, "seed": seed},
        metrics=m,
        error="boom" if status == "failed" else None,
        job_id=f"job-{objective}-{k}-{seed}",
    )


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (["queued"], "queued"),
        (["queued", "queued"], "queued"),
        (["running"], "running"),
        (["queued", "running"], "running"),
        (["queued", "succeeded"], "running"),  # one ended, the rest still to run
        (["queued", "failed"], "running"),
        (["queued", "cancelled"], "running"),
        (["running", "succeeded", "failed"], "running"),
        (["succeeded"], "succeeded"),
        (["succeeded", "succeeded"], "succeeded"),
        (["succeeded", "failed"], "partial"),
        (["failed"], "failed"),
        (["failed", "failed"], "failed"),
        (["cancelled"], "cancelled"),
        (["succeeded", "cancelled"], "cancelled"),
        (["failed", "cancelled"], "cancelled"),
        (["succeeded", "failed", "cancelled"], "cancelled"),
    ],
)
def test_study_status(statuses, expected):
    assert study_status(statuses) == expected
    assert study_status(list(reversed(statuses))) == expected


def test_every_combination_of_two_cells_has_a_status_that_follows_the_rules():
    for pair in itertools.product(STATUSES, repeat=2):
        status = study_status(pair)
        unfinished = {"queued", "running"} & set(pair)
        assert (status in ("queued", "running")) == bool(unfinished), pair
        if status == "succeeded":
            assert pair == ("succeeded", "succeeded")


def test_a_study_without_cells_or_with_an_unknown_status_is_refused():
    with pytest.raises(ValueError, match="at least one cell"):
        study_status([])
    with pytest.raises(ValueError, match="unknown cell statuses"):
        study_status(["succeeded", "lost"])


def test_the_summary_is_the_mean_and_sample_sd_over_seeds():
    outcomes = [
        outcome("iwae", 5, 0, metrics(-90.0, [20, 4], 0.5, 2.0)),
        outcome("iwae", 5, 1, metrics(-91.0, [22, 5], 0.3, 4.0)),
        outcome("iwae", 5, 2, metrics(-95.0, [24, 6], 0.1, 6.0)),
    ]
    [row] = study_results(outcomes, {"epochs": 1})["summary"]

    assert (row["objective"], row["k"], row["n"], row["seeds"]) == ("iwae", 5, 3, [0, 1, 2])
    # -90, -91, -95: mean -92, squared deviations 4 + 1 + 9 over n - 1 = 2.
    assert row["test_loglik"] == {"mean": -92.0, "sd": pytest.approx(math.sqrt(7.0)), "n": 3}
    assert row["test_elbo"]["mean"] == -96.0
    # Totals 24, 27, 30: mean 27, sd 3.
    assert row["active_units"] == {"mean": 27.0, "sd": 3.0, "n": 3}
    assert row["active_units_per_layer"] == [
        {"mean": 22.0, "sd": 2.0, "n": 3},
        {"mean": 5.0, "sd": 1.0, "n": 3},
    ]
    assert row["snr_encoder"]["mean"] == pytest.approx(0.3)
    assert row["snr_encoder"]["sd"] == pytest.approx(0.2)
    assert row["snr_decoder"] == {"mean": 4.0, "sd": 2.0, "n": 3}
    assert row["seconds_per_epoch"] == {"mean": 2.0, "sd": 0.0, "n": 3}


def test_a_failed_cell_is_listed_with_its_error_and_the_others_still_summarized():
    outcomes = [
        outcome("vae", 1, 0, metrics(-100.0, [10], 1.0, 1.0)),
        outcome("vae", 1, 1, None, status="failed"),
        outcome("vae", 5, 0, None, status="failed"),
    ]
    results = study_results(outcomes, {})

    assert results["status"] == "partial"
    failed = [c for c in results["cells"] if c["status"] == "failed"]
    assert [(c["name"], c["error"], c["metrics"]) for c in failed] == [
        ("vae-k1-s1", "boom", None),
        ("vae-k5-s0", "boom", None),
    ]
    first, second = results["summary"]
    assert (first["k"], first["n"], first["seeds"]) == (1, 1, [0])
    assert first["test_loglik"] == {"mean": -100.0, "sd": None, "n": 1}  # no sd of one value
    assert (second["k"], second["n"]) == (5, 0)
    assert second["test_loglik"] == {"mean": None, "sd": None, "n": 0}
    assert second["active_units_per_layer"] == []


def test_a_cell_keeps_its_config_seed_and_measured_metrics_only():
    results = study_results([outcome("iwae", 5, 3, metrics(-90.0, [20], 0.5, 2.0))], {"a": 1})

    assert results["config"] == {"a": 1}
    [cell] = results["cells"]
    assert cell["config"] == {"objective": "iwae", "k": 5, "seed": 3}
    assert (cell["seed"], cell["job_id"], cell["error"]) == (3, "job-iwae-5-3", None)
    assert cell["metrics"]["test_loglik"] == -90.0
    assert cell["metrics"]["gradient_snr"]["encoder"]["rms"] == 0.5
    assert "k_per_epoch" not in cell["metrics"]  # per-epoch histories stay in metrics.json
    json.dumps(results, allow_nan=False)


def test_unmeasured_quantities_are_summarized_as_missing():
    bare = {"train_seconds": 1.0, "seconds_per_epoch": 1.0, "images_per_s": 40.0}
    [row] = study_results([outcome("vae", 1, 0, bare)], {})["summary"]

    assert row["n"] == 1
    assert row["test_loglik"]["n"] == 0 and row["snr_encoder"]["mean"] is None
    assert row["images_per_s"]["mean"] == 40.0


def test_snr_slopes_fit_every_succeeded_cell_of_an_objective():
    # Encoder SNR = K^(-1/2) and decoder SNR = 3 K^(1/2) exactly, two seeds each.
    outcomes = [
        outcome("iwae", k, s, metrics(-90.0, [20], k**-0.5, 3 * k**0.5))
        for k in (1, 4, 100)
        for s in (0, 1)
    ]
    outcomes.append(outcome("iwae", 1000, 0, None, status="failed"))
    outcomes.append(outcome("vae", 5, 0, metrics(-95.0, [10], 0.2, 1.0)))
    slopes = study_results(outcomes, {})["snr_slopes"]

    assert slopes["iwae"]["encoder"] == pytest.approx(-0.5)
    assert slopes["iwae"]["decoder"] == pytest.approx(0.5)
    assert slopes["vae"] == {"encoder": None, "decoder": None}  # one K: no slope
