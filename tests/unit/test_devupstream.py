"""devtools.upstream: the fake OpenAI / Anthropic / KServe upstream, over real HTTP (uvicorn on a free port)."""

from __future__ import annotations

import asyncio
import base64
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from devtools.upstream import EMBEDDING_DIM, FAULT_HEADER, Fault, create_upstream_app, embed, parse_fault

CHAT = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "first question"}]},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "what  is the   weather today"},
    ],
}
PROMPT_WORDS = 3 + 2 + 2 + 5  # every message's words
REPLY = "Echo: what is the weather today"
ANTHROPIC = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 100,
    "system": "Be brief.",
    "messages": [{"role": "user", "content": "tell me a joke"}],
}


async def _serve(app: Any) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn in this event loop on a free port.

    uvicorn binds port 0 itself: a socket made with plain ``socket.socket()`` has proto 0, so asyncio
    skips TCP_NODELAY on accepted connections and every response stalls ~40 ms (Nagle + delayed ACK)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, http="httptools", lifespan="off", log_level="critical")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn.Server has a `started` flag, no event
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async for url in _serve(create_upstream_app(name="up-test")):
        async with httpx.AsyncClient(base_url=url, timeout=5) as c:
            yield c


@pytest.fixture(scope="module")
async def auth_client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_upstream_app(require_auth="sk-secret")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://up") as c:
        yield c


async def _stream(client: httpx.AsyncClient, path: str, body: dict[str, Any], **headers: str) -> list[str]:
    """The lines of an SSE response (blank lines dropped)."""
    async with client.stream("POST", path, json=body, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line async for line in response.aiter_lines() if line]


def _data(lines: list[str]) -> list[Any]:
    return [line[6:] if line == "data: [DONE]" else orjson.loads(line[6:]) for line in lines if line.startswith("data: ")]


# --- OpenAI -----------------------------------------------------------------------------------


async def test_chat_completion(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.headers["x-devupstream-name"] == "up-test"
    assert "x-devupstream-saw-payment" not in response.headers
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "gpt-4o-mini"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": REPLY, "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": PROMPT_WORDS, "completion_tokens": 6, "total_tokens": PROMPT_WORDS + 6}


async def test_chat_max_tokens_truncates(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})).json()
    assert body["choices"][0]["message"]["content"] == "Echo: what"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


async def test_chat_stream_with_usage(client: httpx.AsyncClient) -> None:
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    events = _data(await _stream(client, "/v1/chat/completions", request))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == REPLY
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) == 6  # one per word
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": PROMPT_WORDS, "completion_tokens": 6, "total_tokens": PROMPT_WORDS + 6}


