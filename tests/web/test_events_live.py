"""GET /jobs/{job_id}/events against a real `iwae serve` whose worker trains a tiny model:
read with httpx as any API client would, no browser."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.web.live_server import LiveServer

pytestmark = pytest.mark.integration


def test_the_events_follow_a_real_job_to_its_end_and_the_stream_closes(
    live_server: LiveServer,
) -> None:
    # Long enough (about 20,000 images) that training spans several polls of the stream even
    # on an idle machine; a tiny job can finish training between two polls.
    job_id = live_server.train(epochs=4, train_size=5000)
    received: list[tuple[str, Any]] = []
    name = None
    # The read timeout bounds the silence between events; the stream must end by itself.
    with httpx.stream(
        "GET", f"{live_server.url}/jobs/{job_id}/events", timeout=httpx.Timeout(5, read=60)
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                received.append((name, json.loads(line.removeprefix("data: "))))
    names = [name for name, _ in received]
    jobs = [data for name, data in received if name == "job"]
    assert names[-1] == "end" and set(names[:-1]) == {"job"}, names
    assert received[-1][1] == {"status": "succeeded"}
    assert jobs[-1] == live_server.client.get(f"/jobs/{job_id}").json()
    assert jobs[-1]["status"] == "succeeded" and jobs[-1]["metrics"]["test_loglik"] < 0
    # Progress arrived while it ran, in order.
    steps = [
        (job["progress"]["epoch"], job["progress"]["step"])
        for job in jobs
        if job["status"] == "running" and job["progress"] and job["progress"]["phase"] == "train"
    ]
    assert steps and steps == sorted(steps), steps
    assert len(jobs) == len({json.dumps(job, sort_keys=True) for job in jobs})  # no repeats
