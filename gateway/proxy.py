"""Forwarding to upstreams: TEE-hosted provider proxies and GPU workers.

URL pools go through our kept-alive HTTP/1.1 client (facilitator/http11.py: a fifth of aiohttp's
CPU per call, loadtests/bench_rpc_transport.py); worker pools and enclaves keep one aiohttp
session (their slot tracking and pinned TLS are built on it; httpx collapses under concurrency:
feasibility.md §6c). A pool fails over to its next healthy URL only when the connection could not
be made, i.e. before the upstream could have done any work; a failure after that is the call's
failure, never retried, and never charged. The provider's key lives here; the agent's payment and auth headers never
reach the upstream.
"""

from __future__ import annotations

import itertools
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from starlette.requests import Request

from facilitator.http11 import Http11Client, HttpError, NotConnectedError, Streamed
from gateway.errors import GatewayError
from gateway.errors import GatewayReason as G
from gateway.settings import Upstream
from gateway.tee.pool import Enclave, EnclaveCallFailedError, NoEnclaveError, TeePool
from gateway.workers.pool import NoWorkerError, PoolRefusal, WorkerCallFailedError, WorkerPool

# Hop-by-hop headers (RFC 9110 §7.6.1) and what the gateway owns.
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
        "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding"}
# "expect": the whole body is sent with the request (uvicorn already answered the client's 100-continue).
STRIP_REQUEST = _HOP | {"payment-signature", "x-payment", "authorization", "x-api-key", "cookie",
                        "access-control-expose-headers", "expect"}
# Date and Server: uvicorn sends its own on every response (paid, replayed, streamed, free); the
# upstream's would make them appear twice.
STRIP_RESPONSE = _HOP | {"content-encoding", "set-cookie", "payment-response", "x-payment-response",
                         "payment-required", "date", "server"}
_COOLDOWN_S = 5.0


class UpstreamUnavailableError(Exception):
    """No URL of the pool accepted a connection."""


class UpstreamFailedError(Exception):
    """The upstream accepted the call and then failed (timeout, reset, truncated body)."""


def path_of(scope: Any) -> str:
    """The request's path as Starlette's request.url gives it (its own escapes for ?, # and \\),
    without building and parsing a URL on every call."""
    return scope["path"].replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")


def query_of(raw: bytes) -> str:
    """The query as forwarded: as sent, or percent-encoded where its bytes are not UTF-8 (which
    Starlette's request.url cannot decode)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return urllib.parse.quote_from_bytes(raw, safe="&=+%;/?:@,$!*'()~[]")


def forward_headers(headers: list[tuple[bytes, bytes]], upstream: Upstream) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        if name not in STRIP_REQUEST:
            out[name] = raw_value.decode("latin-1")
    out["accept-encoding"] = "identity"  # usage and SSE parsing need plain bodies
    out.setdefault("user-agent", "x402-agent-gateway")  # some providers' front doors refuse a call without one
    out.setdefault("accept", "*/*")
    if upstream.auth_header and upstream.auth_value is not None:
        out[upstream.auth_header.lower()] = upstream.auth_value.get_secret_value()
    return out


def response_headers(resp: UpstreamAnswer) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in resp.headers.items() if k.lower() not in STRIP_RESPONSE]


class UpstreamBody(Protocol):
    async def readany(self) -> bytes: ...

    def iter_any(self) -> AsyncIterator[bytes]: ...


class UpstreamAnswer(Protocol):
    """What the paywall reads of an upstream's answer: aiohttp's ClientResponse (worker pools,
    enclaves) or ForwardedAnswer (URL pools). A body read that fails raises aiohttp.ClientError
    or TimeoutError."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content(self) -> UpstreamBody: ...

    def release(self) -> Any: ...


class ForwardedAnswer:
    """An answer from a URL pool, read through facilitator/http11.py (a fifth of aiohttp's CPU
    per call), with the surface of aiohttp's response the paywall reads."""

    def __init__(self, streamed: Streamed) -> None:
        self.status = streamed.status
        self.headers = CIMultiDictProxy(CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in streamed.raw_headers))
        self.content = self
        self._streamed = streamed

    async def readany(self) -> bytes:
        try:
            return await self._streamed.read_chunk()
        except HttpError as exc:  # as aiohttp reports a cut body, so every caller's handling holds
            raise aiohttp.ClientPayloadError(str(exc)) from exc

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self.readany():
            yield chunk

    def release(self) -> None:
        self._streamed.release()


