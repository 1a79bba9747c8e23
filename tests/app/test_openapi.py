"""Every answer to malformed input is one that /openapi.json documents for the route.

The requests are derived from the schema itself (each path and query parameter, each
request body's media type), so a new route is checked without a new test. This is the
property a schema fuzzer such as schemathesis checks, without its network or its run time.
The document lists every route, and every request field has a description and an example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.schemas import TrainRequest

MAX_BODY = 4096
TINY_MODEL_ID = "0123456789abcdef0123456789abcdef"
# Bodies a broken client might send: bad JSON, bytes that are not UTF-8, nesting deeper than
# Python's parser goes, the wrong JSON type, and nothing at all.
BAD_JSON = [b"{", b"\x80", b'{"k": "\xff"}', b"[" * 3000, b"[]", b'"k"', b""]
BAD_MULTIPART = {
    "multipart/form-data": b"--x\r\n",  # no boundary
    "multipart/form-data; boundary=x": b"garbage",
    "application/json": b"{}",
    "text/plain": b"hello",
}


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def url(path: str, operation: dict[str, Any], bad_path: str | None = None) -> str:
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "path":
            value = TINY_MODEL_ID if bad_path is None else bad_path
            path = path.replace("{" + parameter["name"] + "}", value)
    return path


def malformed(path: str, operation: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(what, request arguments) for each kind of malformed input the operation takes."""
    parameters = operation.get("parameters", [])
    if any(p["in"] == "path" for p in parameters):
        for bad in ("a%20b", ".hidden", "x" * 300):
            yield f"path {bad[:10]}", {"url": url(path, operation, bad)}
    for parameter in (p for p in parameters if p["in"] == "query"):
        for bad in ("", "x", "-1", "1e999", "9" * 40):
            yield (
                f"query {parameter['name']}={bad[:10]}",
                {
                    "url": url(path, operation),
                    "params": {parameter["name"]: bad},
                },
            )
    content = operation.get("requestBody", {}).get("content", {})
    for media_type in content:
        bodies = (
            [("application/json", body) for body in BAD_JSON]
            if media_type == "application/json"
            else list(BAD_MULTIPART.items())
        )
        bodies.append((media_type, b"x" * (MAX_BODY + 1)))  # over IWAE_MAX_UPLOAD_BYTES
        for content_type, body in bodies:
            yield (
                f"body {content_type} {body[:10]!r}",
                {
                    "url": url(path, operation),
                    "content": body,
                    "headers": {"Content-Type": content_type},
                },
            )


@pytest.fixture
def client(make_client: Callable[..., TestClient], tiny_model: str) -> TestClient:
    assert tiny_model == TINY_MODEL_ID
    return make_client(max_upload_bytes=MAX_BODY)


def test_malformed_input_gets_a_documented_status_and_a_json_detail(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    undocumented = []
    checked = 0
    for path, method, operation in operations(spec):
        documented = {int(code) for code in operation["responses"]}
        for what, request in malformed(path, operation):
            response = client.request(method.upper(), **request)
            checked += 1
            if response.status_code not in documented:
                undocumented.append(f"{method.upper()} {path} {what}: {response.status_code}")
            elif response.status_code >= 400:
                assert "detail" in response.json(), (path, what)
    assert not undocumented, "\n".join(undocumented)
    assert checked > 50


def test_a_json_body_that_is_not_utf8_is_documented_on_post_train(client: TestClient) -> None:
    """Found by a fuzzer run against /openapi.json: FastAPI answers it 400, not 422."""
    response = client.post("/train", content=b"\x80", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    responses = client.get("/openapi.json").json()["paths"]["/train"]["post"]["responses"]
    assert "400" in responses and "413" in responses


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
