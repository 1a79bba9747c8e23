"""Backpressure for model calls: a few run, a few wait, the rest are refused at once.

One torch call (a k=100000 log-likelihood takes about a second) already uses every core, so
running forty at once, as a plain thread pool would, makes each forty times slower and the
server's queue unbounded. `InferenceGate` lets `concurrency` calls run, each in a thread of
its own pool, lets `queue` more wait for a slot, and refuses the rest with `Overloaded`
(503 with Retry-After). A request is admitted before its upload is decoded or its model
loaded, so a refused one costs neither. Each call has a deadline, its wait included, and
stops when its client disconnects: both are checked between chunks of work through
`InferenceCall.check`, which the model code calls (a callback of
`models.estimators.log_likelihood`). Health and metrics routes never come here and never
use the default thread pool, so they answer whatever the load.

The counters are touched only on the event loop, so they need no lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import anyio
from starlette.types import Receive

from app.errors import ClientDisconnected, DeadlineExceeded, Overloaded

T = TypeVar("T")


class InferenceGate:
    """At most `concurrency` model calls at once, `queue` waiting, `timeout_s` each."""

    def __init__(
        self,
        concurrency: int,
        queue: int,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self.timeout_s = timeout_s
        self.clock = clock
        self.admitted = 0  # running + waiting
        self.slots = anyio.Semaphore(concurrency)  # taken by running calls
        self.threads = anyio.CapacityLimiter(concurrency)  # their threads, not the default pool's

    @contextmanager
    def admit(self, receive: Receive) -> Iterator[InferenceCall]:
        """A place for one request's call, held until the block ends; `Overloaded` at once
        when `concurrency + queue` are taken. Its deadline starts now."""
        if self.admitted >= self.concurrency + self.queue:
            raise Overloaded(
                f"the server is busy: {self.concurrency} model calls running and "
                f"{self.queue} waiting; try again shortly"
            )
        self.admitted += 1
        try:
            yield InferenceCall(self, receive, self.clock() + self.timeout_s)
        finally:
            self.admitted -= 1


class InferenceCall:
    """One admitted request's model call: `await call(fn, *args)` runs `fn` in the gate's
    threads.

    `check()` may be called from that thread between chunks of work: it raises
    `DeadlineExceeded` past the deadline and `ClientDisconnected` once the client has gone.
    """

    def __init__(self, gate: InferenceGate, receive: Receive, deadline: float) -> None:
        self.gate = gate
        self.deadline = deadline
        self._receive = receive
        self._gone = threading.Event()
        self._waiting: anyio.CancelScope | None = None

    def check(self, *_progress: object) -> None:
        """Raise if the call should stop; ignores its arguments, so that it can serve as any
        progress callback (`on_chunk=call.check`)."""
        self._check_connected()
        if self.gate.clock() > self.deadline:
            raise DeadlineExceeded(
                f"the model call took longer than IWAE_INFERENCE_TIMEOUT_S "
                f"({self.gate.timeout_s:g} s); try again with a smaller k or later"
            )

    def _check_connected(self) -> None:
        if self._gone.is_set():
            raise ClientDisconnected("the client closed the connection")

    async def __call__(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in a free slot's thread, waiting for one until the deadline."""
        async with anyio.create_task_group() as watchers:
            watchers.start_soon(self._watch_disconnect)
            try:
                result = await self._run(partial(fn, *args, **kwargs))
            except Exception as exc:  # raised below, not wrapped in an ExceptionGroup
                error = exc
            else:
                error = None
            watchers.cancel_scope.cancel()
        if error is not None:
            raise error
        return result

    async def _run(self, work: Callable[[], T]) -> T:
        with anyio.move_on_after(self.deadline - self.gate.clock()) as waiting:
            self._waiting = waiting
            await self.gate.slots.acquire()
        self._waiting = None
        if waiting.cancelled_caught:  # the client left, or the deadline passed
            self._check_connected()
            raise DeadlineExceeded(
                f"the server is busy: no model slot was free within "
                f"IWAE_INFERENCE_TIMEOUT_S ({self.gate.timeout_s:g} s); try again shortly"
            )
        try:
            self.check()
            return await anyio.to_thread.run_sync(work, limiter=self.gate.threads)
        finally:
            self.gate.slots.release()

    async def _watch_disconnect(self) -> None:
        """Read the ASGI messages left (the body has been read, or the route takes none)
        until the client's disconnect."""
        try:
            while (await self._receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a body the route never reads was refused (over the size limit)
            return
        self._gone.set()
        if self._waiting is not None:
            self._waiting.cancel()