class UpstreamPool:
    def __init__(self, name: str, upstream: Upstream) -> None:
        self.name = name
        self.config = upstream
        self._rr = itertools.count()
        self._down_until: dict[str, float] = {}
        self._clients: dict[str, Http11Client] = {}

    def _order(self) -> list[str]:
        urls = self.config.urls
        start = next(self._rr) % len(urls)
        rotated = urls[start:] + urls[:start]
        now = time.monotonic()
        healthy = [u for u in rotated if self._down_until.get(u, 0) <= now]
        return healthy + [u for u in rotated if u not in healthy]  # all down: try them anyway

    def _client(self, base: str) -> Http11Client:
        client = self._clients.get(base)
        if client is None:  # kept-alive connections per URL, as many at once as aiohttp's pool allowed
            client = self._clients[base] = Http11Client(base, limit=256, timeout_s=self.config.timeout_s,
                                                        max_bytes=1 << 62)
        return client

    async def open(
        self, session: aiohttp.ClientSession, method: str, path_qs: str, headers: dict[str, str], body: bytes
    ) -> UpstreamAnswer:
        """The upstream's response with status and headers read, body not yet read."""
        errors: list[str] = []
        for base in self._order():
            client = self._client(base)
            try:
                streamed = await client.open(method, body, path=client.path.rstrip("/") + path_qs, headers=headers,
                                             connect_timeout_s=self.config.connect_timeout_s,
                                             read_timeout_s=self.config.timeout_s)
            except NotConnectedError as exc:
                # Not connected, or dropped before answering a fresh connection: nothing ran.
                self._down_until[base] = time.monotonic() + _COOLDOWN_S
                errors.append(f"{base}: {exc}")
                continue
            except HttpError as exc:
                raise UpstreamFailedError(str(exc)) from exc
            self._down_until.pop(base, None)
            return ForwardedAnswer(streamed)
        raise UpstreamUnavailableError("; ".join(errors) or "no upstream URL")

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    async def healthy(self, session: aiohttp.ClientSession) -> bool:
        """Reachable means a TCP connection succeeds to at least one URL."""
        for base in self.config.urls:
            try:
                async with session.get(base + "/", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    await r.read()
                return True
            except (TimeoutError, aiohttp.ClientError, OSError):
                continue
        return False


async def read_all(resp: UpstreamAnswer, limit: int) -> bytes:
    try:
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise UpstreamFailedError(f"upstream body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise UpstreamFailedError(f"{type(exc).__name__} while reading the body") from exc


class Upstreams:
    """The routes' upstream pools over one client session: URL lists with failover, worker
    pools (gateway/workers/) and TEE enclaves from a registry (gateway/tee/)."""

    def __init__(self, pools: dict[str, UpstreamPool | WorkerPool | TeePool], session: aiohttp.ClientSession) -> None:
        self.pools = pools
        self.session = session

    async def start(self) -> None:
        for pool in self.pools.values():
            if isinstance(pool, WorkerPool | TeePool):
                await pool.start(self.session)

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()

    def tee_pool(self, upstream: str) -> TeePool | None:
        pool = self.pools[upstream]
        return pool if isinstance(pool, TeePool) else None

    @staticmethod
    def enclave_of(request: Request) -> Enclave | None:
        """The enclave that answered this request (tee upstreams), set by `open`."""
        enclave = request.scope.get("state", {}).get("tee_enclave")
        return enclave if isinstance(enclave, Enclave) else None

    def admit(self, request: Request, upstream: str, body: bytes, model: str | None) -> None:
        """Backpressure before payment: refuse now (404 unknown model, 503 + Retry-After when no
        worker can take the call soon, or no enclave is in rotation) rather than after the agent
        paid. URL pools admit all."""
        pool = self.pools[upstream]
        if isinstance(pool, TeePool) and request.method != "HEAD" and not pool.eligible():
            raise GatewayError(G.UPSTREAM_UNAVAILABLE, "no active enclave is in rotation; nothing was charged", status=503,
                               headers={"Retry-After": str(max(1, round(pool.settings.refresh_s)))})
        if not isinstance(pool, WorkerPool) or request.method == "HEAD":
            return
        try:
            pool.admit(model or pool.model_of(path_of(request.scope), body))
        except PoolRefusal as exc:
            if exc.status == 404:
                raise GatewayError(G.MODEL_NOT_OFFERED, str(exc), status=404) from None
            raise GatewayError(G.UPSTREAM_UNAVAILABLE, str(exc), status=503,
                               headers={"Retry-After": str(exc.retry_after_s or 1)}) from None

    async def open(self, request: Request, upstream: str, body: bytes, request_id: str) -> UpstreamAnswer:
        """The upstream answering this request (status and headers read, body not yet), with the
        agent's payment and auth headers replaced by the provider's key."""
        pool = self.pools[upstream]
        query = query_of(request.scope["query_string"])
        path_qs = path_of(request.scope) + (f"?{query}" if query else "")
        headers = forward_headers(request.headers.raw, pool.config)
        headers["x-request-id"] = request_id
        try:
            if isinstance(pool, TeePool):
                resp, enclave = await pool.open(self.session, request.method, path_qs, headers, body)
                request.scope.setdefault("state", {})["tee_enclave"] = enclave
                return resp
            return await pool.open(self.session, request.method, path_qs, headers, body)
        except (NoWorkerError, NoEnclaveError) as exc:
            raise UpstreamUnavailableError(str(exc)) from None
        except (WorkerCallFailedError, EnclaveCallFailedError) as exc:
            raise UpstreamFailedError(str(exc)) from None

    async def healthy(self) -> list[bool]:
        return [await pool.healthy(self.session) for pool in self.pools.values()]


async def relay(first: bytes, upstream: UpstreamAnswer) -> AsyncIterator[bytes]:
    """Stream the upstream's bytes through as they come (no buffering). An upstream that breaks
    off raises aiohttp.ClientError or asyncio.TimeoutError."""
    try:
        if first:
            yield first
        async for chunk in upstream.content.iter_any():
            yield chunk
    finally:
        upstream.release()
