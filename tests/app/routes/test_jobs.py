"""POST /train, GET /jobs, GET /jobs/{id}, POST /jobs/{id}/cancel, and the optional token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.deps import get_job_queue

VALID = {"k": 5}


def train(client: TestClient, body: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    return client.post("/train", json=VALID if body is None else body, **kwargs)


def test_train_answers_202_with_location_and_queues_the_job(client: TestClient, fake_queue) -> None:
    response = train(client, {"k": 50, "objective": "iwae-dreg", "epochs": 3, "layers": 2})
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "queued"
    assert response.headers["location"] == f"/jobs/{job['job_id']}"
    assert fake_queue.job_ids == [job["job_id"]]
    polled = client.get(response.headers["location"])
    assert polled.status_code == 200
    assert polled.json()["job_id"] == job["job_id"]


def test_a_flood_of_train_requests_meets_the_active_job_cap(
    make_client: Callable[..., TestClient], fake_queue
) -> None:
    client = make_client(max_active_jobs=5)
    answers = [train(client) for _ in range(12)]

    assert [r.status_code for r in answers] == [202] * 5 + [429] * 7
    refused = answers[-1]
    assert int(refused.headers["retry-after"]) > 0
    assert "IWAE_MAX_ACTIVE_JOBS" in refused.json()["detail"]
    assert len(fake_queue.job_ids) == 5  # nothing queued for the refused ones
    client.post(f"/jobs/{answers[0].json()['job_id']}/cancel")
    assert train(client).status_code == 202  # a finished job frees its place


def test_jobs_are_paged_with_a_cursor(client: TestClient) -> None:
    created = [train(client).json()["job_id"] for _ in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/jobs", params=params).json()
        seen += [job["job_id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == created[::-1]
    assert client.get("/jobs", params={"cursor": "../etc"}).status_code == 422


def test_train_records_the_full_config(client: TestClient) -> None:
    body = {
        "k": 5,
        "objective": "miwae",
        "m": 4,
        "beta": 0.3,
        "epochs": 2,
        "batch_size": 20,
        "learning_rate": 0.0005,
        "schedule": "burda",
        "layers": 2,
        "latent_dim": 10,
        "hidden_dim": 64,
        "train_size": 1000,
        "eval_size": 0,
        "eval_k": 100,
        "seed": 7,
        "precision": "bf16",
        "cuda_graphs": True,
    }
    config = train(client, body).json()["config"]
    assert config["model"] == {
        "layers": 2,
        "latent_dim": 10,
        "hidden_dim": 64,
        "x_dim": 784,
        "z1_dim": 64,  # unset: the paper's network, z1 as wide as the hidden layers
        "hidden2_dim": 10,
    }
    flat = {key: value for key, value in body.items() if key not in config["model"]}
    assert {key: config[key] for key in flat} == flat


def test_train_defaults_follow_the_paper(client: TestClient) -> None:
    config = train(client).json()["config"]
    assert config["objective"] == "iwae"
    assert config["eval_k"] == 5000
    assert config["model"]["hidden_dim"] == 200  # one stochastic layer: Burda's 200 units


def test_burda_preset_with_explicit_fields_over_it(client: TestClient) -> None:
    config = train(client, {"k": 50, "preset": "burda"}).json()["config"]
    assert (config["batch_size"], config["init"], config["schedule"]) == (20, "burda", "burda")
    assert (config["epochs"], config["eval_size"], config["eval_k"]) == (3280, 10_000, 5000)

    # Given explicitly, a field wins even when it equals the field's default.
    config = train(client, {"k": 50, "preset": "burda", "batch_size": 100, "epochs": 1}).json()
    assert (config["config"]["batch_size"], config["config"]["epochs"]) == (100, 1)
    assert config["config"]["init"] == "burda"


def test_two_layer_widths_of_the_authors_code(client: TestClient) -> None:
    body = {"k": 5, "layers": 2, "hidden_dim": 200, "z1_dim": 100, "hidden2_dim": 100}
    model = train(client, body).json()["config"]["model"]
    assert (model["hidden_dim"], model["z1_dim"], model["hidden2_dim"]) == (200, 100, 100)


def test_a_job_over_the_samples_per_step_budget_is_422_naming_cost_and_limit(
    client: TestClient, fake_queue
) -> None:
    """The issue's example: 5000 * 64 * 10000 logit rows a step would kill the worker."""
    body = {"k": 5000, "objective": "miwae", "m": 64, "batch_size": 10_000}
    response = train(client, body)
    assert response.status_code == 422
    error, step, total = response.json()["detail"]  # FLOPs per step and in all too
    assert (step["ctx"]["cost"], total["ctx"]["cost"]) == ("step_flops", "train_flops")
    assert error["ctx"] == {
        "cost": "samples_per_step",
        "limit": 250_000,
        "setting": "IWAE_MAX_SAMPLES_PER_STEP",
    }
    assert error["input"] == 5000 * 64 * 10_000
    assert "k*m*batch_size = 5000*64*10000 = 3,200,000,000" in error["msg"]
    assert "IWAE_MAX_SAMPLES_PER_STEP = 250,000" in error["msg"]
    assert fake_queue.job_ids == []
    assert client.get("/jobs").json()["jobs"] == []


