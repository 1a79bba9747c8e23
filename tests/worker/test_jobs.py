"""The job store's life cycle, leases, reaping and cancellation, on both implementations."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from worker.jobs import (
    STATUSES,
    ClaimRefused,
    FileJobStore,
    JobAlreadyFinished,
    JobNotFound,
    JobStore,
    TooManyJobs,
)
from worker.jobs.record import WORKER_RETENTION_S

CONFIG = {"k": 5, "epochs": 2}


def wait_for_lease_expiry(store: JobStore) -> None:
    time.sleep(store.lease_s + 0.15)


def test_create_get_list(store: JobStore) -> None:
    first = store.create(CONFIG)
    time.sleep(0.01)
    second = store.create({"k": 1})

    assert first.status == "queued"
    assert first.attempts == 0
    assert first.job_id != second.job_id
    got = store.get(first.job_id)
    assert got == first
    assert got.config == CONFIG
    assert [r.job_id for r in store.list()] == [second.job_id, first.job_id]


def test_unknown_job(store: JobStore) -> None:
    with pytest.raises(JobNotFound):
        store.get("0123abcd")
    with pytest.raises(JobNotFound):
        store.request_cancel("0123abcd")
    with pytest.raises(JobNotFound):
        store.claim("0123abcd", "w")
    assert store.list() == []


def test_ping(store: JobStore) -> None:
    assert store.ping()


def test_new_job_awaits_its_message_until_enqueued(store: JobStore) -> None:
    job = store.create(CONFIG)
    assert store.awaiting_message() == [job.job_id]
    assert store.awaiting_message(older_than_s=60) == []
    store.mark_enqueued(job.job_id)
    assert store.awaiting_message() == []


def test_claim_runs_once_and_refuses_duplicates(store: JobStore) -> None:
    job = store.create(CONFIG)
    lease = store.claim(job.job_id, "host:1")

    record = store.get(job.job_id)
    assert record.status == "running"
    assert record.attempts == 1
    assert record.worker == "host:1"
    assert record.started_at is not None
    assert store.awaiting_message() == []
    assert lease.record == record
    with pytest.raises(ClaimRefused) as refused:
        store.claim(job.job_id, "host:2")
    assert refused.value.reason == "running"


def test_progress_and_finish(store: JobStore) -> None:
    job = store.create(CONFIG)
    lease = store.claim(job.job_id, "w")
    assert store.update_progress(lease, {"epoch": 1, "loss": 90.5})
    assert store.get(job.job_id).progress == {"epoch": 1, "loss": 90.5}
    assert store.get(job.job_id).model_id is None
    assert store.update_progress(lease, {"epoch": 2}, model_id=job.job_id)
    assert store.get(job.job_id).model_id == job.job_id

    assert store.finish(lease, "succeeded", metrics={"test_loglik": -99.0}, model_id=job.job_id)
    record = store.get(job.job_id)
    assert record.status == "succeeded"
    assert record.metrics == {"test_loglik": -99.0}
    assert record.finished_at is not None
    assert record.finished
    with pytest.raises(ClaimRefused) as refused:
        store.claim(job.job_id, "w")
    assert refused.value.reason == "finished"
    # A finished job's lease is spent: no further writes.
    assert store.renew(lease) == "lost"
    assert not store.update_progress(lease, {"epoch": 3})
    assert not store.finish(lease, "failed", error="late")
    assert store.get(job.job_id).status == "succeeded"


def test_failed_job_keeps_its_error(store: JobStore) -> None:
    job = store.create(CONFIG)
    lease = store.claim(job.job_id, "w")
    assert store.finish(lease, "failed", error="ValueError: boom")
    record = store.get(job.job_id)
    assert (record.status, record.error) == ("failed", "ValueError: boom")


def test_renewed_lease_is_not_reaped(store: JobStore) -> None:
    job = store.create(CONFIG)
    lease = store.claim(job.job_id, "w")
    for _ in range(4):
        time.sleep(store.lease_s / 3)
        assert store.renew(lease) == "held"
    assert store.reap() == []
    assert store.get(job.job_id).status == "running"


def test_expired_lease_is_requeued_then_resumed_by_another_worker(store: JobStore) -> None:
    job = store.create(CONFIG)
    store.mark_enqueued(job.job_id)
    lost = store.claim(job.job_id, "dead:1")
    store.update_progress(lost, {"epoch": 1})
    wait_for_lease_expiry(store)

    assert store.reap() == [job.job_id]
    record = store.get(job.job_id)
    assert record.status == "queued"
    assert record.attempts == 1
    assert store.awaiting_message() == [job.job_id]
    assert store.reap() == []

    lease = store.claim(job.job_id, "alive:2")
    record = store.get(job.job_id)
    assert (record.attempts, record.progress) == (2, None)
    # The lost worker, should it come back, owns nothing any more.
    assert store.renew(lost) == "lost"
    assert not store.update_progress(lost, {"epoch": 1})
    assert not store.finish(lost, "succeeded")
    assert store.finish(lease, "succeeded")


def test_claim_never_takes_over_a_running_job_even_past_its_lease(store: JobStore) -> None:
    """Only the reaper takes a job back, on its own monotonic clock (`LeaseWatch`), so a
    step of the store's wall clock cannot hand a live job to a second worker."""
    job = store.create(CONFIG)
    store.claim(job.job_id, "dead:1")
    wait_for_lease_expiry(store)
    with pytest.raises(ClaimRefused) as refused:
        store.claim(job.job_id, "alive:2")
    assert refused.value.reason == "running"
    assert store.reap() == [job.job_id]
    store.claim(job.job_id, "alive:2")
    record = store.get(job.job_id)
    assert (record.status, record.attempts, record.worker) == ("running", 2, "alive:2")


