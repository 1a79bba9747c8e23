"""/healthz, /readyz and /metrics, with the job store or the broker down."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app.deps import job_store
from models.config import TrainConfig


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_when_storage_and_job_store_answer(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"storage": True, "job_store": True, "broker": True},
        "workers": 0,
        "gpu_workers": 0,
    }


def test_readyz_and_metrics_tell_whether_a_worker_consumes_the_queue(client: TestClient) -> None:
    store = client.app.state.store
    assert client.get("/readyz").json()["workers"] == 0
    assert 'iwae_workers{queue="iwae.training"}' not in client.get("/metrics").text

    store.report_worker("gpu-box:12", ["iwae.training", "iwae.training.cuda"])
    store.report_worker("gpu-box:12", ["iwae.training", "iwae.training.cuda"], "succeeded")
    store.report_worker("cpu-box:7", ["iwae.other"])
    client.post("/train", json={"k": 5})

    assert client.get("/readyz").json()["workers"] == 1  # cpu-box consumes another queue
    text = client.get("/metrics").text
    assert 'iwae_workers{queue="iwae.training"} 1.0' in text
    assert 'iwae_workers{queue="iwae.training.cuda"} 1.0' in text
    assert 'iwae_worker_messages{outcome="succeeded",worker="gpu-box:12"} 1.0' in text
    assert "iwae_queue_depth 1.0" in text


def test_a_queued_job_says_which_worker_it_waits_for_and_readyz_counts_gpu_workers(
    client: TestClient,
) -> None:
    store = client.app.state.store
    cpu_job = client.post("/train", json={"k": 5}).json()["job_id"]
    gpu_job = store.create(TrainConfig(k=5, device="cuda").to_dict()).job_id

    def waiting() -> tuple[str | None, str | None]:
        return tuple(client.get(f"/jobs/{j}").json()["waiting_for"] for j in (cpu_job, gpu_job))

    def counts() -> tuple[int, int]:
        ready = client.get("/readyz").json()
        return ready["workers"], ready["gpu_workers"]

    assert waiting() == (
        "no worker is up: the job waits on the queue 'iwae.training' until one starts",
        "no GPU worker is up: the job waits on the queue 'iwae.training.cuda' until one starts",
    )
    assert counts() == (0, 0)
    store.report_worker("cpu-box:7", ["iwae.training"])
    assert waiting() == (
        None,
        "no GPU worker is up: the job waits on the queue 'iwae.training.cuda' until one starts",
    )
    assert counts() == (1, 0)
    store.report_worker("gpu-box:12", ["iwae.training", "iwae.training.cuda"])
    assert waiting() == (None, None)
    assert counts() == (2, 1)
    assert client.get("/jobs").json()["jobs"][0]["waiting_for"] is None, "only on GET /jobs/{id}"


def test_readyz_is_503_when_the_job_store_does_not_answer(client: TestClient) -> None:
    class Down:
        def ping(self) -> bool:
            return False

    client.app.dependency_overrides[job_store] = Down
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "job_store" in response.json()["detail"]


@pytest.fixture
def no_redis(make_client: Callable[..., TestClient]) -> TestClient:
    """Distributed mode with a broker URL where nothing listens."""
    return make_client(broker_url="redis://127.0.0.1:9/0")


def test_readyz_is_503_when_the_broker_is_unreachable(no_redis: TestClient) -> None:
    response = no_redis.get("/readyz")
    assert response.status_code == 503
    assert "broker" in response.json()["detail"]


def test_job_routes_are_503_when_redis_is_down(no_redis: TestClient) -> None:
    response = no_redis.get("/jobs")
    assert response.status_code == 503
    assert "job store unavailable" in response.json()["detail"]
    assert no_redis.get("/metrics").status_code == 200  # still scrapeable


def test_a_redis_error_names_no_host_or_port(
    no_redis: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    response = no_redis.get("/jobs")
    assert response.json() == {"detail": "job store unavailable"}
    assert "127.0.0.1:9" in caplog.text, "the details go to the server's log"


def test_metrics_count_requests_per_route_template(client: TestClient) -> None:
    job_id = client.post("/train", json={"k": 5}).json()["job_id"]
    client.get(f"/jobs/{job_id}")
    client.get("/jobs/ffffffffffffffffffffffffffffffff")
    client.get("/no/such/route")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'iwae_http_requests_total{method="POST",route="/train",status="202"} 1.0' in text
    assert 'iwae_http_requests_total{method="GET",route="/jobs/{job_id}",status="200"} 1.0' in text
    assert 'iwae_http_requests_total{method="GET",route="/jobs/{job_id}",status="404"} 1.0' in text
    assert 'route="<unmatched>",status="404"' in text
    assert job_id not in text  # ids never become labels
    assert 'iwae_http_request_duration_seconds_count{method="POST",route="/train"} 1.0' in text


def test_metrics_count_jobs_per_status(client: TestClient) -> None:
    for _ in range(2):
        client.post("/train", json={"k": 5})
    job_id = client.post("/train", json={"k": 5}).json()["job_id"]
    client.post(f"/jobs/{job_id}/cancel")
    text = client.get("/metrics").text
    assert 'iwae_jobs{status="queued"} 2.0' in text
    assert 'iwae_jobs{status="cancelled"} 1.0' in text
    assert 'iwae_jobs{status="running"} 0.0' in text
