"""The one table from domain exception to HTTP answer (app.errors): each exception leaves as
JSON `{"detail": ...}` with its status, 401 asks for Bearer, load shedding says when to come
back, and a server-side fault is logged, never sent."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app import errors
from app.errors import STATUS_CODES, install_error_handlers
from worker.jobs import TooManyJobs

# The API's own exceptions, which take a client's message (the others take ids).
OWN = [t for t in STATUS_CODES if t.__module__ == "app.errors"]


def raising(exc: Exception) -> TestClient:
    """A client of an app whose one route raises `exc`, with the API's handlers."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/fail")
    def fail() -> None:
        raise exc

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("exc_type", OWN, ids=lambda t: t.__name__)
def test_each_exception_is_its_status_and_its_message(exc_type: type[Exception]) -> None:
    response = raising(exc_type("what the client should know")).get("/fail")
    assert response.status_code == STATUS_CODES[exc_type]
    assert response.json() == {"detail": "what the client should know"}


def test_a_subclass_takes_its_nearest_listed_base_s_status() -> None:
    class Stricter(errors.ModelNotFound):
        pass

    assert raising(Stricter("gone")).get("/fail").status_code == 404


def test_401_asks_for_a_bearer_token() -> None:
    response = raising(errors.NotAuthenticated("token, please")).get("/fail")
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("exc", "retry_after"),
    [
        (errors.Overloaded("busy"), "1"),
        (errors.DeadlineExceeded("too slow"), "1"),
        (TooManyJobs(limit=5, retry_after_s=30), "30"),
        (errors.NotReady("not ready"), None),
    ],
)
def test_load_shedding_says_when_to_come_back(exc: Exception, retry_after: str | None) -> None:
    response = raising(exc).get("/fail")
    assert response.headers.get("Retry-After") == retry_after


def test_a_redis_error_is_503_without_its_address(caplog: pytest.LogCaptureFixture) -> None:
    response = raising(redis.ConnectionError("Error 111 connecting to 10.0.0.7:6379")).get("/fail")
    assert (response.status_code, response.json()) == (503, {"detail": "job store unavailable"})
    assert "10.0.0.7:6379" in caplog.text


# --- through the API ----------------------------------------------------------------------


def test_an_unexpected_error_is_a_plain_500_and_its_details_are_logged(
    client: TestClient,
    tiny_model: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from app import inference

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("/srv/secret/model.bin via redis://10.0.0.7:6379")

    monkeypatch.setattr(inference, "sample", fail)
    response = client.get("/samples")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert "/srv/secret/model.bin" in caplog.text


def test_a_server_error_names_no_file_of_the_server(
    client: TestClient, home: Path, tiny_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = home / "models" / tiny_model / "model.safetensors"
    checkpoint.unlink()
    checkpoint.mkdir()  # opening it fails with an OSError that names its path
    response = client.get("/samples")
    assert response.status_code == 500
    assert response.json() == {"detail": f"model {tiny_model!r} cannot be loaded"}
    assert str(checkpoint) in caplog.text, "the details go to the server's log"


def test_a_corrupt_checkpoint_is_a_clear_server_error(
    client: TestClient, home: Path, tiny_model: str
) -> None:
    (home / "models" / tiny_model / "model.safetensors").write_bytes(b"not a checkpoint")
    response = client.get("/samples")
    assert response.status_code == 500
    assert "cannot be loaded" in response.json()["detail"]


def test_unknown_route_and_wrong_method_are_json(client: TestClient) -> None:
    assert client.get("/nope").json() == {"detail": "Not Found"}
    response = client.get("/train")
    assert response.status_code == 405
    assert "detail" in response.json()