def test_worker_lost_too_often_fails_the_job(store: JobStore) -> None:
    job = store.create(CONFIG)
    for _ in range(store.max_attempts):
        store.claim(job.job_id, "w")
        wait_for_lease_expiry(store)
        store.reap()
    record = store.get(job.job_id)
    assert record.status == "failed"
    assert record.attempts == store.max_attempts
    assert record.error == f"worker lost {store.max_attempts} times (out of memory?)"
    assert store.awaiting_message() == []


def test_exhausted_job_refused_at_claim(store: JobStore) -> None:
    job = store.create(CONFIG)
    for _ in range(store.max_attempts):
        store.claim(job.job_id, "w")
        wait_for_lease_expiry(store)
        store.reap()
    with pytest.raises(ClaimRefused) as refused:
        store.claim(job.job_id, "w")
    assert refused.value.reason == "finished"
    assert store.get(job.job_id).status == "failed"


def test_cancel_queued_job_is_immediate_and_final(store: JobStore) -> None:
    job = store.create(CONFIG)
    record = store.request_cancel(job.job_id)
    assert record.status == "cancelled"
    assert record.cancel_requested
    assert record.finished_at is not None
    assert store.awaiting_message() == []
    with pytest.raises(ClaimRefused):
        store.claim(job.job_id, "w")
    assert store.request_cancel(job.job_id).status == "cancelled"  # idempotent


def test_cancel_running_job_sets_the_flag(store: JobStore) -> None:
    job = store.create(CONFIG)
    lease = store.claim(job.job_id, "w")
    assert not store.cancel_requested(job.job_id)

    record = store.request_cancel(job.job_id)
    assert record.status == "running"
    assert record.cancel_requested
    assert store.cancel_requested(job.job_id)
    assert store.finish(lease, "cancelled")
    assert store.get(job.job_id).status == "cancelled"


def test_cancel_of_a_lost_running_job_cancels_it_at_reaping(store: JobStore) -> None:
    job = store.create(CONFIG)
    store.claim(job.job_id, "w")
    store.request_cancel(job.job_id)
    wait_for_lease_expiry(store)
    assert store.reap() == []
    assert store.get(job.job_id).status == "cancelled"


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_cancel_finished_job_refused(store: JobStore, outcome: str) -> None:
    job = store.create(CONFIG)
    store.finish(store.claim(job.job_id, "w"), outcome)
    with pytest.raises(JobAlreadyFinished):
        store.request_cancel(job.job_id)
    assert store.get(job.job_id).status == outcome


def test_released_job_is_queued_again_its_attempt_counted(store: JobStore) -> None:
    job = store.create(CONFIG)
    store.mark_enqueued(job.job_id)
    lease = store.claim(job.job_id, "stopping:1")

    assert store.release(lease)
    record = store.get(job.job_id)
    assert (record.status, record.attempts) == ("queued", 1)
    assert store.awaiting_message() == [job.job_id]
    assert store.renew(lease) == "lost"
    assert not store.release(lease)
    wait_for_lease_expiry(store)
    assert store.reap() == []  # not running: nothing to reap
    assert store.claim(job.job_id, "other:2").record.attempts == 2


