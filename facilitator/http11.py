"""A small HTTP/1.1 client for request/answer exchanges held in memory, over kept-alive
connections: the JSON-RPC node (facilitator/evm/rpc.py) and a remote facilitator's /verify and
/settle (gateway/facilitator_client.py).

Why not aiohttp here: one JSON-RPC POST costs 180-270 µs of aiohttp's CPU on this machine and
20-55 µs through this client (same node, same loop), at a third of the latency; a settled payment
makes three or four such calls. llhttp (httptools, as uvicorn uses it) parses the answers;
asyncio's transports carry the bytes, TLS included. Deliberately narrow: the whole body is sent
and the whole answer read (bounded); no redirects, proxies, cookies, compression or streaming
(the upstream path keeps aiohttp). Like aiohttp, a request is never retried: a dropped connection
is the caller's "may or may not have arrived".
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import httptools

KEEPALIVE_S = 15.0  # an idle connection older than this is not reused (aiohttp's default)
MAX_ANSWER_BYTES = 64 << 20


class HttpError(Exception):
    """No answer: not connected, dropped, timed out, or an answer that is malformed or too big."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    raw_headers: list[tuple[bytes, bytes]]

    @property
    def headers(self) -> dict[str, str]:
        """Names lowercased; a repeated header keeps its last value (decoded on demand: the
        JSON-RPC path never looks)."""
        return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in self.raw_headers}


class _Connection(asyncio.Protocol):
    """One connection, one exchange at a time; reusable only after an answer that keeps it alive."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future[Answer] | None = None
        self.reusable = False
        self.idle_since = 0.0
        self._body = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        self._headers_done = False
        self._framed = False  # the answer says where its body ends (Content-Length or chunked)

    # -- asyncio ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport instances

    def data_received(self, data: bytes) -> None:
        if self.answer is None or self.answer.done():  # bytes nobody asked for: never reuse this one
            self._finish(HttpError("unexpected bytes from the server"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(HttpError(f"malformed answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self.answer is None or self.answer.done():
            return
        if self._headers_done and not self._framed:  # a body that runs until the connection closes
            self.answer.set_result(Answer(self.parser.get_status_code(), bytes(self._body), self._headers))
        else:
            self.answer.set_exception(HttpError(f"connection closed before the answer ({exc or 'by the server'})"))

    # -- llhttp's callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._body.clear()
        self._headers = []
        self._headers_done = False
        self._framed = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
                self._framed = True

    def on_body(self, chunk: bytes) -> None:
        if len(self._body) + len(chunk) > self.max_bytes:
            self._finish(HttpError(f"answer larger than {self.max_bytes} bytes"))
            return
        self._body += chunk

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # informational (100 Continue, 103): the answer is still to come
            return
        answer = Answer(status, bytes(self._body), self._headers)
        self.reusable = self.parser.should_keep_alive()
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(answer)

    # -- ours ---------------------------------------------------------------------------------

    def _finish(self, exc: Exception) -> None:
        self.reusable = False
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, request: bytes, timeout_s: float) -> Answer:
        if self.transport is None or self.transport.is_closing():
            raise HttpError("connection closed")
        self.reusable = False  # until an answer that keeps the connection alive is complete
        loop = asyncio.get_running_loop()
        self.answer = loop.create_future()
        # A timer on the answer rather than asyncio.timeout: a third of the client's cost per exchange.
        timer = loop.call_later(timeout_s, self._finish, HttpError(f"no answer within {timeout_s:g} s"))
        self.transport.write(request)
        try:
            return await self.answer
        finally:
            timer.cancel()


class Http11Client:
    """Kept-alive connections to the origin of `url` (http or https), at most `limit` at once;
    `timeout_s` bounds each exchange, waiting for a free connection included."""

    def __init__(self, url: str, *, limit: int = 64, timeout_s: float = 10.0, max_bytes: int = MAX_ANSWER_BYTES,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if tls else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._ssl = (ssl_context or ssl.create_default_context()) if tls else None
        authority = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port is not None:
            authority += f":{parts.port}"
        # Identity asked for: without Accept-Encoding a server may compress (RFC 9110 §12.5.3).
        head = [f"Host: {authority}", "User-Agent: x402-agent-gateway", "Accept-Encoding: identity"]
        if parts.username is not None:  # credentials in the URL (some RPC providers): Basic auth
            pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            head.append("Authorization: Basic " + base64.b64encode(pair.encode()).decode())
        self._head = "\r\n".join(head)
        self._idle: list[_Connection] = []
        self._starts: dict[tuple[str, str, str, str], bytes] = {}
        self._slots = asyncio.Semaphore(limit)
        self._closed = False

    async def post(self, body: bytes, *, path: str | None = None, content_type: str = "application/json",
                   headers: Mapping[str, str] | None = None) -> Answer:
        return await self.request("POST", body, path=path, content_type=content_type, headers=headers)

    async def request(self, method: str, body: bytes = b"", *, path: str | None = None,
                      content_type: str = "application/json", headers: Mapping[str, str] | None = None) -> Answer:
        """Raises HttpError when there is no complete answer."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()) if headers else ""
        key = (method, path or self.path, content_type, extra)
        start = self._starts.get(key)
        if start is None:  # the request line and fixed headers, made once per kind of request
            start = (f"{method} {key[1]} HTTP/1.1\r\n{self._head}\r\nContent-Type: {content_type}\r\n{extra}"
                     "Content-Length: ").encode("latin-1")
            if len(self._starts) < 64:
                self._starts[key] = start
        request = b"%s%d\r\n\r\n%s" % (start, len(body), body)
        deadline = time.monotonic() + self.timeout_s
        conn: _Connection | None = None
        try:
            if self._slots.locked():  # every connection busy: wait for one, within the time given
                await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
            else:
                await self._slots.acquire()
        except TimeoutError:
            raise HttpError(f"no connection free within {self.timeout_s:g} s") from None
        try:
            conn = self._take()
            if conn is None:
                conn = await asyncio.wait_for(self._connect(), max(deadline - time.monotonic(), 0.001))
            return await conn.exchange(request, max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            raise HttpError(f"no answer within {self.timeout_s:g} s") from None
        except OSError as exc:
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._slots.release()
            if conn is not None:
                self._give_back(conn)

    def _take(self) -> _Connection | None:
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        while self._idle:
            conn = self._idle.pop()
            if conn.loop is not loop:  # made under a loop that has ended (a CLI's asyncio.run, a test's)
                continue
            if conn.reusable and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Connection(self.max_bytes), self.host, self.port, ssl=self._ssl)
        return conn

    def _give_back(self, conn: _Connection) -> None:
        if conn.reusable and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:  # mid-exchange (cancelled, timed out), closed by the server, or not to be kept alive
            conn.close()

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
