"""Every rule of a job's life, as functions that change an `Entry` in place.

Life of a job::

    create -> queued --claim--> running --finish--> succeeded | failed | cancelled
                 ^                 |
                 +-- reap/release -+  (lease expired: worker lost; at most max_attempts starts)

The functions read no clock and touch no storage: a store calls them inside its atomic
read-modify-write (`JobStore._update`) with one reading of its own clock (`Instant`), and
writes the entry back only when it changed. So the two stores share every rule.

Leases and fencing: a claim increments the entry's `fence` and hands it to the worker in its
`Lease`; every worker-side change (renew, progress, finish, release) is refused unless the
job is still running under that fence. Only the reaper takes a running job back, never a
claim. A lease that expired but that nobody took over may be renewed, so a worker cut off
from the store for a while (a Redis restart) keeps its job and its attempt; the worker
itself does not write files past its lease without renewing first (`worker.lease`).
"""

from __future__ import annotations

from typing import Any

from models.status import Outcome
from worker.jobs.record import (
    Entry,
    Heartbeat,
    Instant,
    JobAlreadyFinished,
    JobRecord,
    TooManyJobs,
    lost_error,
    stopped_error,
)

# How long a client refused by IWAE_MAX_ACTIVE_JOBS is asked to wait.
RETRY_AFTER_S = 30


def admit(active: int, limit: int | None, new: int = 1) -> None:
    """Refuse `new` jobs (all or none) if more than `limit` would be queued or running."""
    if limit is not None and active + new > limit:
        raise TooManyJobs(limit, RETRY_AFTER_S, active, new)


def new_entry(
    job_id: str, config: dict[str, Any], now: Instant, study_id: str | None = None
) -> Entry:
    """A queued job whose message is not sent yet."""
    record = JobRecord(
        job_id=job_id,
        status="queued",
        config=config,
        study_id=study_id,
        created_at=now.wall,
        updated_at=now.wall,
    )
    return Entry(record=record, queued_since=now.t)


def lease_expired(entry: Entry, now: Instant, lease_s: float) -> bool:
    """Expired by the store's clock; after a store restart every holder first gets a full
    lease to renew (its renewals failed while the store was down: not its fault).
    """
    expires = entry.lease_expires
    return (expires is None or expires <= now.t) and now.up_s >= lease_s


def holds(entry: Entry, fence: int) -> bool:
    return entry.record.status == "running" and entry.fence == fence


def claim(entry: Entry, worker: str, now: Instant, *, lease_s: float) -> str:
    """Start the job under a new fence if it is queued.

    Returns "claimed", or why not: "running" (even past its lease: only the reaper takes a
    job back, after it saw the lease silent for a whole `lease_s` on its own monotonic
    clock, see `worker.jobs.reaper`) or "finished".
    """
    record = entry.record
    if record.status == "running":
        return "running"
    if record.status != "queued":
        return "finished"
    entry.fence += 1
    entry.claimed_at = now.t
    entry.lease_expires = now.t + lease_s
    entry.queued_since = entry.sent_at = None
    record.status = "running"
    record.attempts += 1
    record.worker = worker
    record.progress = None
    record.started_at = record.updated_at = now.wall
    return "claimed"


def settle_lost(entry: Entry, now: Instant, max_attempts: int) -> str:
    """A running job whose lease expired: "cancelled" if that was asked, "exhausted"
    (failed) once it used its attempts, else "requeue" (left for the caller to do).
    """
    record = entry.record
    if record.cancel_requested:
        _end(entry, now, "cancelled")
        return "cancelled"
    if record.attempts >= max_attempts:
        _end(entry, now, "failed")
        record.error = lost_error(record.attempts)
        return "exhausted"
    return "requeue"


def renew(entry: Entry, fence: int, now: Instant, *, lease_s: float) -> Heartbeat:
    """Extend the lease; also tells the holder whether a cancel was requested."""
    if not holds(entry, fence):
        return "lost"
    entry.lease_expires = now.t + lease_s
    return "cancel" if entry.record.cancel_requested else "held"