def test_a_sent_job_still_queued_after_resend_after_s_is_due_again(store: JobStore) -> None:
    # A worker took the message (early ack) and died, or its claim failed, before claiming.
    job = store.create(CONFIG)
    store.mark_enqueued(job.job_id)
    assert store.awaiting_message(resend_after_s=0.2) == []
    time.sleep(0.3)
    assert store.awaiting_message(resend_after_s=0.2) == [job.job_id]
    store.claim(job.job_id, "w")
    assert store.awaiting_message(resend_after_s=0.0) == []


def test_the_processes_wall_clocks_do_not_matter(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)  # an API an hour behind
    job = store.create(CONFIG)
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # a worker an hour ahead
    assert store.awaiting_message(older_than_s=60) == []  # created just now, whoever asks
    store.claim(job.job_id, "w")
    assert store.reap() == []  # its lease has 0.3 s to go, not -2 hours
    assert store.get(job.job_id).status == "running"


def test_max_active_jobs_bounds_queued_plus_running(store: JobStore) -> None:
    store.max_active_jobs = 2
    first = store.create(CONFIG)
    store.claim(store.create(CONFIG).job_id, "w")
    with pytest.raises(TooManyJobs) as refused:
        store.create(CONFIG)
    assert refused.value.retry_after_s > 0
    assert "IWAE_MAX_ACTIVE_JOBS" in str(refused.value)
    store.request_cancel(first.job_id)  # finished jobs do not count
    store.create(CONFIG)
    assert len(store.list()) == 3


def test_pages_walk_every_job_once_newest_first(store: JobStore) -> None:
    ids = []
    for _ in range(5):
        ids.append(store.create(CONFIG).job_id)
        time.sleep(0.002)
    store.request_cancel(ids[1])
    seen, cursor = [], None
    while True:
        page, cursor = store.page(limit=2, cursor=cursor)
        assert len(page) <= 2
        seen += [r.job_id for r in page]
        if cursor is None:
            break
    assert seen == ids[::-1]
    cancelled, cursor = store.page(limit=2, status="cancelled")
    assert ([r.job_id for r in cancelled], cursor) == ([ids[1]], None)


def test_counts_follow_every_transition(store: JobStore) -> None:
    a, b, c = (store.create(CONFIG).job_id for _ in range(3))
    store.finish(store.claim(a, "w"), "succeeded")
    store.claim(b, "w")
    store.request_cancel(c)
    counts = store.counts()
    assert {s: counts.get(s, 0) for s in STATUSES} == {
        "queued": 0,
        "running": 1,
        "succeeded": 1,
        "failed": 0,
        "cancelled": 1,
    }


def test_finished_records_expire_after_the_retention(store: JobStore) -> None:
    store.retention_s = 1
    done = store.create(CONFIG).job_id
    store.request_cancel(done)
    active = store.create(CONFIG).job_id
    time.sleep(2.1)
    store.reap()  # the file store deletes at reaping; Redis expires the key itself
    with pytest.raises(JobNotFound):
        store.get(done)
    assert [r.job_id for r in store.list()] == [active]


def test_workers_report_themselves_and_what_they_handled(store: JobStore) -> None:
    assert store.workers() == []
    store.report_worker("a:1", ["iwae.training"])
    store.report_worker("a:1", ["iwae.training"], "succeeded")
    store.report_worker("a:1", ["iwae.training"], "succeeded")
    time.sleep(0.05)
    store.report_worker("b:2", ["iwae.training", "iwae.training.cuda"], "lost")

    b, a = store.workers()
    assert (a.name, a.outcomes, a.queues) == ("a:1", {"succeeded": 2}, ["iwae.training"])
    assert (b.name, b.outcomes) == ("b:2", {"lost": 1})
    assert 0 <= b.seen_s_ago < a.seen_s_ago < 5


def test_of_two_reapers_only_one_takes_a_due_message(store: JobStore) -> None:
    job = store.create(CONFIG)
    assert store.take_due(older_than_s=0) == [job.job_id]
    assert store.take_due(older_than_s=0) == []  # marked sent by the first
    assert store.take_due(older_than_s=0, resend_after_s=0) == [job.job_id]  # long unclaimed


