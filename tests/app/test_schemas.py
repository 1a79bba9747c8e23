"""Tests for app.schemas: a training request's config (defaults, preset, the flat model
fields, refused combinations), the study request built from it, and the response bodies read
from the job store's records."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from app.schemas import JobOut, ProgressOut, StudyOut, StudyRequest, StudySummaryOut, TrainRequest
from models.config import ModelConfig, TrainConfig
from models.study.grid import CELL_FIELDS, STUDY_SNR_DRAWS
from worker.jobs import JobRecord, StudyCell, StudyRecord, StudyView

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

# --- TrainRequest ---------------------------------------------------------------------------


def test_a_request_of_k_alone_is_the_default_config() -> None:
    assert TrainRequest(k=5).to_config() == TrainConfig(k=5).to_dict()


def test_fields_given_win_over_the_preset_and_defaults_do_not() -> None:
    burda = TrainRequest(k=50, preset="burda").to_config()
    assert (burda["batch_size"], burda["epochs"], burda["init"]) == (20, 3280, "burda")

    # batch_size given equal to its default still wins; epochs, not given, is the preset's.
    given = TrainRequest(k=50, preset="burda", batch_size=100).to_config()
    assert (given["batch_size"], given["epochs"]) == (100, 3280)


def test_the_flat_model_fields_are_the_config_s_model() -> None:
    body = TrainRequest(k=5, layers=2, hidden_dim=200, z1_dim=100, hidden2_dim=100)
    model = ModelConfig(layers=2, hidden_dim=200, z1_dim=100, hidden2_dim=100)
    assert body.to_config() == TrainConfig(k=5, model=model).to_dict()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"alpha": 0.5}, "alpha applies only"),
        ({"k_schedule": "linear", "k_min": 6}, "k_min must lie"),
        ({"k_schedule": "ess", "train_size": 100}, "train_size must exceed batch_size"),
        ({"layers": 1, "z1_dim": 100}, "z1_dim and hidden2_dim need layers=2"),
    ],
)
def test_combinations_the_config_refuses_are_validation_errors(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainRequest(k=5, **fields)


def test_fields_of_no_request_are_refused() -> None:
    for extra in ({"device": "cuda"}, {"learning_rte": 0.01}):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            TrainRequest(k=5, **extra)


# --- StudyRequest ---------------------------------------------------------------------------


def test_a_study_takes_lists_for_the_cells_and_every_other_train_field() -> None:
    study = StudyRequest(ks=[5, 50])

    assert (study.objectives, study.seeds) == (["vae", "iwae"], [0])
    assert study.snr_draws == STUDY_SNR_DRAWS  # on by default, unlike a single job's
    for name, field in TrainRequest.model_fields.items():
        if name not in CELL_FIELDS and name != "snr_draws":
            assert StudyRequest.model_fields[name].default == field.default, name
    for bad in ({"k": 5}, {"epochs": 0}, {"alpha": 1.0}):
        with pytest.raises(ValidationError):
            StudyRequest(ks=[5], **bad)


# --- response bodies from records -----------------------------------------------------------


def record(job_id: str, status: str, **fields: Any) -> JobRecord:
    config = TrainConfig(k=5).to_dict()
    return JobRecord(
        job_id=job_id, status=status, config=config, created_at=NOW, updated_at=NOW, **fields
    )


def test_a_job_out_shows_every_field_of_its_record() -> None:
    job = record("j1", "running", progress={"phase": "train", "epoch": 1, "step": 3, "k": 5})
    job = job.model_copy(update={"attempts": 2, "worker": "host:1", "study_id": "s1"})

    out = JobOut.of(job)
    assert out.progress == ProgressOut(phase="train", epoch=1, step=3, k=5)
    assert out.waiting_for is None  # set by the route, not by the record
    assert out.model_dump(exclude={"progress", "waiting_for"}) == job.model_dump(
        exclude={"progress"}
    )


def study_view() -> StudyView:
    cells = [
        StudyCell(objective="iwae", k=5, seed=0, job_id="j1"),
        StudyCell(objective="iwae", k=5, seed=1, job_id="j2"),
        StudyCell(objective="vae", k=50, seed=0, job_id="j3"),
        StudyCell(objective="vae", k=50, seed=1, job_id="j4"),
    ]
    study = StudyRecord(study_id="s1", config={"epochs": 1}, cells=cells, created_at=NOW)
    records = [
        record("j1", "succeeded", model_id="m1"),
        record("j2", "failed", error="boom"),
        None,  # never created
        record("j4", "succeeded", model_id="m4"),
    ]
    return StudyView(study=study, records=records)


def test_a_study_summary_counts_its_cells_by_status_and_lists_its_grid() -> None:
    summary = StudySummaryOut.of(study_view())

    assert summary.cells == {"succeeded": 2, "failed": 1, "missing": 1}
    assert (summary.ks, summary.objectives, summary.seeds) == ([5, 50], ["iwae", "vae"], [0, 1])
    assert (summary.study_id, summary.status, summary.created_at) == ("s1", "partial", NOW)


def test_a_study_shows_each_cell_with_its_job_s_outcome() -> None:
    out = StudyOut.of(study_view(), results={"cells": []})

    assert [(c.job_id, c.status, c.model_id, c.error) for c in out.cells] == [
        ("j1", "succeeded", "m1", None),
        ("j2", "failed", None, "boom"),
        ("j3", "missing", None, None),
        ("j4", "succeeded", "m4", None),
    ]
    assert (out.config, out.results) == ({"epochs": 1}, {"cells": []})
