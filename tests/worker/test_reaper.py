"""reap_once: lost jobs and never-sent jobs are sent again, each once per pass."""

from __future__ import annotations

import time
from pathlib import Path

from models.storage import FileStorage
from worker.job_files import discard_model
from worker.jobs import FileJobStore, reap_once
from worker.jobs.reaper import LeaseWatch
from worker.jobs.record import Instant


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


def test_waiting_jobs_are_not_sent_again_so_the_queue_never_outgrows_them(
    tmp_path: Path,
) -> None:
    """5 jobs wait behind busy workers, every pass finds their messages due (resend 0 s):
    none is sent again while its message is still in the queue; a lost one is."""
    store = FileJobStore(tmp_path, lease_s=1, max_attempts=3)
    queue: list[str] = []

    def enqueue(job_id: str) -> None:
        queue.append(job_id)
        store.mark_enqueued(job_id)

    for k in range(5):
        enqueue(store.create({"k": k}).job_id)
    for _ in range(4):
        reap_once(store, enqueue, grace_s=0, resend_s=0, waiting=lambda: set(queue))
        assert len(queue) == 5
    lost = queue.pop(0)  # taken by a worker that died before its claim
    assert reap_once(store, enqueue, grace_s=0, resend_s=0, waiting=lambda: set(queue)) == [lost]
    assert len(queue) == 5


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
        discard_model(FileStorage(tmp_path), settled)

    reap_once(store, lambda job_id: None, grace_s=60, on_settled=unlist)
    assert store.get(job_id).status == "cancelled"
    assert [p.name for p in info.parent.iterdir() if not p.name.startswith(".")] == []


class SteppedClock(FileJobStore):
    """A file store whose clock a test can step forward, as NTP steps a host's wall clock."""

    step_s = 0.0

    def _clock(self) -> Instant:
        now = super()._clock()
        return Instant(t=now.t + self.step_s, wall=now.wall, up_s=now.up_s + self.step_s)


def test_a_step_of_the_stores_clock_does_not_hand_a_live_job_to_another_worker(
    tmp_path: Path,
) -> None:
    """The store's clock jumps an hour: by it every lease expired at once. The reaper takes
    the job back only once it has seen the lease unrenewed for a whole lease on its own
    monotonic clock, the clock the holder keeps its deadline on."""
    store = SteppedClock(tmp_path, lease_s=60, max_attempts=3)
    job_id = store.create({"k": 1}).job_id
    lease = store.claim(job_id, "alive:1")
    monotonic = [1000.0]
    watch = LeaseWatch(60, clock=lambda: monotonic[0])
    store.step_s = 3600.0

    def reap() -> list[str]:
        return reap_once(store, lambda job_id: None, grace_s=60, watch=watch)

    assert reap() == []  # first seen at 1000
    monotonic[0] = 1059.0
    assert reap() == []  # the holder may still write until 1060 minus a heartbeat
    assert store.renew(lease) == "held"  # and renews: a new lease, watched anew
    monotonic[0] = 1100.0
    assert reap() == []
    assert store.get(job_id).status == "running"
    monotonic[0] = 1160.0
    store.step_s += 100.0  # the store's clock goes on too
    assert reap() == [job_id]  # unrenewed for 60 s of the reaper's own clock


def test_without_the_watch_the_step_alone_takes_the_job(tmp_path: Path) -> None:
    store = SteppedClock(tmp_path, lease_s=60, max_attempts=3)
    job_id = store.create({"k": 1}).job_id
    store.claim(job_id, "alive:1")
    store.step_s = 3600.0
    assert reap_once(store, lambda job_id: None, grace_s=60) == [job_id]