def test_the_active_job_cap_holds_under_a_concurrent_flood(store: JobStore) -> None:
    store.max_active_jobs = 5

    def create() -> str:
        try:
            return store.create(CONFIG).job_id
        except TooManyJobs:
            return "refused"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(lambda _: create(), range(24)))
    assert outcomes.count("refused") == 19
    assert len(store.list()) == 5


def test_the_file_store_counts_and_reaps_without_reading_every_record(tmp_path: Path) -> None:
    store = FileJobStore(tmp_path, lease_s=0.3, max_attempts=2, max_active_jobs=10)
    done, active = store.create(CONFIG).job_id, store.create(CONFIG).job_id
    store.request_cancel(done)

    def no_scan() -> None:
        raise AssertionError("scanned every record")

    store._entries = no_scan  # type: ignore[method-assign]
    assert store.counts()["cancelled"] == 1 and store.counts()["queued"] == 1
    assert store._active_ids() == [active]
    store.claim(active, "w")
    assert store.reap() == []
    store.create(CONFIG)  # the active-job limit reads the index too


def test_a_crash_between_the_file_stores_index_and_entry_writes_frees_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The insert wrote the index, then the process died before the entry: the id counted
    against IWAE_MAX_ACTIVE_JOBS forever. The reaper's next pass unlists it."""
    store = FileJobStore(tmp_path, lease_s=1, max_attempts=3, max_active_jobs=1)

    def crash(entry: object) -> None:
        raise SystemExit("killed")

    monkeypatch.setattr(store, "_write", crash)
    with pytest.raises(SystemExit):
        store.create(CONFIG)
    monkeypatch.undo()
    assert store.counts()["queued"] == 1
    with pytest.raises(TooManyJobs):
        store.create(CONFIG)

    store.reap()
    assert store.counts()["queued"] == 0
    assert store.create(CONFIG).status == "queued"


def test_workers_silent_for_a_day_are_forgotten(store: JobStore) -> None:
    """Every worker process ever started stayed in the list (readiness, metrics) for good."""
    store.report_worker("old:1", ["iwae.training"])
    store.report_worker("recent:2", ["iwae.training"])
    if isinstance(store, FileJobStore):
        path = store.root / ".workers"
        workers = json.loads(path.read_text())
        workers["old:1"]["seen"] -= WORKER_RETENTION_S + 1
        path.write_text(json.dumps(workers))
    else:
        key = f"{store.prefix}workers"
        data = json.loads(store.client.hget(key, "old:1"))
        data["seen"] -= WORKER_RETENTION_S + 1
        store.client.hset(key, "old:1", json.dumps(data))
    assert {w.name for w in store.workers()} == {"old:1", "recent:2"}

    store.report_worker("recent:2", ["iwae.training"])
    assert [w.name for w in store.workers()] == ["recent:2"]


def test_listing_by_status_reads_the_jobs_of_that_status_only(store: JobStore) -> None:
    """30 succeeded jobs, then one failed: listing the failed ones reads one record, not the
    history (Redis: a sorted set per ended status; the file store scans its folder)."""
    if isinstance(store, FileJobStore):
        pytest.skip("the file store scans its folder: a single machine's history")
    assert store.page(limit=10, status="failed") == ([], None)  # the one-time fill: nothing
    for i in range(31):
        lease = store.claim(store.create({"k": i}).job_id, "w:1")
        store.finish(lease, "failed" if i == 30 else "succeeded")
    fetched: list[int] = []
    real_mget = store.client.mget

    def counting_mget(keys: list[str]) -> Any:
        fetched.append(len(keys))
        return real_mget(keys)

    store.client.mget = counting_mget  # type: ignore[method-assign]
    [failed], cursor = store.page(limit=10, status="failed")
    assert (failed.config, cursor) == ({"k": 30}, None)
    assert sum(fetched) == 1
    fetched.clear()
    queued = store.create({"k": 99})
    assert [r.job_id for r in store.page(limit=10, status="queued")[0]] == [queued.job_id]
    assert sum(fetched) == 1


def test_jobs_that_ended_before_the_status_sets_existed_are_listed(store: JobStore) -> None:
    if isinstance(store, FileJobStore):
        pytest.skip("Redis only")
    for i in range(3):
        store.finish(store.claim(store.create({"k": i}).job_id, "w:1"), "succeeded")
    store.client.delete(*store.client.keys(f"{store.prefix}ended:*"))  # an older deployment

    assert len(store.page(limit=10, status="succeeded")[0]) == 3
