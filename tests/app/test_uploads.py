"""Bad uploads: every one is a 4xx with a JSON detail, and big bodies are refused early."""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from PIL import Image

ROUTES = ["/loglik", "/reconstruct"]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb() -> bytes:
    """A 100-byte PNG whose header claims 100,000 x 100,000 pixels."""
    data = bytearray(png_bytes(Image.new("1", (1, 1))))
    chunk = b"IHDR" + struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[8:33] = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return bytes(data)


def post(client: TestClient, route: str, data: bytes, mime: str = "image/png"):
    return client.post(route, files={"file": ("upload", data, mime)})


@pytest.mark.parametrize("route", ROUTES)
def test_non_image_is_415(client: TestClient, tiny_model: str, route: str) -> None:
    response = post(client, route, b"just some text, not a picture", "text/plain")
    assert response.status_code == 415
    assert "not an image" in response.json()["detail"]


@pytest.mark.parametrize("route", ROUTES)
def test_empty_file_is_400(client: TestClient, tiny_model: str, route: str) -> None:
    response = post(client, route, b"")
    assert response.status_code == 400
    assert "empty" in response.json()["detail"]


@pytest.mark.parametrize("route", ROUTES)
def test_blank_image_is_400_no_digit(client: TestClient, tiny_model: str, route: str) -> None:
    response = post(client, route, png_bytes(Image.new("L", (50, 50), 255)))
    assert response.status_code == 400
    assert "no digit found" in response.json()["detail"]


@pytest.mark.parametrize("route", ROUTES)
def test_decompression_bomb_is_413_fast(client: TestClient, tiny_model: str, route: str) -> None:
    start = time.perf_counter()
    response = post(client, route, bomb())
    assert time.perf_counter() - start < 1.0
    assert response.status_code == 413
    assert "pixels" in response.json()["detail"]


def test_pixel_limit_is_a_setting(make_client: Callable[..., TestClient], tiny_model: str) -> None:
    client = make_client(max_image_pixels=100 * 100)
    image = png_bytes(Image.new("L", (101, 100), 0))
    assert post(client, "/loglik", image).status_code == 413


@pytest.mark.parametrize("route", ROUTES)
def test_missing_file_field_is_422(client: TestClient, tiny_model: str, route: str) -> None:
    assert client.post(route).status_code == 422
    response = client.post(route, files={"image": ("x.png", b"123", "image/png")})
    assert response.status_code == 422


@pytest.fixture
def small_limit(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(max_upload_bytes=10_000)


def test_big_upload_with_content_length_is_413(small_limit: TestClient, tiny_model: str) -> None:
    response = post(small_limit, "/loglik", b"\0" * 20_000)
    assert response.status_code == 413
    assert "10000 bytes" in response.json()["detail"]


def test_big_upload_without_content_length_is_413(small_limit: TestClient, tiny_model: str) -> None:
    def chunks():
        yield b"--boundary\r\nContent-Disposition: form-data; name=file; filename=x\r\n\r\n"
        for _ in range(50):
            yield b"\0" * 1000
        yield b"\r\n--boundary--\r\n"

    response = small_limit.post(
        "/loglik",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=boundary"},
    )
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert response.status_code == 413


def test_upload_under_the_limit_passes(small_limit: TestClient, tiny_model: str) -> None:
    image = Image.new("L", (40, 40), 0)
    image.paste(255, (10, 10, 30, 30))
    assert post(small_limit, "/loglik", png_bytes(image)).status_code == 200


def run_asgi(app, chunks: list[bytes], content_length: int | None) -> tuple[int, int]:
    """Send `chunks` to the app as a streamed body; (status, chunks the app read)."""
    read = 0
    status = 0
    headers = [(b"content-type", b"multipart/form-data; boundary=b")]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))

    async def receive():
        nonlocal read
        if read < len(chunks):
            read += 1
            return {"type": "http.request", "body": chunks[read - 1], "more_body": True}
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/loglik",
        "raw_path": b"/loglik",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    asyncio.run(app(scope, receive, send))
    return status, read


@pytest.mark.parametrize("declared", [True, False])
def test_big_body_is_refused_before_it_is_all_read(
    small_limit: TestClient, tiny_model: str, declared: bool
) -> None:
    """100 chunks of 1 kB against a 10 kB limit: the app stops reading after about ten."""
    chunks = [b"--b\r\nContent-Disposition: form-data; name=file; filename=x\r\n\r\n"]
    chunks += [b"\0" * 1000] * 100
    length = sum(map(len, chunks)) if declared else None
    status, read = run_asgi(small_limit.app, chunks, length)
    assert status == 413
    assert read <= (0 if declared else 12)
