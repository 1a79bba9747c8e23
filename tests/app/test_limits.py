"""The request body limit (app.limits) on a bare ASGI app: a declared length over the limit
is refused before any byte is read, a streamed body as soon as its count passes the limit,
and a body at the limit passes whole. (Through the API: tests/app/test_uploads.py.)"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from app.limits import BodyLimitMiddleware, BodyTooLarge

LIMIT = 10


class Body:
    """`receive` of a body sent in `chunks`; counts the messages the app asked for."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.reads = 0

    async def __call__(self) -> dict[str, Any]:
        self.reads += 1
        more = self.reads < len(self.chunks)
        return {"type": "http.request", "body": self.chunks[self.reads - 1], "more_body": more}


def read_all(chunks: list[bytes], content_length: int | None) -> tuple[bytes, Body]:
    """What an app that reads the whole body gets through the middleware."""
    received = bytearray()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            received.extend(message["body"])
            if not message["more_body"]:
                return

    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    body = Body(chunks)
    scope = {"type": "http", "headers": headers}
    anyio.run(BodyLimitMiddleware(app, max_bytes=LIMIT), scope, body, None)
    return bytes(received), body


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_at_the_limit_passes_whole(declared: bool) -> None:
    chunks = [b"12345", b"67890"]
    received, _ = read_all(chunks, LIMIT if declared else None)
    assert received == b"1234567890"


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    with pytest.raises(BodyTooLarge) as info:
        read_all([b"x" * 11], LIMIT + 1)
    assert info.value.status_code == 413
    assert info.value.detail == f"request body larger than the limit of {LIMIT} bytes"


def test_a_streamed_body_is_refused_at_the_chunk_that_passes_the_limit() -> None:
    body = Body([b"1234", b"5678", b"9abc", b"def0"])

    async def app(scope: dict, receive: Any, send: Any) -> None:
        while True:
            await receive()

    with pytest.raises(BodyTooLarge):
        anyio.run(BodyLimitMiddleware(app, LIMIT), {"type": "http", "headers": []}, body, None)
    assert body.reads == 3  # 4, 8, then 12 bytes > 10


def test_a_malformed_content_length_is_ignored_and_the_body_counted() -> None:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        await receive()

    scope = {"type": "http", "headers": [(b"content-length", b"many")]}
    with pytest.raises(BodyTooLarge):
        anyio.run(BodyLimitMiddleware(app, LIMIT), scope, Body([b"x" * 11]), None)


def test_other_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    anyio.run(BodyLimitMiddleware(app, LIMIT), {"type": "lifespan"}, None, None)
    assert seen == ["lifespan"]
