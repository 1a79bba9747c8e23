"""Prometheus metrics: requests and latencies per route template, jobs per status.

Each app owns its `CollectorRegistry`, so several apps in one process (tests) do not clash.
Routes are labelled by their template (`/jobs/{job_id}`), never the raw path, to keep the
number of series bounded.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.jobs import STATUSES, WorkerInfo

UNMATCHED = "<unmatched>"
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "iwae_http_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "iwae_http_request_duration_seconds",
            "Time from request to the end of the response, by method and route template.",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.jobs = Gauge(
            "iwae_jobs",
            "Training jobs by status: queued and running now; the finished statuses count "
            "every job that ended so (records since expired included).",
            ["status"],
            registry=self.registry,
        )

        self.queue_depth = Gauge(
            "iwae_queue_depth",
            "Training jobs queued and not yet claimed by a worker.",
            registry=self.registry,
        )
        self.workers = Gauge(
            "iwae_workers",
            "Live workers (reported within three reaper intervals), by queue they consume.",
            ["queue"],
            registry=self.registry,
        )
        self.worker_messages = Gauge(
            "iwae_worker_messages",
            "Training messages each live worker handled since it started, by outcome "
            "(succeeded, failed, cancelled, released, lost, dropped, unclaimed, unrecorded).",
            ["worker", "outcome"],
            registry=self.registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(
        self, job_counts: Mapping[str, int] | None, workers: Sequence[WorkerInfo] | None = None
    ) -> bytes:
        """The text exposition; `job_counts` (jobs by status) and `workers` (the live ones)
        set the job and worker gauges, when known.
        """
        if job_counts is not None:
            for status in STATUSES:
                self.jobs.labels(status).set(job_counts.get(status, 0))
            self.queue_depth.set(job_counts.get("queued", 0))
        if workers is not None:
            self.workers.clear()
            self.worker_messages.clear()
            for worker in workers:
                for queue in worker.queues:
                    self.workers.labels(queue).inc()
                for outcome, count in worker.outcomes.items():
                    self.worker_messages.labels(worker.name, outcome).set(count)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware): times each HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            self.metrics.observe(scope["method"], template, status, time.perf_counter() - start)
