"""Prometheus metrics (app.metrics): requests counted by route template, jobs and workers
set from what the job store says, each app with its own registry."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.metrics import UNMATCHED, Metrics, MetricsMiddleware
from worker.jobs import STATUSES, WorkerInfo


def lines(metrics: Metrics, *args: Any) -> set[str]:
    """The exposition's lines after `render(*args)`."""
    return set(metrics.render(*args).decode().splitlines())


def test_every_status_is_a_series_and_queued_is_the_queue_depth() -> None:
    text = lines(Metrics(), {"queued": 3, "succeeded": 7})
    expected = {"queued": 3.0, "succeeded": 7.0}
    for status in STATUSES:
        assert f'iwae_jobs{{status="{status}"}} {expected.get(status, 0.0)}' in text
    assert "iwae_queue_depth 3.0" in text


def test_workers_are_counted_per_queue_with_their_outcomes() -> None:
    workers = [
        WorkerInfo(name="a", queues=["q", "q.cuda"], seen_s_ago=0, outcomes={"succeeded": 2}),
        WorkerInfo(name="b", queues=["q"], seen_s_ago=0),
    ]
    text = lines(Metrics(), None, workers)
    assert 'iwae_workers{queue="q"} 2.0' in text
    assert 'iwae_workers{queue="q.cuda"} 1.0' in text
    assert 'iwae_worker_messages{outcome="succeeded",worker="a"} 2.0' in text


def test_workers_that_left_are_dropped_and_unknown_counts_keep_the_last() -> None:
    metrics = Metrics()
    metrics.render({"queued": 1}, [WorkerInfo(name="a", queues=["old"], seen_s_ago=0)])
    text = lines(metrics, None, [WorkerInfo(name="b", queues=["new"], seen_s_ago=0)])
    assert 'iwae_workers{queue="new"} 1.0' in text
    assert not any('queue="old"' in line for line in text)
    assert "iwae_queue_depth 1.0" in text  # None: the job store did not answer this time


def test_two_apps_keep_separate_counts() -> None:
    first, second = Metrics(), Metrics()
    first.observe("GET", "/x", 200, 0.01)
    assert 'iwae_http_requests_total{method="GET",route="/x",status="200"} 1.0' in lines(
        first, None
    )
    assert not any('route="/x"' in line for line in lines(second, None))


def test_the_middleware_labels_routes_by_template_and_counts_failures() -> None:
    metrics = Metrics()
    app = FastAPI()
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.get("/items/{item_id}")
    def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as client:
        client.get("/items/1")
        client.get("/items/2")
        client.get("/nowhere")
        client.get("/boom")
    text = lines(metrics, None)
    total = "iwae_http_requests_total"
    assert f'{total}{{method="GET",route="/items/{{item_id}}",status="200"}} 2.0' in text
    assert f'{total}{{method="GET",route="{UNMATCHED}",status="404"}} 1.0' in text
    assert f'{total}{{method="GET",route="/boom",status="500"}} 1.0' in text


def test_other_scopes_pass_through_untimed() -> None:
    seen: list[str] = []

    async def inner(scope: dict, receive: object, send: object) -> None:
        seen.append(scope["type"])

    metrics = Metrics()
    anyio.run(MetricsMiddleware(inner, metrics), {"type": "lifespan"}, None, None)
    assert seen == ["lifespan"]
    assert not any(line.startswith("iwae_http_requests_total{") for line in lines(metrics, None))
