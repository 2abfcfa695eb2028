"""`client_gone`: the paid answers' check that the client is still there, without waiting."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import uvicorn

from gateway.paywall.responses import client_gone


async def test_an_open_connection_is_not_gone_and_nothing_is_left_waiting() -> None:
    event = asyncio.Event()

    async def receive() -> dict:
        await event.wait()  # as uvicorn: the request was read, the next message is a disconnect
        return {"type": "http.disconnect"}

    assert await client_gone(receive) is False
    assert not event._waiters  # type: ignore[attr-defined]  # the closed receive took its waiter back


async def test_a_disconnect_already_there_is_gone() -> None:
    async def receive() -> dict:
        return {"type": "http.disconnect"}

    assert await client_gone(receive) is True


async def test_another_message_is_not_a_disconnect() -> None:
    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    assert await client_gone(receive) is False


async def test_a_receive_that_yields_before_reading_consumes_nothing() -> None:
    """anyio's stream yields at a checkpoint first: taken as there (Starlette's check says the
    same), and the message stays for the response's own receive."""
    send, stream = anyio.create_memory_object_stream[dict](1)
    await send.send({"type": "http.disconnect"})
    assert await client_gone(stream.receive) is False
    assert stream.receive_nowait() == {"type": "http.disconnect"}


async def test_an_awaitable_that_is_not_a_coroutine_counts_as_there() -> None:
    loop = asyncio.get_running_loop()

    def receive() -> asyncio.Future[dict]:
        future: asyncio.Future[dict] = loop.create_future()
        future.set_result({"type": "http.disconnect"})
        return future

    assert await client_gone(receive) is False


async def _served(app: Any) -> tuple[uvicorn.Server, int, asyncio.Task[None]]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, http="httptools", lifespan="off",
                                           log_level="critical"))
    task = asyncio.ensure_future(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn.Server has a `started` flag, no event
        await asyncio.sleep(0.01)
    return server, server.servers[0].sockets[0].getsockname()[1], task


async def test_under_uvicorn_a_client_that_left_is_gone_and_one_that_waits_is_not() -> None:
    seen: list[bool] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await asyncio.sleep(0.3)  # the upstream's time: a client may leave meanwhile
        seen.append(await client_gone(receive))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    server, port, task = await _served(app)
    try:
        request = b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\nhi"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # gone before the answer is ready
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        assert (await reader.read(12)).startswith(b"HTTP/1.1 200")
        writer.close()
        assert seen == [True, False]
    finally:
        server.should_exit = True
        await task
