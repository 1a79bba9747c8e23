"""Server-sent events of one job: its record each time it changes, until it finishes.

`GET /jobs/{job_id}/events` answers `text/event-stream` (WHATWG HTML, "Server-sent events"),
which a browser reads with `new EventSource(url)` and any HTTP client line by line::

    event: job              the job as GET /jobs/{job_id} shows it: sent first, then each
    data: {"job_id": ...}   time the record changes (progress, status)

    : keep-alive            a comment after KEEPALIVE_S seconds without an event, so that
                            proxies do not close a quiet stream

    event: end              after the record of a finished job (succeeded, failed or
    data: {"status": ...}   cancelled); then the server closes the stream

    event: error            the job could no longer be read (job store down, job gone);
    data: {"detail": ...}   then the server closes the stream

A browser's EventSource reconnects whenever a stream closes, so clients close it themselves
on `end` and `error`. The job store is read every POLL_S seconds in a worker thread
(`anyio.to_thread`), so an open stream holds no thread between reads, and the loop stops at
the first read after the client has gone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio

from app.schemas import JobOut
from worker.jobs import JobRecord

log = logging.getLogger(__name__)

POLL_S = 0.5  # the worker writes progress at most every IWAE_PROGRESS_INTERVAL_S (1 s)
KEEPALIVE_S = 15.0  # well under the 60 s idle timeout of common proxies (nginx, ELB)
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: do not buffer


def event(name: str, data: str) -> str:
    """One event; `data` is one line of JSON."""
    return f"event: {name}\ndata: {data}\n\n"


def _json(value: dict[str, str]) -> str:
    return json.dumps(value, separators=(",", ":"))  # compact, like the job's JSON


async def job_events(
    read: Callable[[], JobRecord],
    first: JobRecord,
    is_disconnected: Callable[[], Awaitable[bool]],
) -> AsyncIterator[str]:
    """The events of a job whose record is `first`, re-reading it with `read` (blocking)."""
    job, sent = first, None
    quiet_since = time.monotonic()
    while True:
        data = JobOut.of(job).model_dump_json()
        if data != sent:
            yield event("job", data)
            sent, quiet_since = data, time.monotonic()
        elif time.monotonic() - quiet_since >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        if job.finished:
            yield event("end", _json({"status": job.status}))
            return
        await anyio.sleep(POLL_S)
        if await is_disconnected():
            return
        try:
            job = await anyio.to_thread.run_sync(read)
        except Exception as exc:  # whatever the store raises, the stream ends with a reason
            log.warning("job events: cannot read the job: %s", exc)
            yield event("error", _json({"detail": f"the job could not be read: {exc}"}))
            return
