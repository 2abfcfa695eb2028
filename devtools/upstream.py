"""A local stand-in for the AI providers the gateway fronts: OpenAI, Anthropic and a KServe v2 worker.

It speaks each provider's HTTP protocol closely enough for the gateway's demo, tests and load tests,
and answers deterministically: the reply is ``"Echo:"`` followed by the words of the last user
message (at most ``ECHO_WORDS``), and a token is a whitespace-separated word. It is built to be
fast (it is the upstream of the throughput benchmarks): no sleeps unless asked, orjson, one pass.

Test hooks:

* ``X-Devupstream-Fault`` request header, comma-separated: ``<status>`` (400-599: answer that
  error in the provider's format), ``slow:<ms>`` (wait, then answer), ``drip:<ms>`` (wait between
  stream chunks), ``cut:<n>`` (send n stream chunks, or n body bytes, then drop the connection),
  ``hang`` (never answer; returns once the client goes away), ``nousage`` (omit usage).
  The model name ``fail-500`` acts like fault ``500``.
* ``require_auth``: provider routes then need ``Authorization: Bearer <key>`` (OpenAI, KServe)
  or ``x-api-key: <key>`` (Anthropic), else 401 in the provider's format.
* Every response carries ``X-Devupstream-Name``, plus ``X-Devupstream-Saw-Payment: 1`` when the
  request carried ``PAYMENT-SIGNATURE`` or ``X-PAYMENT`` (the gateway must strip them).
* ``GET /_stats`` counts requests (``/_stats*`` excluded); ``POST /_stats/reset`` zeroes them.

A GPU worker (the options of ``WorkerSim``, for worker pools): ``--models`` (what it serves:
``/v1/models``, the KServe repository index, 404 for others), ``--latency-ms`` (per call, inside a
slot), ``--concurrency`` (slots; the rest wait, counted in ``/metrics`` as vLLM's
``vllm:num_requests_waiting``), ``--ready-after-s`` (503 and not ready until then) and
``--fault`` (an ``X-Devupstream-Fault`` value applied to every call).

Run with ``python -m devtools.upstream --port 8000``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import math
import os
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from devtools.tee_enclave import PROCESS_FAULTS, EnclaveIdentity, heartbeats, signed

__all__ = [
    "ECHO_WORDS",
    "EMBEDDING_DIM",
    "FAIL_MODEL",
    "FAULT_HEADER",
    "Fault",
    "UpstreamStats",
    "WorkerSim",
    "add_arguments",
    "create_upstream_app",
    "main",
    "parse_fault",
    "serve",
]

FAULT_HEADER = "x-devupstream-fault"
FAIL_MODEL = "fail-500"
ECHO_WORDS = 48
EMBEDDING_DIM = 8
MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "claude-sonnet-4-5", "kserve-double")
_PAYMENT_HEADERS = frozenset({b"payment-signature", b"x-payment"})
_MODELS_BODY = orjson.dumps(
    {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 1700000000, "owned_by": "devupstream"} for m in MODELS],
    }
)


class Provider(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    KSERVE = "kserve"


class BadRequestError(Exception):
    """The request body is not what the provider accepts; answered as 400 in its format."""


# --- faults -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    status: int | None = None  # answer this error status instead of the normal response
    delay_s: float = 0.0  # slow:<ms>
    drip_s: float = 0.0  # drip:<ms>
    cut_after: int | None = None  # cut:<n>
    hang: bool = False
    no_usage: bool = False


NO_FAULT = Fault()


def parse_fault(value: str | None) -> Fault:
    """Parse an ``X-Devupstream-Fault`` value; raises ``ValueError`` on anything unknown."""
    if not value:
        return NO_FAULT
    opts: dict[str, Any] = {}
    for item in value.split(","):
        kind, _, arg = item.strip().lower().partition(":")
        if kind.isdigit() and not arg and 400 <= int(kind) <= 599:
            opts["status"] = int(kind)
        elif kind == "hang" and not arg:
            opts["hang"] = True
        elif kind == "nousage" and not arg:
            opts["no_usage"] = True
        elif kind in ("slow", "drip", "cut") and arg.isdigit():
            key = {"slow": "delay_s", "drip": "drip_s", "cut": "cut_after"}[kind]
            opts[key] = int(arg) if kind == "cut" else int(arg) / 1000
        else:
            raise ValueError(f"unknown {FAULT_HEADER} value {item.strip()!r}")
    return Fault(**opts)


# --- stats and diagnostics --------------------------------------------------------------------


@dataclass
class UpstreamStats:
    requests: int = 0
    saw_payment: int = 0
    by_path: dict[str, int] = field(default_factory=dict)

    def record(self, path: str, saw_payment: bool) -> None:
        self.requests += 1
        self.saw_payment += saw_payment
        self.by_path[path] = self.by_path.get(path, 0) + 1

    def reset(self) -> None:
        self.requests = self.saw_payment = 0
        self.by_path.clear()

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "saw_payment": self.saw_payment, "by_path": dict(self.by_path)}


class DiagnosticsMiddleware:
    """Counts requests and tags every response with the upstream's name and payment-header sighting."""

    def __init__(self, app: ASGIApp, *, name: str, stats: UpstreamStats) -> None:
        self.app = app
        self.stats = stats
        self.name_header = (b"x-devupstream-name", name.encode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        saw_payment = any(key in _PAYMENT_HEADERS for key, _ in scope["headers"])
        if not scope["path"].startswith("/_stats"):
            self.stats.record(scope["path"], saw_payment)
        extra = [self.name_header, (b"x-devupstream-saw-payment", b"1")] if saw_payment else [self.name_header]

        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_tagged)


