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

Limits (`EventStreams`): at most IWAE_MAX_EVENT_STREAMS open at once (past it 429 with
Retry-After, before any read), each closed after IWAE_EVENT_STREAM_MAX_S (an EventSource
then reconnects by itself, so a tab left open costs one reconnection an hour, not a stream
forever); their reads run in EVENT_THREADS threads of their own, so a thousand open streams
never take the thread pool that the routes' blocking work runs in. An `error` event says
what happened in words for clients, never the store's own message (a Redis error names its
host and port).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.errors import TooManyStreams
from app.schemas import JobOut
from worker.jobs import JobNotFound, JobRecord

log = logging.getLogger(__name__)

POLL_S = 0.5  # the worker writes progress at most every IWAE_PROGRESS_INTERVAL_S (1 s)
KEEPALIVE_S = 15.0  # well under the 60 s idle timeout of common proxies (nginx, ELB)
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: do not buffer
EVENT_THREADS = 4  # threads reading the store for every open stream together


def event(name: str, data: str) -> str:
    """One event; `data` is one line of JSON."""
    return f"event: {name}\ndata: {data}\n\n"


def _json(value: dict[str, str]) -> str:
    return json.dumps(value, separators=(",", ":"))  # compact, like the job's JSON


async def job_events(
    read: Callable[[], JobRecord],
    first: JobRecord,
    is_disconnected: Callable[[], Awaitable[bool]],
    *,
    max_s: float = math.inf,
    limiter: anyio.CapacityLimiter | None = None,
) -> AsyncIterator[str]:
    """The events of a job whose record is `first`, re-reading it with `read` (blocking, in
    a thread of `limiter`) until it finishes or the stream is `max_s` old."""
    job, sent = first, None
    quiet_since = opened = time.monotonic()
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
        if time.monotonic() - opened >= max_s:
            yield f": closed after {max_s:g} s; reconnect to follow the job\n\n"
            return
        await anyio.sleep(POLL_S)
        if await is_disconnected():
            return
        try:
            job = await anyio.to_thread.run_sync(read, limiter=limiter)
        except Exception as exc:  # whatever the store raises, the stream ends with a reason
            log.warning("job events: cannot read the job: %s", exc)
            yield event("error", _json({"detail": _unreadable(exc)}))
            return


def _unreadable(exc: Exception) -> str:
    if isinstance(exc, JobNotFound):
        return "the job no longer exists"
    return "the job could not be read: job store unavailable"


class EventStreams:
    """The event streams of one app: how many are open, their limits, their threads."""

    def __init__(self, limit: int, max_s: float) -> None:
        self.limit = limit
        self.max_s = max_s
        self.open = 0  # changed on the event loop only: no lock
        self.limiter = anyio.CapacityLimiter(EVENT_THREADS)

    async def read(self, read: Callable[[], JobRecord]) -> JobRecord:
        return await anyio.to_thread.run_sync(read, limiter=self.limiter)

    def respond(
        self,
        read: Callable[[], JobRecord],
        first: JobRecord,
        is_disconnected: Callable[[], Awaitable[bool]],
    ) -> StreamingResponse:
        """The stream of the job whose record is `first`; `TooManyStreams` past the limit."""
        if self.open >= self.limit:
            raise TooManyStreams(
                f"{self.limit} event streams are open, the most this server keeps "
                "(IWAE_MAX_EVENT_STREAMS); retry later, or poll GET /jobs/{job_id}"
            )
        self.open += 1
        stream = job_events(read, first, is_disconnected, max_s=self.max_s, limiter=self.limiter)
        return _CountedStream(stream, self._closed)

    def _closed(self) -> None:
        self.open -= 1


class _CountedStream(StreamingResponse):
    """A stream that calls `closed` once it ends, however: finished, client gone, server
    stopping (a generator that never started would not run its own `finally`)."""

    def __init__(self, content: AsyncIterator[str], closed: Callable[[], None]) -> None:
        super().__init__(content, media_type=MEDIA_TYPE, headers=HEADERS)
        self._on_close = closed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
