"""/healthz, /readyz, /metrics, /docs and /openapi.json; errors are JSON everywhere."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app.deps import job_store
from app.schemas import TrainRequest
from app.settings import Settings
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


def test_unknown_route_and_wrong_method_are_json(client: TestClient) -> None:
    assert client.get("/nope").json() == {"detail": "Not Found"}
    response = client.get("/train")
    assert response.status_code == 405
    assert "detail" in response.json()


def test_docs_render(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert "swagger" in response.text.lower()
    assert client.get("/redoc").status_code == 200


def test_openapi_documents_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    expected = {
        ("post", "/train"),
        ("get", "/jobs"),
        ("get", "/jobs/{job_id}"),
        ("get", "/jobs/{job_id}/events"),
        ("post", "/jobs/{job_id}/cancel"),
        ("get", "/models"),
        ("get", "/models/{model_id}"),
        ("get", "/samples"),
        ("post", "/reconstruct"),
        ("post", "/loglik"),
        ("post", "/impute"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("post", "/studies"),
        ("get", "/studies"),
        ("get", "/studies/{study_id}"),
        ("get", "/studies/{study_id}/results.json"),
        ("get", "/studies/{study_id}/report"),
        ("get", "/studies/{study_id}/figures/{name}.png"),
        ("post", "/studies/{study_id}/cancel"),
    }
    assert {(m, p) for p, methods in paths.items() for m in methods} == expected
    assert "202" in paths["/train"]["post"]["responses"]
    assert {"202", "422", "429"} <= set(paths["/studies"]["post"]["responses"])
    assert "multipart/form-data" in paths["/loglik"]["post"]["requestBody"]["content"]


def test_every_train_field_has_a_description_and_an_example(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["TrainRequest"]
    assert set(schema["properties"]) == set(TrainRequest.model_fields)
    for name, prop in schema["properties"].items():
        assert prop.get("examples"), f"{name} has no example"
        assert prop.get("description"), f"{name} has no description"
    assert schema["required"] == ["k"]
    assert schema["additionalProperties"] is False


def test_a_study_takes_every_train_field_but_the_grid_s_each_described(
    client: TestClient,
) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    study = schemas["StudyRequest"]
    grid = {"ks", "objectives", "seeds"}
    assert (
        set(study["properties"])
        == set(TrainRequest.model_fields) - {"k", "objective", "seed"} | grid
    )
    for name, prop in study["properties"].items():
        assert prop.get("examples"), f"{name} has no example"
        assert prop.get("description"), f"{name} has no description"
    assert study["required"] == ["ks"]
    assert study["additionalProperties"] is False
    assert study["properties"]["snr_draws"]["default"] == 100  # on for studies only


def test_every_setting_has_a_default_and_a_description() -> None:
    for name, field in Settings.model_fields.items():
        assert not field.is_required(), f"{name} has no default"
        assert field.description, f"{name} has no description"


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IWAE_API_TOKEN", "t0ken")
    monkeypatch.setenv("IWAE_MAX_SAMPLES", "12")
    settings = Settings()
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == "t0ken"
    assert "t0ken" not in repr(settings)
    assert settings.max_samples == 12


def test_default_k_must_not_exceed_the_limit() -> None:
    with pytest.raises(ValueError, match="default_loglik_k"):
        Settings(max_loglik_k=10, default_loglik_k=100)


def test_torch_threads_setting_applies_at_startup(make_client: Callable[..., TestClient]) -> None:
    import torch

    before = torch.get_num_threads()
    seen: list[int] = []
    try:
        make_client(torch_threads=1)
        # Threads that have already run torch keep their count; request threads are new.
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert seen == [1]
    finally:
        torch.set_num_threads(before)