# --- responses --------------------------------------------------------------------------------


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj), status_code=status, headers=headers, media_type="application/json")


_OPENAI_ERRORS = {401: ("invalid_request_error", "invalid_api_key"), 429: ("requests", "rate_limit_exceeded")}
_ANTHROPIC_ERRORS = {401: "authentication_error", 429: "rate_limit_error", 503: "overloaded_error"}


def error_response(provider: Provider, status: int, message: str) -> Response:
    """An error in the wire format of the provider's own API."""
    headers = {"retry-after": "1"} if status == 429 else None
    if provider is Provider.OPENAI:
        default = ("invalid_request_error" if status < 500 else "server_error", None)
        kind, code = _OPENAI_ERRORS.get(status, default)
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    elif provider is Provider.ANTHROPIC:
        kind = _ANTHROPIC_ERRORS.get(status, "invalid_request_error" if status < 500 else "api_error")
        body = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": message}
    return _json(body, status, headers)


class EventStreamResponse(StreamingResponse):
    """Server-sent events, one ASGI message (so one flush) per event.

    With ``cut_after`` set it stops after that many events without finishing the response, so the
    server drops the connection mid-stream, as a crashing upstream would."""

    def __init__(self, events: Iterable[bytes], fault: Fault) -> None:
        super().__init__(_paced(events, fault.drip_s), media_type="text/event-stream")
        self.headers["cache-control"] = "no-cache"
        self.cut_after = fault.cut_after

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        sent = 0
        async for chunk in self.body_iterator:
            if self.cut_after is not None and sent >= self.cut_after:
                return  # unfinished response: uvicorn closes the transport
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += 1
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class TruncatedResponse(Response):
    """Announces the whole body's Content-Length, sends its first ``keep`` bytes, then drops the connection."""

    def __init__(self, full: Response, keep: int) -> None:
        super().__init__(full.body, full.status_code)
        self.raw_headers = full.raw_headers
        self.keep = keep

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": bytes(self.body[: self.keep]), "more_body": True})


async def _paced(events: Iterable[bytes], drip_s: float) -> AsyncIterator[bytes]:
    for event in events:
        yield event
        if drip_s:
            await asyncio.sleep(drip_s)


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


# --- request parsing and the deterministic model -----------------------------------------------


