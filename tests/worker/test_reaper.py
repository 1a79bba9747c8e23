"""reap_once: lost jobs and never-sent jobs are sent again, each once per pass."""

from __future__ import annotations

import time
from pathlib import Path

from models.storage import FileStorage
from worker.job_files import unlist_model
from worker.jobs import FileJobStore, reap_once


def test_reap_once_sends_lost_and_unsent_jobs(tmp_path: Path) -> None:
    store = FileJobStore(tmp_path, lease_s=0.2, max_attempts=3)
    lost = store.create({"k": 1}).job_id
    store.claim(lost, "dead:1")
    unsent = store.create({"k": 2}).job_id
    sent = store.create({"k": 3}).job_id
    store.mark_enqueued(sent)
    time.sleep(0.3)

    enqueued: list[str] = []

    def enqueue(job_id: str) -> None:
        enqueued.append(job_id)
        store.mark_enqueued(job_id)

    assert reap_once(store, enqueue, grace_s=0.1) == enqueued
    assert sorted(enqueued) == sorted([lost, unsent])
    assert store.get(lost).status == "queued"
    assert reap_once(store, enqueue, grace_s=0.1) == []


def test_unsent_job_gets_a_grace_period(tmp_path: Path) -> None:
    store = FileJobStore(tmp_path, lease_s=1, max_attempts=3)
    store.create({"k": 1})
    assert reap_once(store, lambda job_id: None, grace_s=60) == []


def test_a_job_the_reaper_cancels_loses_the_model_an_earlier_attempt_left(
    tmp_path: Path,
) -> None:
    store = FileJobStore(tmp_path, lease_s=0.2, max_attempts=3)
    job_id = store.create({"k": 1}).job_id
    store.claim(job_id, "dead:1")  # wrote model.json, then died before recording success
    info = tmp_path / "models" / job_id / "model.json"
    info.parent.mkdir(parents=True)
    info.write_text("{}")
    store.request_cancel(job_id)
    time.sleep(0.3)

    def unlist(settled: str) -> None:
        unlist_model(FileStorage(tmp_path), settled)

    reap_once(store, lambda job_id: None, grace_s=60, on_settled=unlist)
    assert store.get(job_id).status == "cancelled"
    assert not info.exists()
