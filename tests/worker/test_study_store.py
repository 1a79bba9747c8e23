"""Studies in both job stores: stored with their jobs at once, read back with them, listed,
cancelled; and what a crash between the study and its jobs leaves."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from models.config import TrainConfig
from worker.jobs import (
    MISSING,
    FileJobStore,
    GridPoint,
    JobNotFound,
    JobStore,
    StudyNotFound,
    TooManyJobs,
)
from worker.jobs.record import Entry
from worker.jobs.store import newest_first


def grid(ks: tuple[int, ...] = (1, 5), objectives: tuple[str, ...] = ("vae", "iwae")) -> list:
    return [
        GridPoint(o, k, 0, TrainConfig(k=k, objective=o, seed=0).to_dict())
        for o in objectives
        for k in ks
    ]


def test_a_study_is_stored_with_one_queued_job_per_cell(store: JobStore) -> None:
    cells = grid()
    study = store.create_study({"epochs": 1}, cells)
    view = store.study(study.study_id)
    assert view.study == study
    assert [(c.objective, c.k) for c in study.cells] == [(c.objective, c.k) for c in cells]
    assert view.statuses == ["queued"] * 4
    assert view.status == "queued"
    for cell, record, point in zip(study.cells, view.records, cells, strict=True):
        assert record is not None
        assert (record.job_id, record.study_id, record.config) == (
            cell.job_id,
            study.study_id,
            point.config,
        )
    # Every cell's message is due (the reaper sends it if the API dies before it does).
    assert sorted(store.awaiting_message()) == sorted(c.job_id for c in study.cells)
    assert store.counts()["queued"] == 4


def test_the_cells_have_distinct_creation_times_in_grid_order(store: JobStore) -> None:
    study = store.create_study({}, grid(ks=(1, 2, 3, 4, 5)))
    times = [r.created_at for r in store.study(study.study_id).records if r is not None]
    assert times == sorted(times)
    assert len(set(times)) == len(times)
    assert times[0] == study.created_at


def test_a_study_is_admitted_whole_or_not_at_all(store: JobStore) -> None:
    store.max_active_jobs = 5
    store.create({"k": 1})
    with pytest.raises(TooManyJobs, match="1 jobs are queued or running, and 6 more"):
        store.create_study({}, grid(ks=(1, 2, 3)))
    assert store.study_page(limit=10) == ([], None)
    assert len(store.list()) == 1
    store.create_study({}, grid(ks=(1, 2)))  # 1 + 4 = 5: admitted
    with pytest.raises(TooManyJobs):
        store.create({"k": 1})


def test_two_studies_at_once_never_pass_the_cap_together(store: JobStore) -> None:
    store.max_active_jobs = 6
    outcomes: list[str] = []

    def submit() -> None:
        try:
            store.create_study({}, grid())  # 4 cells
            outcomes.append("created")
        except TooManyJobs:
            outcomes.append("refused")

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["created", "refused", "refused", "refused"]
    assert store.counts()["queued"] == 4


def test_studies_are_paged_newest_first(store: JobStore) -> None:
    ids = [store.create_study({}, grid(ks=(k,))).study_id for k in range(1, 6)]
    seen, cursor = [], None
    while True:
        page, cursor = store.study_page(limit=2, cursor=cursor)
        seen += [s.study_id for s in page]
        if cursor is None:
            break
    assert seen == ids[::-1]


def test_jobs_of_a_study_are_paged_alone(store: JobStore) -> None:
    store.create({"k": 1})
    study = store.create_study({}, grid(ks=(1, 2, 3)))
    seen, cursor = [], None
    while True:
        page, cursor = store.page(limit=4, cursor=cursor, study_id=study.study_id)
        seen += [r.job_id for r in page]
        if cursor is None:
            break
    assert seen == [c.job_id for c in study.cells][::-1]  # newest first
    assert store.page(limit=10, study_id="0" * 32) == ([], None)


def test_an_unknown_study(store: JobStore) -> None:
    for study_id in ("0" * 32, "../x", ""):
        with pytest.raises(StudyNotFound):
            store.study(study_id)
        with pytest.raises(StudyNotFound):
            store.cancel_study(study_id)


def test_cancel_study_cancels_what_has_not_finished(store: JobStore) -> None:
    study = store.create_study({}, grid())
    done, running, _, failed = (c.job_id for c in study.cells)
    store.finish(store.claim(done, "w:1"), "succeeded", metrics={"test_loglik": -90.0})
    lease = store.claim(running, "w:1")
    store.finish(store.claim(failed, "w:1"), "failed", error="boom")

    view = store.cancel_study(study.study_id)
    assert view.statuses == ["succeeded", "running", "cancelled", "failed"]
    assert store.get(running).cancel_requested
    assert store.renew(lease) == "cancel"
    store.finish(lease, "cancelled")
    assert store.study(study.study_id).status == "cancelled"
    again = ["succeeded", "cancelled", "cancelled", "failed"]
    assert store.cancel_study(study.study_id).statuses == again


def test_a_study_and_its_cells_expire_together_after_its_last_cell_ended(
    store: JobStore,
) -> None:
    """No cell of a study goes missing before the others: retention starts when the last
    one ends (Redis expires the keys itself; the file store deletes them at reaping)."""
    store.retention_s = 0.5  # Redis: 1 s, its shortest expiry
    study = store.create_study({}, grid())
    first, *others = (c.job_id for c in study.cells)
    store.request_cancel(first)
    time.sleep(1.2)
    store.reap()
    assert store.study(study.study_id).statuses == ["cancelled", "queued", "queued", "queued"]

    for job_id in others:
        store.request_cancel(job_id)
    assert store.study(study.study_id).ended_at is not None
    time.sleep(1.2)
    store.reap()
    with pytest.raises(StudyNotFound):
        store.study(study.study_id)
    with pytest.raises(JobNotFound):
        store.get(first)
    assert store.study_page(limit=10) == ([], None)
    assert store.list() == []


def test_a_crash_between_the_study_and_its_jobs_leaves_missing_cells(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file store writes the study first, then its jobs: dying in between leaves cells
    without a job record, shown as missing (the Redis store writes all in one MULTI)."""
    store = FileJobStore(tmp_path / "jobs", lease_s=1.0, max_attempts=1)
    written: list[str] = []
    write = FileJobStore._write

    def dies_after_two(self: FileJobStore, entry: Entry) -> None:
        if len(written) == 2:
            raise SystemExit("power cut")
        written.append(entry.record.job_id)
        write(self, entry)

    monkeypatch.setattr(FileJobStore, "_write", dies_after_two)
    with pytest.raises(SystemExit):
        store.create_study({"k": 5, "objective": "vae"}, grid())
    monkeypatch.undo()

    [study], _ = store.study_page(limit=10)
    view = store.study(study.study_id)
    assert view.statuses == ["queued", "queued", MISSING, MISSING]
    assert view.status == "running"  # two cells can still run; the study cannot succeed
    # The index lists the missing jobs as active too: the reaper skips them, and sends the
    # messages of the two that exist.
    assert sorted(store.awaiting_message()) == sorted(written)
    for job_id in written:
        store.finish(store.claim(job_id, "w:1"), "succeeded", metrics={})
    assert store.study(study.study_id).status == "partial"


def test_newest_first_pages_by_creation_time() -> None:
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    items = [t0 + timedelta(seconds=s) for s in (3, 1, 2, 5, 4)]
    first, cursor = newest_first(items, lambda t: t, limit=3, cursor=None)
    assert first == [t0 + timedelta(seconds=s) for s in (5, 4, 3)]
    rest, end = newest_first(items, lambda t: t, limit=3, cursor=cursor)
    assert (rest, end) == ([t0 + timedelta(seconds=s) for s in (2, 1)], None)