def _optional(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise BadRequestError(f"'{key}' has the wrong type")
    return value


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError("'model' is required and must be a string")
    return model


def _max_tokens(body: dict[str, Any], *keys: str, required: bool = False) -> int | None:
    for key in keys:
        value = _optional(body, key, int)
        if value is not None:
            if value < 1:
                raise BadRequestError(f"'{key}' must be at least 1")
            return int(value)
    if required:
        raise BadRequestError(f"'{keys[0]}' is required")
    return None


def _text_of(content: object) -> str:
    """The text of a message content: a string, or a list of parts whose ``text`` fields count."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        raise BadRequestError("message content must be a string or an array of content parts")
    return " ".join(part["text"] for part in content if isinstance(part.get("text"), str))


def _messages(body: dict[str, Any], roles: frozenset[str] | None = None) -> list[tuple[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("'messages' must be a non-empty array")
    parsed = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or (roles is not None and role not in roles):
            raise BadRequestError("each message needs a valid 'role'")
        parsed.append((role, _text_of(message.get("content"))))
    return parsed


@dataclass(frozen=True, slots=True)
class Completion:
    words: list[str]
    truncated: bool
    prompt_tokens: int

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def completion_tokens(self) -> int:
        return len(self.words)

    def pieces(self) -> Iterator[str]:
        """The text word by word; the pieces concatenate back to ``text``."""
        for i, word in enumerate(self.words):
            yield word if i == 0 else " " + word


def complete(prompt_texts: Sequence[str], echo: str, max_tokens: int | None) -> Completion:
    words = ["Echo:", *echo.split()[:ECHO_WORDS]]
    truncated = max_tokens is not None and len(words) > max_tokens
    prompt_tokens = max(1, sum(len(text.split()) for text in prompt_texts))
    return Completion(words[:max_tokens] if truncated else words, truncated, prompt_tokens)


def _last_user(messages: list[tuple[str, str]]) -> str:
    return next((text for role, text in reversed(messages) if role == "user"), "")


def _openai_usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _new_id() -> str:
    return os.urandom(12).hex()


# --- OpenAI -----------------------------------------------------------------------------------


def chat_completions(request: Request, body: dict[str, Any], fault: Fault) -> Response:
    model, messages = _model(body), _messages(body)
    limit = _max_tokens(body, "max_completion_tokens", "max_tokens")
    done = complete([text for _, text in messages], _last_user(messages), limit)
    finish = "length" if done.truncated else "stop"
    base = {"id": f"chatcmpl-{_new_id()}", "object": "chat.completion", "created": int(time.time()), "model": model}
    usage = _openai_usage(done.prompt_tokens, done.completion_tokens)
    if not _optional(body, "stream", bool, False):
        message = {"role": "assistant", "content": done.text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return _json({**base, "choices": [choice]} | ({} if fault.no_usage else {"usage": usage}))
    include_usage = bool(_optional(body, "stream_options", dict, {}).get("include_usage")) and not fault.no_usage
    chunk_base = {**base, "object": "chat.completion.chunk"}
    return EventStreamResponse(_chat_chunks(chunk_base, done, finish, usage if include_usage else None), fault)


def _chat_chunks(base: dict[str, Any], done: Completion, finish: str, usage: dict[str, int] | None) -> Iterator[bytes]:
    tail = {"usage": None} if usage else {}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**base, "choices": [choice], **tail})

    yield chunk({"role": "assistant", "content": ""})
    for piece in done.pieces():
        yield chunk({"content": piece})
    yield chunk({}, finish)
    if usage:
        yield _sse({**base, "choices": [], "usage": usage})
    yield b"data: [DONE]\n\n"


def completions(request: Request, body: dict[str, Any], fault: Fault) -> Response:
    model, prompt = _model(body), body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequestError("'prompt' must be a string or a non-empty array of strings")
    limit = _max_tokens(body, "max_tokens")
    dones = [complete([p], p, limit) for p in prompts]
    base = {"id": f"cmpl-{_new_id()}", "object": "text_completion", "created": int(time.time()), "model": model}
    usage = _openai_usage(sum(d.prompt_tokens for d in dones), sum(d.completion_tokens for d in dones))

    def choice(i: int, text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": i, "logprobs": None, "finish_reason": finish}

    def finish(done: Completion) -> str:
        return "length" if done.truncated else "stop"

    if not _optional(body, "stream", bool, False):
        choices = [choice(i, d.text, finish(d)) for i, d in enumerate(dones)]
        return _json({**base, "choices": choices} | ({} if fault.no_usage else {"usage": usage}))
    include_usage = bool(_optional(body, "stream_options", dict, {}).get("include_usage")) and not fault.no_usage

    def events() -> Iterator[bytes]:
        for i, done in enumerate(dones):
            yield from (_sse({**base, "choices": [choice(i, piece, None)]}) for piece in done.pieces())
            yield _sse({**base, "choices": [choice(i, "", finish(done))]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    return EventStreamResponse(events(), fault)


def embed(text: str) -> list[float]:
    """A fixed, deterministic ``EMBEDDING_DIM``-float vector in [-1, 1] derived from a hash of ``text``."""
    digest = hashlib.blake2b(text.encode(), digest_size=2 * EMBEDDING_DIM).digest()
    return [round(v / 32767.5 - 1.0, 6) for v in struct.unpack(f"<{EMBEDDING_DIM}H", digest)]


def embeddings(request: Request, body: dict[str, Any], fault: Fault) -> Response:
    model, raw = _model(body), body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
        raise BadRequestError("'input' must be a string or a non-empty array of strings")
    as_base64 = _optional(body, "encoding_format", str, "float") == "base64"  # the openai SDK's default
    data = []
    for i, text in enumerate(inputs):
        vector: Any = embed(text)
        if as_base64:
            vector = base64.b64encode(struct.pack(f"<{EMBEDDING_DIM}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = max(1, sum(len(text.split()) for text in inputs))
    usage = {} if fault.no_usage else {"usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return _json({"object": "list", "data": data, "model": model, **usage})


def list_models(request: Request, body: dict[str, Any], fault: Fault) -> Response:
    sim: WorkerSim | None = request.app.state.worker
    if sim is None or sim.models is None:
        return Response(_MODELS_BODY, media_type="application/json")
    data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "devupstream"} for m in sim.models]
    return _json({"object": "list", "data": data})


# --- Anthropic --------------------------------------------------------------------------------


def messages(request: Request, body: dict[str, Any], fault: Fault) -> Response:
    model, msgs = _model(body), _messages(body, frozenset({"user", "assistant"}))
    limit = _max_tokens(body, "max_tokens", required=True)
    system = _text_of(body.get("system"))
    done = complete([system, *(text for _, text in msgs)], _last_user(msgs), limit)
    stop = "max_tokens" if done.truncated else "end_turn"
    message_id = f"msg_{_new_id()}"
    if not _optional(body, "stream", bool, False):
        tokens = {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens}
        usage = {} if fault.no_usage else {"usage": tokens}
        content = [{"type": "text", "text": done.text}]
        head = {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content}
        return _json({**head, "stop_reason": stop, "stop_sequence": None, **usage})

    def events() -> Iterator[bytes]:
        start: dict[str, Any] = {"id": message_id, "type": "message", "role": "assistant", "model": model}
        start |= {"content": [], "stop_reason": None, "stop_sequence": None}
        if not fault.no_usage:
            start["usage"] = {"input_tokens": done.prompt_tokens, "output_tokens": 1}
        yield _event("message_start", {"type": "message_start", "message": start})
        block = {"type": "text", "text": ""}
        yield _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
        for piece in done.pieces():
            delta = {"type": "text_delta", "text": piece}
            yield _event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
        yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
        end: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}}
        if not fault.no_usage:
            end["usage"] = {"output_tokens": done.completion_tokens}
        yield _event("message_delta", end)
        yield _event("message_stop", {"type": "message_stop"})

    return EventStreamResponse(events(), fault)


# --- KServe v2 --------------------------------------------------------------------------------


def _flatten(data: object) -> list[float]:
    flat: list[float] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, int | float) and not isinstance(item, bool):
            flat.append(float(item))
        else:
            raise BadRequestError("tensor data must be numbers")
    return flat


def kserve_infer(request: Request, body: dict[str, Any], fault: Fault) -> Response:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) for t in inputs):
        raise BadRequestError("'inputs' must be a non-empty array of tensors")
    outputs = []
    for i, tensor in enumerate(inputs):
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise BadRequestError(f"input {i}: 'shape' must be an array of non-negative integers")
        data = _flatten(tensor.get("data"))
        if len(data) != math.prod(shape):
            raise BadRequestError(f"input {i}: shape {shape} does not match {len(data)} elements")
        outputs.append({"name": f"output{i}", "shape": shape, "datatype": "FP32", "data": [2.0 * x for x in data]})
    request_id = body.get("id") if isinstance(body.get("id"), str) else str(uuid.uuid4())
    name = request.path_params["name"]
    return _json({"model_name": name, "model_version": "1", "id": request_id, "outputs": outputs})


def kserve_model_ready(request: Request, body: dict[str, Any], fault: Fault) -> Response:
    return _json({"name": request.path_params["name"], "ready": True})


# --- a simulated GPU worker ---------------------------------------------------------------------


@dataclass
class WorkerSim:
    """What makes the stand-in behave like one inference server of a pool."""

    models: tuple[str, ...] | None = None  # None: every model (the plain stand-in)
    latency_s: float = 0.0
    concurrency: int | None = None
    ready_after_s: float = 0.0
    fault: Fault = NO_FAULT
    started: float = field(default_factory=time.monotonic)
    waiting: int = 0
    running: int = 0
    _slots: asyncio.Semaphore | None = None

    def ready(self) -> bool:
        return time.monotonic() - self.started >= self.ready_after_s

    def serves(self, model: str | None) -> bool:
        return self.models is None or model is None or model in self.models

    def slots(self) -> asyncio.Semaphore | None:
        if self.concurrency is not None and self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        return self._slots

    def metrics(self) -> bytes:
        return (b"# TYPE vllm:num_requests_waiting gauge\n"
                + f'vllm:num_requests_waiting{{model_name="any"}} {float(self.waiting)}\n'.encode()
                + b"# TYPE vllm:num_requests_running gauge\n"
                + f'vllm:num_requests_running{{model_name="any"}} {float(self.running)}\n'.encode())


async def _in_slot(sim: WorkerSim, work: Callable[[], Any]) -> Any:
    slots = sim.slots()
    if slots is None:
        sim.running += 1
        try:
            if sim.latency_s:
                await asyncio.sleep(sim.latency_s)
            return await work()
        finally:
            sim.running -= 1
    sim.waiting += 1
    try:
        await slots.acquire()
    finally:
        sim.waiting -= 1
    sim.running += 1
    try:
        if sim.latency_s:
            await asyncio.sleep(sim.latency_s)
        return await work()
    finally:
        sim.running -= 1
        slots.release()


# --- wiring -----------------------------------------------------------------------------------

Handler = Callable[[Request, dict[str, Any], Fault], Response]


def _authorized(request: Request, provider: Provider, key: str | None) -> bool:
    if key is None:
        return True
    if provider is Provider.ANTHROPIC:
        return hmac.compare_digest(request.headers.get("x-api-key", "").encode(), key.encode())
    return hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {key}".encode())


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def provider_endpoint(provider: Provider, handler: Handler) -> Callable[[Request], Any]:
    """Auth, faults and JSON parsing in front of a handler; any ``BadRequestError`` becomes a 400."""

    async def endpoint(request: Request) -> Response:
        if not _authorized(request, provider, request.app.state.require_auth):
            return error_response(provider, 401, "invalid or missing API key")
        sim: WorkerSim | None = request.app.state.worker
        if sim is None:
            return await answer(request)
        if not sim.ready():
            return error_response(provider, 503, "the model is still loading")
        if request.url.path != "/v1/models":
            model = request.path_params.get("name")
            if model is None and request.method == "POST":
                try:
                    model = (await _json_body(request)).get("model")
                except BadRequestError:
                    model = None
            if not sim.serves(model if isinstance(model, str) else None):
                return error_response(provider, 404, f"model {model!r} is not served here")
        return await _in_slot(sim, lambda: answer(request))

    async def answer(request: Request) -> Response:
        try:
            fault = parse_fault(request.headers.get(FAULT_HEADER))
        except ValueError as exc:
            return error_response(provider, 400, str(exc))
        sim: WorkerSim | None = request.app.state.worker
        if sim is not None and fault is NO_FAULT and request.url.path != "/v1/models":
            fault = sim.fault  # the worker stays discoverable; its calls misbehave
        if fault.hang:
            await _wait_for_disconnect(request)
            return Response(status_code=499)  # nobody is listening any more
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.status is not None:
            return error_response(provider, fault.status, f"injected fault {fault.status}")
        try:
            body = await _json_body(request) if request.method == "POST" else {}
            if body.get("model") == FAIL_MODEL or request.path_params.get("name") == FAIL_MODEL:
                return error_response(provider, 500, f"model {FAIL_MODEL} always fails")
            response = handler(request, body, fault)
            if request.app.state.tee is not None and request.url.path == "/v1/chat/completions":
                response = signed(request, body, response)
        except (BadRequestError, ValueError) as exc:
            return error_response(provider, 400, str(exc))
        if fault.cut_after is not None and not isinstance(response, StreamingResponse):
            return TruncatedResponse(response, fault.cut_after)
        return response

    return endpoint


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object")
    return body


async def healthz(request: Request) -> Response:
    return _json({"status": "ok", "name": request.app.state.name})


async def kserve_ready(request: Request) -> Response:
    sim: WorkerSim | None = request.app.state.worker
    if sim is not None and not sim.ready():
        return _json({"ready": False}, 503)
    return _json({"ready": True})


async def kserve_index(request: Request) -> Response:
    """KServe/Triton repository index: every model this worker serves, READY once loaded."""
    sim: WorkerSim | None = request.app.state.worker
    models = MODELS if sim is None or sim.models is None else sim.models
    state = "READY" if sim is None or sim.ready() else "LOADING"
    return _json([{"name": m, "version": "1", "state": state} for m in models])


async def worker_metrics(request: Request) -> Response:
    sim: WorkerSim | None = request.app.state.worker
    body = sim.metrics() if sim is not None else b""
    return Response(body, media_type="text/plain; version=0.0.4")


async def stats(request: Request) -> Response:
    return _json(request.app.state.stats.as_dict())


async def reset_stats(request: Request) -> Response:
    request.app.state.stats.reset()
    return _json(request.app.state.stats.as_dict())


def create_upstream_app(*, name: str = "devupstream", require_auth: str | None = None,
                        worker: WorkerSim | None = None, tee: EnclaveIdentity | None = None,
                        tee_fault: str | None = None) -> Starlette:
    """The fake provider app; its only state (name, auth key, request counts) lives in ``app.state``."""
    openai, anthropic, kserve = Provider.OPENAI, Provider.ANTHROPIC, Provider.KSERVE
    routes = [
        Route("/v1/chat/completions", provider_endpoint(openai, chat_completions), methods=["POST"]),
        Route("/v1/completions", provider_endpoint(openai, completions), methods=["POST"]),
        Route("/v1/embeddings", provider_endpoint(openai, embeddings), methods=["POST"]),
        Route("/v1/models", provider_endpoint(openai, list_models), methods=["GET"]),
        Route("/v1/messages", provider_endpoint(anthropic, messages), methods=["POST"]),
        Route("/v2/models/{name}/infer", provider_endpoint(kserve, kserve_infer), methods=["POST"]),
        Route("/v2/models/{name}/ready", provider_endpoint(kserve, kserve_model_ready), methods=["GET"]),
        Route("/v2/health/ready", kserve_ready, methods=["GET"]),
        Route("/v2/repository/index", kserve_index, methods=["POST"]),
        Route("/metrics", worker_metrics, methods=["GET"]),
        Route("/v2/health/live", healthz, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/_stats", stats, methods=["GET"]),
        Route("/_stats/reset", reset_stats, methods=["POST"]),
    ]
    upstream_stats = UpstreamStats()
    app = Starlette(routes=routes, middleware=[Middleware(DiagnosticsMiddleware, name=name, stats=upstream_stats)])
    app.state.name = name
    app.state.require_auth = require_auth
    app.state.stats = upstream_stats
    app.state.worker = worker
    app.state.tee = tee  # tee mode: chat completions signed as this enclave (devtools/tee_enclave.py)
    app.state.tee_fault = tee_fault
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m devtools.upstream` and `x402-gateway upstream`."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", default="devupstream", help="echoed in the X-Devupstream-Name header")
    parser.add_argument("--require-auth", metavar="KEY", help="require this provider API key")
    parser.add_argument("--log-level", default="info")
    worker = parser.add_argument_group("simulated GPU worker")
    worker.add_argument("--models", help="comma-separated models served (default: every model)")
    worker.add_argument("--latency-ms", type=float, default=0.0, help="per-call latency, inside a slot")
    worker.add_argument("--concurrency", type=int, help="calls served at once; the rest wait (vLLM's queue)")
    worker.add_argument("--ready-after-s", type=float, default=0.0, help="not ready (503) until this long after start")
    worker.add_argument("--fault", help="an X-Devupstream-Fault value applied to every call")
    tee = parser.add_argument_group("TEE enclave (HTTPS, signed chat completions: devtools/tee_enclave.py)")
    tee.add_argument("--tee-dir", help="the enclave's identity directory (created when missing): enables tee mode")
    tee.add_argument("--tee-fault", choices=sorted(PROCESS_FAULTS), help="misbehave on every call")
    tee.add_argument("--tee-heartbeat-s", type=float, default=0.0, help="send registry heartbeats this often")
    tee.add_argument("--tee-rpc", help="the registry's chain RPC (heartbeats)")
    tee.add_argument("--tee-registry", help="the registry's address (heartbeats)")
    tee.add_argument("--tee-operator-key", help="the enclave operator's private key (heartbeats)")
    tee.add_argument("--tee-chain-id", type=int, default=84532)


def worker_from_args(args: argparse.Namespace) -> WorkerSim | None:
    if not (args.models or args.latency_ms or args.concurrency or args.ready_after_s or args.fault):
        return None
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None
    return WorkerSim(models=models, latency_s=args.latency_ms / 1000, concurrency=args.concurrency,
                     ready_after_s=args.ready_after_s, fault=parse_fault(args.fault))


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    tee = EnclaveIdentity.load_or_create(args.tee_dir) if args.tee_dir else None
    app = create_upstream_app(name=args.name, require_auth=args.require_auth, worker=worker_from_args(args),
                              tee=tee, tee_fault=args.tee_fault)
    tls: dict[str, Any] = {}
    lifespan: Literal["on", "off"] = "off"
    if tee is not None:
        certfile, keyfile = tee.tls_files(wrong=args.tee_fault == "wrong-certificate")
        tls = {"ssl_certfile": certfile, "ssl_keyfile": keyfile}
        if args.tee_heartbeat_s > 0:
            if not (args.tee_rpc and args.tee_registry and args.tee_operator_key):
                raise SystemExit("--tee-heartbeat-s needs --tee-rpc, --tee-registry and --tee-operator-key")
            beat = heartbeats(tee, args.tee_rpc, args.tee_registry, args.tee_operator_key, args.tee_chain_id,
                              args.tee_heartbeat_s)
            app.router.lifespan_context = _background(beat)
            lifespan = "on"
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan=lifespan,
        access_log=False,
        log_level=args.log_level,
        **tls,
    )
    return 0


def _background(work: Any) -> Any:
    """A lifespan that runs `work` (a coroutine) while the server runs."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.ensure_future(work)
        try:
            yield
        finally:
            task.cancel()

    return lifespan


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.upstream", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
