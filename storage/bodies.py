"""The one bounded reader of request bodies for the services of all three packages (the
gateway, the facilitator, the budgets admin API and console): storage is the layer they share.
A body too large, one the client abandoned, and one trickled in past the timeout are each told
apart, so every service answers them with its own structured error instead of a logged crash or
a task held open by a slow client."""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request

BODY_TIMEOUT_S = 30.0  # for a request body to arrive whole


class BodyTooLargeError(Exception):
    pass


class BodyIncompleteError(Exception):
    """The body did not arrive whole: `status` 400 (the client left) or 408 (too slow)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(request: Request, limit: int, *, timeout_s: float | None = None) -> bytes:
    """Raises BodyTooLargeError above `limit` bytes (declared or sent), BodyIncompleteError."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(f"body too large: {declared} bytes (limit {limit})")
    chunks: list[bytes] = []
    size = 0
    wait = BODY_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        async with asyncio.timeout(wait):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLargeError(f"body too large (limit {limit} bytes)")
                chunks.append(chunk)
    except ClientDisconnect:
        raise BodyIncompleteError(400, "the client left before its request body arrived") from None
    except TimeoutError:
        raise BodyIncompleteError(408, f"the request body did not arrive within {wait:g} s") from None
    return b"".join(chunks)
