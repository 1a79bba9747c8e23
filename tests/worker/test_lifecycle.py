"""The lifecycle rules as pure functions: exact outcomes for given entries and store times."""

from __future__ import annotations

from datetime import UTC, datetime

from worker.jobs import lifecycle
from worker.jobs.record import Entry, Instant

LEASE_S = 10.0


def at(t: float, up_s: float = float("inf")) -> Instant:
    return Instant(t=t, wall=datetime.fromtimestamp(t, UTC), up_s=up_s)


def running(t: float = 100.0) -> Entry:
    entry = lifecycle.new_entry("abc", {"k": 1}, at(t))
    assert lifecycle.claim(entry, "w:1", at(t), lease_s=LEASE_S) == "claimed"
    return entry


def test_after_a_store_restart_holders_get_a_full_lease_before_reaping() -> None:
    entry = running()
    # Redis restarted 3 s ago, long after the lease ran out: the holder's renewals could not
    # reach it, which is no reason to take its job (and burn an attempt).
    assert lifecycle.reap(entry, at(500.0, up_s=3.0), lease_s=LEASE_S, max_attempts=3) == "alive"
    assert lifecycle.renew(entry, 1, at(501.0, up_s=4.0), lease_s=LEASE_S) == "held"
    assert entry.record.attempts == 1
    # Renewed at 501 until 511; then silence: reaped once the lease is over.
    assert lifecycle.reap(entry, at(505.0, up_s=8.0), lease_s=LEASE_S, max_attempts=3) == "alive"
    assert lifecycle.reap(entry, at(512.0, up_s=15.0), lease_s=LEASE_S, max_attempts=3) == (
        "requeued"
    )


def test_an_expired_lease_nobody_took_can_be_renewed_but_not_after_a_takeover() -> None:
    entry = running()
    assert lifecycle.renew(entry, 1, at(150.0), lease_s=LEASE_S) == "held"  # 40 s late
    assert entry.lease_expires == 160.0
    assert lifecycle.claim(entry, "w:2", at(170.0), lease_s=LEASE_S) == "running"  # reaper's
    assert lifecycle.reap(entry, at(170.0), lease_s=LEASE_S, max_attempts=3) == "requeued"
    assert lifecycle.claim(entry, "w:2", at(170.0), lease_s=LEASE_S) == "claimed"
    assert entry.fence == 2
    assert lifecycle.renew(entry, 1, at(171.0), lease_s=LEASE_S) == "lost"
    assert not lifecycle.update_progress(entry, 1, at(171.0), {"step": 1}, None)
    assert not lifecycle.finish(
        entry, 1, at(171.0), "succeeded", metrics=None, error=None, model_id="abc"
    )
    assert entry.record.status == "running"


def test_finish_is_idempotent_for_its_holder_only() -> None:
    entry = running()
    args = {"metrics": {"test_loglik": -90.0}, "error": None, "model_id": "abc"}
    assert lifecycle.finish(entry, 1, at(101.0), "succeeded", **args)
    # The reply was lost in an outage and the worker sends it again: still a success.
    assert lifecycle.finish(entry, 1, at(102.0), "succeeded", **args)
    assert entry.record.finished_at == at(101.0).wall
    assert not lifecycle.finish(entry, 2, at(102.0), "succeeded", **args)


def test_a_cancelled_or_failed_job_names_no_model() -> None:
    entry = running()
    assert lifecycle.update_progress(entry, 1, at(101.0), {"step": 9}, "abc")
    assert entry.record.model_id == "abc"
    assert lifecycle.finish(
        entry, 1, at(102.0), "cancelled", metrics=None, error=None, model_id=None
    )
    assert entry.record.model_id is None


def test_heartbeat_brings_the_cancel_flag() -> None:
    entry = running()
    lifecycle.request_cancel(entry, at(101.0))
    assert lifecycle.renew(entry, 1, at(102.0), lease_s=LEASE_S) == "cancel"


def test_releasing_a_job_whose_cancel_was_requested_cancels_it() -> None:
    entry = running()
    lifecycle.request_cancel(entry, at(101.0))
    assert lifecycle.release(entry, 1, at(102.0), max_attempts=3)
    assert entry.record.status == "cancelled"


def test_a_job_released_on_every_attempt_fails_instead_of_looping() -> None:
    entry = running()
    for fence in (1, 2):
        assert lifecycle.release(entry, fence, at(102.0), max_attempts=3)
        assert (entry.record.status, entry.record.attempts) == ("queued", fence)
        lifecycle.claim(entry, "w:2", at(103.0), lease_s=LEASE_S)
    assert lifecycle.release(entry, 3, at(104.0), max_attempts=3)
    assert entry.record.status == "failed"
    assert entry.record.error == "stopped 3 times by worker shutdowns; not started again"


def test_a_sent_message_not_claimed_in_time_is_due_again() -> None:
    entry = lifecycle.new_entry("abc", {"k": 1}, at(100.0))
    assert lifecycle.message_due(entry, at(120.0), grace_s=15, resend_s=300)  # never sent
    lifecycle.mark_sent(entry, at(120.0))
    assert not lifecycle.message_due(entry, at(400.0), grace_s=15, resend_s=300)
    # Acked by a worker that died (or whose claim failed) before claiming: sent again.
    assert lifecycle.message_due(entry, at(421.0), grace_s=15, resend_s=300)


def test_each_attempt_adds_its_running_time() -> None:
    entry = running(t=100.0)
    assert lifecycle.reap(entry, at(130.0), lease_s=LEASE_S, max_attempts=3) == "requeued"
    assert entry.ran_s == 30.0  # lost: counted until its lease was found expired
    lifecycle.claim(entry, "w:2", at(140.0), lease_s=LEASE_S)
    assert lifecycle.release(entry, 2, at(145.0), max_attempts=3)
    assert entry.ran_s == 35.0