def test_a_job_over_the_total_budget_is_422(client: TestClient, fake_queue) -> None:
    response = train(client, {"k": 50, "epochs": 10_000})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["ctx"]["setting"] == "IWAE_MAX_TRAIN_FLOPS"
    # Burda's one-layer model: 216,800 multiply-adds per image, 206,800 per sample.
    assert error["input"] == 6 * 10_000 * 60_000 * (216_800 + 50 * 206_800)
    assert "6*10000*60000*(216800 + 50*206800)" in error["msg"]
    assert fake_queue.job_ids == []


def test_a_wide_network_costs_its_width(client: TestClient, fake_queue) -> None:
    """hidden_dim 4096 at K=50, batches of 100: few samples a step (5000), but 100 times
    Burda's FLOPs per sample; counted in samples it was admitted."""
    response = train(client, {"k": 50, "hidden_dim": 4096})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["ctx"]["setting"] == "IWAE_MAX_STEP_FLOPS"
    assert error["input"] == 6 * (100 * 20_398_080 + 5000 * 20_193_280)
    assert train(client, {"k": 50, "hidden_dim": 200}).status_code == 202


def test_the_budgets_are_settings_and_inclusive(make_client: Callable[..., TestClient]) -> None:
    small = {"k": 50, "batch_size": 100, "train_size": 600}  # 6*600*(216800 + 50*206800)
    client = make_client(max_samples_per_step=5000, max_train_flops=6 * 600 * 10_556_800)
    assert train(client, small).status_code == 202
    assert train(client, {**small, "k": 51}).status_code == 422
    over_total = train(client, {**small, "epochs": 2})
    assert over_total.json()["detail"][0]["ctx"]["cost"] == "train_flops"
    client = make_client(max_step_flops=6 * (100 * 216_800 + 5000 * 206_800))
    assert train(client, {"k": 50, "batch_size": 100}).status_code == 202
    assert train(client, {"k": 50, "batch_size": 101}).json()["detail"][0]["ctx"]["cost"] == (
        "step_flops"
    )


