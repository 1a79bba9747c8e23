"""GET /samples, POST /reconstruct, POST /loglik on a tiny checkpoint; POST /impute is
tested with the rest of imputation in tests/app/test_impute.py."""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

OTHER_ID = "fedcba9876543210fedcba9876543210"


def digit_png(size: int = 120, dark_on_light: bool = True) -> bytes:
    """A hand-drawn-looking '7', dark ink on white as users draw it."""
    ink, paper = (0, 255) if dark_on_light else (255, 0)
    image = Image.new("L", (size, size), paper)
    draw = ImageDraw.Draw(image)
    draw.line((20, 20, 100, 20), fill=ink, width=10)
    draw.line((100, 20, 50, 105), fill=ink, width=10)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def upload(data: bytes, name: str = "digit.png", mime: str = "image/png") -> dict:
    return {"file": (name, data, mime)}


# --- samples --------------------------------------------------------------------------


def test_samples_without_any_model_is_409_saying_how_to_train(client: TestClient) -> None:
    response = client.get("/samples")
    assert response.status_code == 409
    assert "POST /train" in response.json()["detail"]


def test_samples_of_an_unknown_model_is_404(client: TestClient, tiny_model: str) -> None:
    assert client.get("/samples", params={"model_id": OTHER_ID}).status_code == 404


def test_samples_with_a_malformed_model_id_is_422(client: TestClient, tiny_model: str) -> None:
    assert client.get("/samples", params={"model_id": "../models"}).status_code == 422


def test_samples_png_grid_by_default(client: TestClient, tiny_model: str) -> None:
    response = client.get("/samples")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    grid = Image.open(io.BytesIO(response.content))
    assert grid.size == (4 * 30 + 2, 4 * 30 + 2)  # n=16: 4x4 digits of 28 with 2 pixels apart


def test_samples_json_are_784_bernoulli_means(client: TestClient, tiny_model: str) -> None:
    response = client.get("/samples", params={"n": 5, "format": "json"})
    assert response.status_code == 200
    body = response.json()
    assert body["model_id"] == tiny_model
    values = np.array(body["samples"])
    assert values.shape == (5, 784)
    assert values.min() >= 0.0 and values.max() <= 1.0


def test_samples_with_a_seed_are_reproducible(client: TestClient, tiny_model: str) -> None:
    def draw(seed: int) -> list:
        return client.get("/samples", params={"n": 3, "format": "json", "seed": seed}).json()

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


@pytest.mark.parametrize("params", [{"n": 0}, {"n": 1025}, {"n": "x"}, {"format": "gif"}])
def test_samples_bad_query_is_422(client: TestClient, tiny_model: str, params: dict) -> None:
    response = client.get("/samples", params=params)
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], list)


def test_sample_limit_is_a_setting(make_client: Callable[..., TestClient], tiny_model: str) -> None:
    client = make_client(max_samples=8)
    assert client.get("/samples", params={"n": 8}).status_code == 200
    response = client.get("/samples", params={"n": 9})
    assert response.status_code == 422
    assert response.json()["detail"][0]["ctx"] == {"le": 8}


def test_newest_model_is_the_default(client: TestClient, add_model, tiny_model: str) -> None:
    later = datetime.now(UTC) + timedelta(minutes=1)
    add_model(OTHER_ID, seed=1, created_at=later)
    assert [m["model_id"] for m in client.get("/models").json()["models"]] == [
        OTHER_ID,
        tiny_model,
    ]
    body = client.get("/samples", params={"n": 1, "format": "json"}).json()
    assert body["model_id"] == OTHER_ID
    chosen = client.get("/samples", params={"n": 1, "format": "json", "model_id": tiny_model})
    assert chosen.json()["model_id"] == tiny_model


# --- reconstruct ----------------------------------------------------------------------


def test_reconstruct_png_by_default(client: TestClient, tiny_model: str) -> None:
    response = client.post("/reconstruct", files=upload(digit_png()))
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (28, 28)


