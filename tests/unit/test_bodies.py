"""storage.bodies.read_body: the bounded body reader every service uses."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import Request

from storage.bodies import BodyIncompleteError, BodyTooLargeError, read_body


def request(messages: list[dict[str, Any]], *, declared: int | None = None) -> Request:
    headers = [(b"content-length", str(declared).encode())] if declared is not None else []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # the rest never comes
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


def chunks(*parts: bytes) -> list[dict[str, Any]]:
    return [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]


async def test_a_whole_body_in_chunks() -> None:
    assert await read_body(request(chunks(b"ab", b"cd", b"")), 10) == b"abcd"


async def test_too_large_declared_or_sent() -> None:
    with pytest.raises(BodyTooLargeError):
        await read_body(request([], declared=11), 10)
    with pytest.raises(BodyTooLargeError):
        await read_body(request(chunks(b"123456", b"78901")), 10)


async def test_a_client_that_left_and_one_too_slow() -> None:
    with pytest.raises(BodyIncompleteError) as left:
        await read_body(request([*chunks(b"ab", b"c")[:1], {"type": "http.disconnect"}]), 10)
    assert left.value.status == 400
    with pytest.raises(BodyIncompleteError) as slow:
        await read_body(request(chunks(b"ab", b"c")[:1]), 10, timeout_s=0.2)
    assert slow.value.status == 408