@pytest.mark.parametrize(
    "body",
    [
        {},  # k is required
        {"k": 0},
        {"k": 5001},
        {"k": "many"},
        {"k": 5, "objective": "gan"},
        {"k": 5, "m": 0},
        {"k": 5, "beta": 1.5},
        {"k": 5, "beta": -0.1},
        {"k": 5, "epochs": 0},
        {"k": 5, "batch_size": 0},
        {"k": 5, "learning_rate": 0},
        {"k": 5, "learning_rate": 2},
        {"k": 5, "schedule": "cosine"},
        {"k": 5, "layers": 3},
        {"k": 5, "latent_dim": 0},
        {"k": 5, "hidden_dim": 0},
        {"k": 5, "train_size": 0},
        {"k": 5, "train_size": 60_001},
        {"k": 5, "eval_size": -1},
        {"k": 5, "eval_size": 10_001},
        {"k": 5, "eval_k": 0},
        {"k": 5, "snr_draws": -1},
        {"k": 5, "snr_draws": 7},  # too few draws for the bias-corrected SNR
        {"k": 5, "snr_draws": 10_001},
        {"k": 5, "seed": -1},
        {"k": 5, "precision": "fp16"},
        {"k": 5, "cuda_graphs": "sometimes"},
        {"k": 5, "device": "cuda"},  # not an API field: the worker decides
        {"k": 5, "learning_rte": 0.01},  # a typo is refused, not ignored
        {"k": 5, "init": "xavier"},
        {"k": 5, "preset": "kingma"},
        {"k": 5, "z1_dim": 100},  # one stochastic layer has no z1
        {"k": 5, "layers": 2, "hidden2_dim": 0},
    ],
)
def test_train_refuses_out_of_range_and_unknown_fields(
    client: TestClient, fake_queue, body: dict[str, Any]
) -> None:
    response = train(client, body)
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], list)
    assert fake_queue.job_ids == []


