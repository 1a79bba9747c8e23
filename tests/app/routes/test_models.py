"""GET /models and GET /models/{model_id}: the trained models, listed when described."""

from __future__ import annotations

from fastapi.testclient import TestClient

OTHER_ID = "fedcba9876543210fedcba9876543210"


def test_models_lists_trained_models_with_config_and_metrics(
    client: TestClient, tiny_model: str
) -> None:
    models = client.get("/models").json()["models"]
    assert [m["model_id"] for m in models] == [tiny_model]
    assert models[0]["config"]["model"]["latent_dim"] == 4
    assert models[0]["metrics"]["test_loglik"] == -200.0
    one = client.get(f"/models/{tiny_model}")
    assert one.status_code == 200 and one.json() == models[0]


def test_models_is_empty_before_training(client: TestClient) -> None:
    assert client.get("/models").json() == {"models": [], "next_cursor": None}


def test_a_checkpoint_without_model_json_is_not_listed(client: TestClient, add_model) -> None:
    add_model(OTHER_ID, describe=False)  # still training
    assert client.get("/models").json() == {"models": [], "next_cursor": None}
    assert client.get(f"/models/{OTHER_ID}").status_code == 404


def test_unknown_model_is_404(client: TestClient, tiny_model: str) -> None:
    response = client.get(f"/models/{OTHER_ID}")
    assert response.status_code == 404
    assert OTHER_ID in response.json()["detail"]