def test_reconstruct_json(client: TestClient, tiny_model: str) -> None:
    response = client.post(
        "/reconstruct", files=upload(digit_png()), params={"format": "json", "model_id": tiny_model}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["model_id"] == tiny_model
    assert len(body["reconstruction"]) == 784 and len(body["input"]) == 784
    assert min(body["reconstruction"]) >= 0.0 and max(body["reconstruction"]) <= 1.0
    assert set(body["input"]) == {0.0, 1.0}  # binarized at 0.5


def test_reconstruct_without_a_model_is_409(client: TestClient) -> None:
    assert client.post("/reconstruct", files=upload(digit_png())).status_code == 409


# --- loglik ---------------------------------------------------------------------------


def test_loglik_default_k(client: TestClient, tiny_model: str) -> None:
    response = client.post("/loglik", files=upload(digit_png()))
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "model_id", "k", "log_likelihood", "std_error", "elbo", "bits_per_dim", "ess", "pareto_k"
    }  # fmt: skip
    assert 1.0 <= body["ess"] <= 5000.0
    assert math.isfinite(body["pareto_k"])
    assert body["model_id"] == tiny_model
    assert body["k"] == 5000
    assert math.isfinite(body["log_likelihood"]) and body["log_likelihood"] <= 0.0
    assert body["std_error"] >= 0.0
    assert body["elbo"] <= body["log_likelihood"] + 1e-3  # Jensen: ELBO <= IWAE bound
    expected_bpd = -body["log_likelihood"] / (784 * math.log(2))
    assert body["bits_per_dim"] == pytest.approx(expected_bpd, rel=1e-6)


def test_loglik_with_a_seed_is_reproducible(client: TestClient, tiny_model: str) -> None:
    def score(seed: int) -> float:
        params = {"k": 100, "seed": seed}
        return client.post("/loglik", files=upload(digit_png()), params=params).json()

    assert score(3) == score(3)


def test_loglik_k_one_is_the_elbo(client: TestClient, tiny_model: str) -> None:
    body = client.post("/loglik", files=upload(digit_png()), params={"k": 1}).json()
    assert body["log_likelihood"] == pytest.approx(body["elbo"], abs=1e-4)
    # One weight: an ESS of 1 and no tail to fit.
    assert body["ess"] == pytest.approx(1.0) and body["pareto_k"] is None


def test_loglik_is_the_same_for_dark_on_light_and_light_on_dark(
    client: TestClient, tiny_model: str
) -> None:
    def score(data: bytes) -> float:
        params = {"k": 50, "seed": 0}
        return client.post("/loglik", files=upload(data), params=params).json()["log_likelihood"]

    assert score(digit_png(dark_on_light=True)) == score(digit_png(dark_on_light=False))


@pytest.mark.parametrize("k", [0, 100_001, -5, "lots"])
def test_loglik_k_out_of_range_is_422(client: TestClient, tiny_model: str, k) -> None:
    response = client.post("/loglik", files=upload(digit_png()), params={"k": k})
    assert response.status_code == 422


def test_loglik_limit_is_a_setting(make_client: Callable[..., TestClient], tiny_model: str) -> None:
    client = make_client(max_loglik_k=200, default_loglik_k=100)
    assert client.post("/loglik", files=upload(digit_png())).json()["k"] == 100
    assert client.post("/loglik", files=upload(digit_png()), params={"k": 201}).status_code == 422


def test_loglik_without_a_model_is_409(client: TestClient) -> None:
    response = client.post("/loglik", files=upload(digit_png()))
    assert response.status_code == 409


def test_loglik_of_an_unknown_model_is_404(client: TestClient, tiny_model: str) -> None:
    response = client.post("/loglik", files=upload(digit_png()), params={"model_id": OTHER_ID})
    assert response.status_code == 404


def test_concurrent_requests_are_served(client: TestClient, tiny_model: str) -> None:
    results: list[int] = []

    def work(i: int) -> None:
        if i % 2:
            response = client.post("/loglik", files=upload(digit_png()), params={"k": 500})
        else:
            response = client.get("/samples", params={"n": 4, "format": "json"})
        results.append(response.status_code)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 8