def test_train_refuses_a_body_that_is_not_json(client: TestClient) -> None:
    response = client.post("/train", content=b"k=5", headers={"content-type": "text/plain"})
    assert response.status_code == 422
    response = client.post("/train", content=b"{", headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_a_failing_broker_still_leaves_the_job_recorded(client: TestClient) -> None:
    def broken(job_id: str) -> None:
        raise ConnectionError("broker down")

    client.app.dependency_overrides[get_job_queue] = lambda: broken
    response = train(client)
    assert response.status_code == 202
    assert client.get(response.headers["location"]).json()["status"] == "queued"


def test_jobs_are_listed_newest_first(client: TestClient) -> None:
    ids = [train(client).json()["job_id"] for _ in range(3)]
    listed = client.get("/jobs").json()["jobs"]
    assert [job["job_id"] for job in listed] == ids[::-1]


def test_job_record_has_every_documented_field(client: TestClient) -> None:
    job = client.get(train(client).headers["location"]).json()
    for field in ("status", "config", "progress", "metrics", "model_id", "error"):
        assert field in job
    for field in ("created_at", "started_at", "finished_at", "updated_at"):
        assert field in job


def test_running_job_shows_its_progress(client: TestClient) -> None:
    job_id = train(client).json()["job_id"]
    store = client.app.state.store
    lease = store.claim(job_id, "test-worker")
    progress = {"phase": "train", "epoch": 0, "epochs": 1, "step": 3, "steps": 10, "loss": 180.5}
    store.update_progress(lease, {**progress, "images_per_s": 900.0, "eta_s": 2.0, "k": 12})
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "running"
    assert job["progress"]["step"] == 3 and job["progress"]["loss"] == 180.5
    assert job["progress"]["k"] == 12  # the K of the current epoch (K schedules)


def test_unknown_job_is_404(client: TestClient) -> None:
    response = client.get("/jobs/ffffffffffffffffffffffffffffffff")
    assert response.status_code == 404
    assert "ffff" in response.json()["detail"]
    assert client.post("/jobs/ffffffffffffffffffffffffffffffff/cancel").status_code == 404


def test_malformed_job_id_is_422(client: TestClient) -> None:
    assert client.get("/jobs/..%2F..%2Fetc").status_code in (404, 422)
    assert client.get("/jobs/.hidden").status_code == 422


def test_cancel_a_queued_job(client: TestClient) -> None:
    job_id = train(client).json()["job_id"]
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 202  # idempotent
    assert client.get(f"/jobs/{job_id}").json()["status"] == "cancelled"


def test_cancel_a_running_job_asks_it_to_stop(client: TestClient) -> None:
    job_id = train(client).json()["job_id"]
    client.app.state.store.claim(job_id, "test-worker")
    job = client.post(f"/jobs/{job_id}/cancel").json()
    assert job["status"] == "running" and job["cancel_requested"] is True
    assert client.app.state.store.cancel_requested(job_id)


def test_cancel_a_finished_job_is_409(client: TestClient) -> None:
    job_id = train(client).json()["job_id"]
    store = client.app.state.store
    store.finish(store.claim(job_id, "test-worker"), "succeeded", metrics={"test_loglik": -90})
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 409
    assert "finished" in response.json()["detail"]


@pytest.fixture
def guarded(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(api_token="s3cret")


def test_token_guards_train(guarded: TestClient, fake_queue) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}):
        response = train(guarded, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in response.json()["detail"]
    assert fake_queue.job_ids == []
    assert train(guarded, headers={"Authorization": "Bearer s3cret"}).status_code == 202


def test_token_guards_cancel_but_not_reads(guarded: TestClient) -> None:
    auth = {"Authorization": "Bearer s3cret"}
    job_id = train(guarded, headers=auth).json()["job_id"]
    assert guarded.post(f"/jobs/{job_id}/cancel").status_code == 401
    assert guarded.get("/jobs").status_code == 200
    assert guarded.get(f"/jobs/{job_id}").status_code == 200
    assert guarded.get("/models").status_code == 200
    assert guarded.post(f"/jobs/{job_id}/cancel", headers=auth).status_code == 202


def test_without_a_token_setting_writes_are_open(client: TestClient) -> None:
    assert train(client, headers={"Authorization": "Bearer anything"}).status_code == 202


def test_jobs_can_be_filtered_by_status_and_limited(client: TestClient) -> None:
    ids = [train(client).json()["job_id"] for _ in range(3)]
    client.post(f"/jobs/{ids[0]}/cancel")
    queued = client.get("/jobs", params={"status": "queued"}).json()["jobs"]
    assert [job["job_id"] for job in queued] == [ids[2], ids[1]]
    assert len(client.get("/jobs", params={"limit": 1}).json()["jobs"]) == 1
    assert client.get("/jobs", params={"status": "lost"}).status_code == 422
    assert client.get("/jobs", params={"limit": 0}).status_code == 422


@pytest.mark.parametrize(
    ("body", "recorded"),
    [
        ({"objective": "vr-iwae"}, {"alpha": 0.5, "k_schedule": "fixed", "k_min": None}),
        ({"objective": "vr-iwae-dreg", "alpha": 0.0}, {"alpha": 0.0}),
        ({"k_schedule": "linear"}, {"alpha": None, "k_min": 1, "ess_target": None}),
        ({"k_schedule": "ess", "k_min": 2}, {"k_min": 2, "ess_target": 0.15}),
        ({"k_schedule": "ess", "ess_target": 0.3}, {"k_min": 1, "ess_target": 0.3}),
    ],
)
def test_vr_iwae_and_k_schedule_options_are_recorded_with_their_defaults(
    client: TestClient, body: dict[str, Any], recorded: dict[str, Any]
) -> None:
    config = train(client, {"k": 5, **body}).json()["config"]
    assert {key: config[key] for key in recorded} == recorded


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"alpha": 0.5}, "alpha applies only"),  # objective iwae
        ({"objective": "ciwae", "alpha": 0.2}, "alpha applies only"),
        ({"objective": "vr-iwae", "alpha": 1.0}, "less than 1"),
        ({"objective": "vr-iwae", "alpha": -0.5}, "greater than or equal to 0"),
        ({"k_min": 2}, "k_min applies only"),  # k_schedule fixed
        ({"k_schedule": "linear", "k_min": 6}, "k_min must lie"),  # above k=5
        ({"k_schedule": "linear", "ess_target": 0.2}, "ess_target applies only"),
        ({"k_schedule": "ess", "ess_target": 0}, "greater than 0"),
        ({"k_schedule": "ess", "train_size": 100}, "train_size must exceed batch_size"),
        ({"k_schedule": "cosine"}, "'fixed', 'linear' or 'ess'"),
    ],
)
def test_vr_iwae_and_k_schedule_options_that_do_not_apply_are_422(
    client: TestClient, fake_queue, body: dict[str, Any], message: str
) -> None:
    response = train(client, {"k": 5, **body})
    assert response.status_code == 422
    assert message in str(response.json()["detail"])
    assert fake_queue.job_ids == []
