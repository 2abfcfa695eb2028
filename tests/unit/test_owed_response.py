"""A paid body that is not kept for replays (gateway/paywall/settle.py OwedResponse) is recorded as
delivered only once the server took the response's end: a cut anywhere before it (the last chunk
yielded but the final frame never sent: the replica died, the client left) leaves it owed; so does
a client already gone when the answer is ready (uvicorn drops those sends silently). The same for
a batch-settlement voucher's kept answer (gateway/batch_calls.py OwedAnswer)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from starlette.requests import ClientDisconnect

from gateway.paywall.settle import OwedResponse
from gateway.records import PaymentRecord, RecordState

SCOPE = {"type": "http", "asgi": {"spec_version": "2.4"}}


class Books:
    """What the response tells the settlement and the claim (the store writes are theirs)."""

    def __init__(self) -> None:
        self.released: list[bool] = []  # record.delivered at each release
        self.closed = 0

    async def release(self, record: PaymentRecord, claim: Any) -> None:
        self.released.append(record.delivered)

    async def close(self) -> None:
        self.closed += 1


async def chunks(*parts: bytes, fail: bool = False) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    if fail:
        raise aiohttp.ClientPayloadError("upstream cut")


def owed(body: AsyncIterator[bytes], books: Books) -> tuple[OwedResponse, PaymentRecord]:
    record = PaymentRecord(key="k", state=RecordState.SETTLED, request_fp="fp", tx="0xabc")
    return OwedResponse(body, books, record, books, status_code=200, headers={}), record  # type: ignore[arg-type]


async def receive() -> dict:
    """A client still there: nothing to receive (the request body was read)."""
    await asyncio.Event().wait()
    return {}


async def gone() -> dict:
    return {"type": "http.disconnect"}


async def test_delivered_once_the_final_frame_went_out() -> None:
    books, sent = Books(), []
    response, record = owed(chunks(b"a", b"b"), books)

    async def send(message: dict) -> None:
        sent.append(message)

    await response(SCOPE, receive, send)
    assert [m.get("body") for m in sent[1:]] == [b"a", b"b", b""]
    assert record.delivered and books.released == [True] and books.closed == 1


async def test_a_cut_before_the_final_frame_stays_owed() -> None:
    books = Books()
    response, record = owed(chunks(b"a", b"b"), books)

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            raise OSError("connection reset")  # every chunk went out, the response's end did not

    with pytest.raises(ClientDisconnect):
        await response(SCOPE, receive, send)
    assert not record.delivered and books.released == [False] and books.closed == 1


async def test_an_upstream_cut_stays_owed() -> None:
    books = Books()
    response, record = owed(chunks(b"a", fail=True), books)

    async def send(message: dict) -> None:
        pass

    await response(SCOPE, receive, send)
    assert not record.delivered and books.released == [False]


async def test_a_client_gone_before_the_answer_is_not_served_it() -> None:
    books, sent = Books(), []
    response, record = owed(chunks(b"a"), books)

    async def send(message: dict) -> None:  # as uvicorn's, for a closed connection: nothing, no error
        sent.append(message)

    await response(SCOPE, gone, send)
    assert not record.delivered and books.released == [False]


async def test_a_vouchers_kept_answer_is_marked_delivered_only_if_its_client_was_there() -> None:
    from gateway.batch_calls import OwedAnswer

    marks: list[str] = []

    async def delivered() -> None:
        marks.append("delivered")

    async def send(message: dict) -> None:
        pass

    await OwedAnswer(b"answer", status_code=200, headers={}, delivered=delivered)(SCOPE, receive, send)
    assert marks == ["delivered"]
    await OwedAnswer(b"answer", status_code=200, headers={}, delivered=delivered)(SCOPE, gone, send)
    assert marks == ["delivered"]  # the client had left: still owed

    async def broken(message: dict) -> None:
        raise OSError("connection reset")

    with pytest.raises(OSError):
        await OwedAnswer(b"answer", status_code=200, headers={}, delivered=delivered)(SCOPE, receive, broken)
    assert marks == ["delivered"]


async def test_a_held_stream_whose_client_left_before_it_began_frees_its_hold() -> None:
    """A metered voucher stream charges in its body's `finally`; Starlette never starts the body of
    a client already gone (ASGI 2.3, uvicorn's), so HeldStream frees the hold itself. A stream that
    began runs its own `finally` instead, also when cut."""
    from gateway.batch_calls import HeldStream

    ended: list[str] = []

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"
        finally:
            ended.append("charged")

    async def unstarted() -> None:
        ended.append("released")

    async def slow_send(message: dict) -> None:
        await asyncio.sleep(0)  # the disconnect listener runs before the body begins

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
    await HeldStream(body(), unstarted, status_code=200)(scope, gone, slow_send)
    assert ended == ["released"]

    ended.clear()
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await HeldStream(body(), unstarted, status_code=200)(scope, receive, send)
    assert ended == ["charged"] and sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}

    ended.clear()

    async def cut(message: dict) -> None:
        if message.get("body") == b"data: 2\n\n":
            raise OSError("connection reset")

    with pytest.raises(OSError):
        await HeldStream(body(), unstarted, status_code=200)(scope, receive, cut)
    assert ended == ["charged"]