async def test_chat_stream_without_usage_by_default(client: httpx.AsyncClient) -> None:
    events = _data(await _stream(client, "/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 3}))
    assert events[-1] == "[DONE]"
    assert all("usage" not in c and c["choices"] for c in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


async def test_legacy_completion(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/completions", json={"model": "m", "prompt": "say hi", "max_tokens": 5})).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Echo: say hi" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    request = {"model": "m", "prompt": "say hi", "stream": True, "stream_options": {"include_usage": True}}
    events = _data(await _stream(client, "/v1/completions", request))
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == "Echo: say hi"
    assert events[-2]["usage"]["total_tokens"] == 5 and events[-1] == "[DONE]"


async def test_embeddings(client: httpx.AsyncClient) -> None:
    request = {"model": "text-embedding-3-small", "input": ["hello world", "bye"]}
    body = (await client.post("/v1/embeddings", json=request)).json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    first = body["data"][0]["embedding"]
    assert len(first) == EMBEDDING_DIM and all(-1 <= x <= 1 for x in first)
    assert first == embed("hello world") != body["data"][1]["embedding"]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    single = (await client.post("/v1/embeddings", json={"model": "e", "input": "hello world"})).json()
    assert single["data"][0]["embedding"] == first
    encoded = {"model": "e", "input": "hello world", "encoding_format": "base64"}
    raw = base64.b64decode((await client.post("/v1/embeddings", json=encoded)).json()["data"][0]["embedding"])
    assert struct.unpack(f"<{EMBEDDING_DIM}f", raw) == pytest.approx(first)


async def test_models(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list" and "gpt-4o-mini" in [m["id"] for m in body["data"]]


# --- Anthropic --------------------------------------------------------------------------------


async def test_anthropic_message(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/messages", json=ANTHROPIC)).json()
    assert body["type"] == "message" and body["role"] == "assistant" and body["id"].startswith("msg_")
    assert body["content"] == [{"type": "text", "text": "Echo: tell me a joke"}]
    assert body["stop_reason"] == "end_turn"
    assert body["usage"] == {"input_tokens": 6, "output_tokens": 5}
    truncated = (await client.post("/v1/messages", json={**ANTHROPIC, "max_tokens": 1})).json()
    assert truncated["stop_reason"] == "max_tokens" and truncated["content"][0]["text"] == "Echo:"


async def test_anthropic_stream(client: httpx.AsyncClient) -> None:
    lines = await _stream(client, "/v1/messages", {**ANTHROPIC, "stream": True})
    names = [line[7:] for line in lines if line.startswith("event: ")]
    assert names == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    events = _data(lines)
    assert [e["type"] for e in events] == names
    assert events[0]["message"]["usage"]["input_tokens"] == 6
    assert "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta") == "Echo: tell me a joke"
    assert events[-2]["delta"]["stop_reason"] == "end_turn" and events[-2]["usage"] == {"output_tokens": 5}


# --- KServe -----------------------------------------------------------------------------------


async def test_kserve(client: httpx.AsyncClient) -> None:
    request = {"id": "r1", "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4.5]]}]}
    body = (await client.post("/v2/models/resnet/infer", json=request)).json()
    assert body == {
        "model_name": "resnet",
        "model_version": "1",
        "id": "r1",
        "outputs": [{"name": "output0", "shape": [2, 2], "datatype": "FP32", "data": [2.0, 4.0, 6.0, 9.0]}],
    }
    assert (await client.get("/v2/models/resnet/ready")).status_code == 200
    assert (await client.get("/v2/health/ready")).status_code == 200
    assert (await client.get("/healthz")).status_code == 200
    mismatch = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}
    response = await client.post("/v2/models/resnet/infer", json=mismatch)
    assert response.status_code == 400 and "error" in response.json()


# --- bad input, faults, auth, diagnostics ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content", "error_key"),
    [
        ("/v1/chat/completions", b"not json", "error"),
        ("/v1/chat/completions", b"[1]", "error"),
        ("/v1/chat/completions", b'{"model": "m"}', "error"),
        ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "error"),
        ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": "3"}', "error"),
        ("/v1/embeddings", b'{"model": "m", "input": [1, 2]}', "error"),
        ("/v1/messages", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', "type"),
        ("/v2/models/m/infer", b'{"inputs": [{"shape": [1], "data": ["a"]}]}', "error"),
    ],
)
async def test_bad_input_is_400_in_provider_format(
    client: httpx.AsyncClient, path: str, content: bytes, error_key: str
) -> None:
    response = await client.post(path, content=content)
    assert response.status_code == 400
    assert error_key in response.json()


@pytest.mark.parametrize("status", [400, 429, 500, 503])
async def test_status_faults(client: httpx.AsyncClient, status: int) -> None:
    response = await client.post("/v1/chat/completions", json=CHAT, headers={FAULT_HEADER: str(status)})
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    anthropic = await client.post("/v1/messages", json=ANTHROPIC, headers={FAULT_HEADER: str(status)})
    assert anthropic.status_code == status and anthropic.json()["type"] == "error"


async def test_fail_model_and_unknown_fault(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={**CHAT, "model": "fail-500"})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    response = await client.post("/v1/chat/completions", json=CHAT, headers={FAULT_HEADER: "explode"})
    assert response.status_code == 400


def test_parse_fault() -> None:
    assert parse_fault(None) == Fault()
    assert parse_fault("slow:250, nousage") == Fault(delay_s=0.25, no_usage=True)
    assert parse_fault("cut:3") == Fault(cut_after=3)
    for bad in ("200", "cut", "slow:x", "hang:1", "600"):
        with pytest.raises(ValueError):
            parse_fault(bad)


async def test_slow_fault(client: httpx.AsyncClient) -> None:
    start = time.monotonic()
    response = await client.post("/v1/chat/completions", json=CHAT, headers={FAULT_HEADER: "slow:150"})
    assert response.status_code == 200 and time.monotonic() - start >= 0.15


async def test_hang_fault(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/v1/chat/completions", json=CHAT, headers={FAULT_HEADER: "hang"}, timeout=0.2)


async def test_nousage_fault(client: httpx.AsyncClient) -> None:
    headers = {FAULT_HEADER: "nousage"}
    assert "usage" not in (await client.post("/v1/chat/completions", json=CHAT, headers=headers)).json()
    assert "usage" not in (await client.post("/v1/messages", json=ANTHROPIC, headers=headers)).json()
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    events = _data(await _stream(client, "/v1/chat/completions", request, **headers))
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])


async def test_cut_fault_stream_ends_without_done(client: httpx.AsyncClient) -> None:
    lines: list[str] = []
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", "/v1/chat/completions", json=request, headers={FAULT_HEADER: "cut:3"}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                lines.extend([line] if line else [])
    assert len(lines) == 3 and "data: [DONE]" not in lines
    with pytest.raises(httpx.RemoteProtocolError):  # non-streaming: a truncated body
        await client.post("/v1/chat/completions", json=CHAT, headers={FAULT_HEADER: "cut:10"})


async def test_drip_streams_chunk_by_chunk(client: httpx.AsyncClient) -> None:
    arrivals = []
    request = {**ANTHROPIC, "stream": True}
    async with client.stream("POST", "/v1/messages", json=request, headers={FAULT_HEADER: "drip:20"}) as r:
        async for _ in r.aiter_raw():
            arrivals.append(time.monotonic())
    assert len(arrivals) >= 5 and arrivals[-1] - arrivals[0] >= 0.1


async def test_require_auth(auth_client: httpx.AsyncClient) -> None:
    response = await auth_client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    response = await auth_client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer wrong"})
    assert response.status_code == 401
    ok = await auth_client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-secret"})
    assert ok.status_code == 200
    response = await auth_client.post("/v1/messages", json=ANTHROPIC, headers={"authorization": "Bearer sk-secret"})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    ok = await auth_client.post("/v1/messages", json=ANTHROPIC, headers={"x-api-key": "sk-secret"})
    assert ok.status_code == 200
    assert (await auth_client.get("/healthz")).status_code == 200


async def test_stats_and_payment_echo(client: httpx.AsyncClient) -> None:
    await client.post("/_stats/reset")
    assert (await client.get("/_stats")).json() == {"requests": 0, "saw_payment": 0, "by_path": {}}
    paid = await client.post("/v1/chat/completions", json=CHAT, headers={"PAYMENT-SIGNATURE": "abc"})
    assert paid.headers["x-devupstream-saw-payment"] == "1"
    legacy = await client.post("/v1/messages", json=ANTHROPIC, headers={"X-PAYMENT": "abc"})
    assert legacy.headers["x-devupstream-saw-payment"] == "1"
    await client.post("/v1/chat/completions", json=CHAT, headers={FAULT_HEADER: "500"})
    stats = (await client.get("/_stats")).json()
    assert stats == {"requests": 3, "saw_payment": 2, "by_path": {"/v1/chat/completions": 2, "/v1/messages": 1}}


def test_runs_as_module(free_port: int) -> None:
    command = [sys.executable, "-m", "devtools.upstream", "--port", str(free_port), "--name", "cli"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{free_port}/healthz")
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        assert response.json() == {"status": "ok", "name": "cli"}
    finally:
        process.terminate()
        process.wait(timeout=5)