def update_progress(
    entry: Entry, fence: int, now: Instant, progress: dict[str, Any], model_id: str | None
) -> bool:
    if not holds(entry, fence):
        return False
    entry.record.progress = progress
    entry.record.updated_at = now.wall
    if model_id is not None:
        entry.record.model_id = model_id
    return True


def finish(
    entry: Entry,
    fence: int,
    now: Instant,
    status: Outcome,
    *,
    metrics: dict[str, Any] | None,
    error: str | None,
    model_id: str | None,
) -> bool:
    """Record the outcome. Idempotent for the holder, so a finish whose reply was lost in
    a store outage can be sent again.
    """
    if entry.fence == fence and entry.record.status == status:
        return True
    if not holds(entry, fence):
        return False
    _end(entry, now, status)
    record = entry.record
    for key, value in (("metrics", metrics), ("error", error), ("model_id", model_id)):
        if value is not None:
            setattr(record, key, value)
    if status != "succeeded":
        record.model_id = None  # never a served model for a job that did not succeed
    return True


def release(entry: Entry, fence: int, now: Instant, *, max_attempts: int) -> bool:
    """Give a running job back to the queue (its worker stops). The attempt counts, so a job
    that keeps drawing SIGTERMs (or kills its worker's shutdown) ends after `max_attempts`
    starts instead of looping; a job whose cancel was requested meanwhile is cancelled.
    """
    if not holds(entry, fence):
        return False
    record = entry.record
    if record.cancel_requested:
        _end(entry, now, "cancelled")
    elif record.attempts >= max_attempts:
        _end(entry, now, "failed")
        record.error = stopped_error(record.attempts)
        record.model_id = None
    else:
        _requeue(entry, now)
    return True


def reap(entry: Entry, now: Instant, *, lease_s: float, max_attempts: int) -> str:
    """A running job whose lease expired is requeued ("requeued"), cancelled or failed;
    anything else is left alone ("alive" or "idle").
    """
    if entry.record.status != "running":
        return "idle"
    if not lease_expired(entry, now, lease_s):
        return "alive"
    outcome = settle_lost(entry, now, max_attempts)
    if outcome == "requeue":
        _requeue(entry, now)
        return "requeued"
    return outcome


def request_cancel(entry: Entry, now: Instant) -> None:
    """Cancel a queued job now; flag a running one (its worker stops at its next heartbeat).
    Idempotent for a cancelled job.
    """
    record = entry.record
    if record.status in ("succeeded", "failed"):
        raise JobAlreadyFinished(record.job_id, record.status)
    if record.status == "cancelled":
        return
    record.cancel_requested = True
    record.updated_at = now.wall
    if record.status == "queued":
        _end(entry, now, "cancelled")


def message_due(entry: Entry, now: Instant, *, grace_s: float, resend_s: float) -> bool:
    """A queued job whose message was never sent (its sender died) for `grace_s`, or was
    sent `resend_s` ago and still not claimed (lost between a worker's ack and its claim).
    """
    if entry.record.status != "queued":
        return False
    if entry.sent_at is None:
        return entry.queued_since is None or entry.queued_since <= now.t - grace_s
    return entry.sent_at <= now.t - resend_s


def mark_sent(entry: Entry, now: Instant) -> None:
    if entry.record.status == "queued":
        entry.sent_at = now.t


def take_message(entry: Entry, now: Instant, *, grace_s: float, resend_s: float) -> bool:
    """If the job's message is due, mark it sent now and return True: of several reapers
    looking at once, exactly one sends it.
    """
    if not message_due(entry, now, grace_s=grace_s, resend_s=resend_s):
        return False
    mark_sent(entry, now)
    return True


def _requeue(entry: Entry, now: Instant) -> None:
    if entry.claimed_at is not None:  # a lost attempt counts until its lease was found expired
        entry.ran_s += now.t - entry.claimed_at
    entry.claimed_at = None
    entry.record.status = "queued"
    entry.record.updated_at = now.wall
    entry.lease_expires = entry.sent_at = None
    entry.queued_since = now.t


def _end(entry: Entry, now: Instant, status: Outcome) -> None:
    entry.record.status = status
    entry.record.finished_at = entry.record.updated_at = now.wall
    entry.lease_expires = entry.queued_since = entry.sent_at = None
