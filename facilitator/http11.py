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
import collections
import ssl
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import httptools

KEEPALIVE_S = 15.0  # an idle connection older than this is not reused (aiohttp's default)
MAX_ANSWER_BYTES = 64 << 20
_OWN_HEADERS = "User-Agent: x402-agent-gateway\r\nAccept-Encoding: identity\r\n"
STREAM_BUFFER_BYTES = 256 << 10  # of a streamed answer read ahead of its reader, before the socket is paused


class HttpError(Exception):
    """No answer: not connected, dropped, timed out, or an answer that is malformed or too big."""


class NotConnectedError(HttpError):
    """The request never reached a server that could have acted on it: no connection could be
    made, or a fresh one was closed before a byte of the answer came."""


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
    """One connection, one exchange at a time; reusable only after an answer that keeps it alive.
    An exchange is whole (`exchange`: the answer read into memory) or streamed (`begin`: the
    status and headers first, then `read_chunk` as the body comes, with flow control)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future[Answer] | None = None  # whole
        self.head: asyncio.Future[None] | None = None  # streamed: status and headers are in
        self.reusable = False
        self.idle_since = 0.0
        self.busy = False  # an exchange is under way: bytes are expected
        self.received = False  # a byte of this exchange's answer came
        self.complete = False  # this exchange's answer came whole
        self._streaming = False
        self._body = bytearray()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._failure: Exception | None = None
        self._reader: asyncio.Future[None] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._headers_done = False
        self._framed = False  # the answer says where its body ends (Content-Length or chunked)

    # -- asyncio ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport instances

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # bytes nobody asked for: never reuse this one
            self._finish(HttpError("unexpected bytes from the server"))
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(HttpError(f"malformed answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if not self.busy:
            return
        if self._headers_done and not self._framed:  # a body that runs until the connection closes
            self.on_message_complete()
            return
        what = "before the answer" if not self.received else "in the middle of the answer"
        self._finish(HttpError(f"connection closed {what} ({exc or 'by the server'})"))

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
        if self._streaming and self.parser.get_status_code() >= 200 and self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, chunk: bytes) -> None:
        if self._streaming:
            self._chunks.append(chunk)
            self._buffered += len(chunk)
            if self._buffered > STREAM_BUFFER_BYTES and not self._paused and self.transport is not None:
                self._paused = True  # the reader is behind: stop reading the socket until it catches up
                self.transport.pause_reading()
            self._wake()
            return
        if len(self._body) + len(chunk) > self.max_bytes:
            self._finish(HttpError(f"answer larger than {self.max_bytes} bytes"))
            return
        self._body += chunk

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # informational (100 Continue, 103): the answer is still to come
            return
        self.busy = False
        self.complete = True
        self.reusable = self.parser.should_keep_alive() and not self.transport_closing()
        if self._streaming:
            self._wake()
        elif self.answer is not None and not self.answer.done():
            self.answer.set_result(Answer(status, bytes(self._body), self._headers))

    # -- ours ---------------------------------------------------------------------------------

    def transport_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def _wake(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def _finish(self, exc: Exception) -> None:
        self.reusable = False
        self.busy = False
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc)
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
        elif self._streaming and self._failure is None and not self.complete:
            self._failure = exc
            self._wake()
        self.close()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    def _start(self, request: bytes, streaming: bool) -> None:
        if self.transport_closing():
            raise HttpError("connection closed")
        assert self.transport is not None
        self.reusable = self.received = self.complete = False  # until an answer that keeps it alive is whole
        self.busy = True
        self._streaming = streaming
        self._chunks.clear()
        self._buffered = 0
        self._failure = None
        self.transport.write(request)

    async def exchange(self, request: bytes, timeout_s: float) -> Answer:
        self.answer = self.loop.create_future()
        # A timer on the answer rather than asyncio.timeout: a third of the client's cost per exchange.
        timer = self.loop.call_later(timeout_s, self._finish, HttpError(f"no answer within {timeout_s:g} s"))
        try:
            self._start(request, streaming=False)
            return await self.answer
        finally:
            timer.cancel()

    async def begin(self, request: bytes, timeout_s: float) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Send a request whose answer is streamed; its status and headers."""
        self.head = self.loop.create_future()
        timer = self.loop.call_later(timeout_s, self._finish, HttpError(f"no answer within {timeout_s:g} s"))
        try:
            self._start(request, streaming=True)
            await self.head
        finally:
            timer.cancel()
            self.head = None
        return self.parser.get_status_code(), self._headers

    async def read_chunk(self, timeout_s: float) -> bytes:
        """What of the body has come since the last read (waiting up to `timeout_s` for some);
        b"" once it came whole. Raises HttpError (cut, malformed) or TimeoutError."""
        while not self._chunks:
            if self._failure is not None:
                raise self._failure
            if self.complete:
                return b""
            self._reader = self.loop.create_future()
            timer = self.loop.call_later(timeout_s, self._read_timed_out)
            try:
                await self._reader
            finally:
                timer.cancel()
                self._reader = None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def _read_timed_out(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_exception(TimeoutError())


class Streamed:
    """An answer whose status and headers are in and whose body is read as it comes. Its
    connection (and its slot of the client's limit) is held until `release`: back to the client
    if the body was read whole and the server keeps it alive, else closed."""

    def __init__(self, client: Http11Client, conn: _Connection, status: int, raw_headers: list[tuple[bytes, bytes]],
                 read_timeout_s: float) -> None:
        self.status = status
        self.raw_headers = raw_headers
        self._client = client
        self._conn: _Connection | None = conn
        self._read_timeout_s = read_timeout_s

    async def read_chunk(self) -> bytes:
        if self._conn is None:
            raise HttpError("the answer was released")
        return await self._conn.read_chunk(self._read_timeout_s)

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client._done_with(conn)

    def __del__(self) -> None:  # a caller that never released: the slot comes back with the object
        if self._conn is not None and not self._conn.loop.is_closed():
            self._conn.loop.call_soon_threadsafe(self.release)


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
        head = [f"Host: {authority}"]
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

    def _request_bytes(self, method: str, path: str | None, body: bytes, content_type: str | None,
                       headers: Mapping[str, str] | None) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()) if headers else ""
        key = (method, path or self.path, content_type or "", extra)
        start = self._starts.get(key)
        if start is None:  # the request line and fixed headers, made once per kind of request
            # A whole exchange names its client and asks for identity (without Accept-Encoding a
            # server may compress: RFC 9110 §12.5.3); a streamed one sends its caller's headers only.
            kind = f"Content-Type: {content_type}\r\n{_OWN_HEADERS}" if content_type else ""
            start = f"{method} {key[1]} HTTP/1.1\r\n{self._head}\r\n{kind}{extra}Content-Length: ".encode("latin-1")
            if not extra and len(self._starts) < 64:  # forwarded headers differ per call: not kept
                self._starts[key] = start
        return b"%s%d\r\n\r\n%s" % (start, len(body), body)

    async def request(self, method: str, body: bytes = b"", *, path: str | None = None,
                      content_type: str = "application/json", headers: Mapping[str, str] | None = None) -> Answer:
        """The whole answer. Raises HttpError when there is none."""
        request = self._request_bytes(method, path, body, content_type, headers)
        deadline = time.monotonic() + self.timeout_s
        await self._slot(self.timeout_s)
        conn: _Connection | None = None
        try:
            conn = self._take()
            if conn is None:
                conn = await self._connect(max(deadline - time.monotonic(), 0.001))
            return await conn.exchange(request, max(deadline - time.monotonic(), 0.001))
        except OSError as exc:
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if conn is not None:
                self._done_with(conn)
            else:
                self._slots.release()

    async def open(self, method: str, body: bytes = b"", *, path: str | None = None, headers: Mapping[str, str],
                   connect_timeout_s: float, read_timeout_s: float) -> Streamed:
        """An answer to stream: status and headers read, the body not yet. `headers` are all the
        request's own (no Content-Type is added). Raises NotConnectedError when the request cannot
        have been acted on (no connection; a fresh one dropped before any answer), HttpError for
        anything after. A kept-alive connection the server had closed meanwhile is replaced once."""
        request = self._request_bytes(method, path, body, None, headers)
        await self._slot(connect_timeout_s)
        for attempt in range(2):
            conn = self._take() if attempt == 0 else None
            fresh = conn is None
            try:
                if conn is None:
                    conn = await self._connect(connect_timeout_s)
            except (OSError, HttpError) as exc:
                self._slots.release()
                raise NotConnectedError(f"{type(exc).__name__}: {exc}") from exc
            try:
                status, raw_headers = await conn.begin(request, read_timeout_s)
            except (OSError, HttpError) as exc:
                conn.close()
                if not conn.received and not fresh and attempt == 0:
                    continue  # the kept-alive connection was gone: once more on a new one
                self._slots.release()
                if not conn.received:
                    raise NotConnectedError(f"dropped before answering: {exc}") from exc
                raise HttpError(str(exc)) from exc
            except BaseException:
                conn.close()
                self._slots.release()
                raise
            return Streamed(self, conn, status, raw_headers, read_timeout_s)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _slot(self, timeout_s: float) -> None:
        try:
            if self._slots.locked():  # every connection busy: wait for one, within the time given
                await asyncio.wait_for(self._slots.acquire(), timeout_s)
            else:
                await self._slots.acquire()
        except TimeoutError:
            raise HttpError(f"no connection free within {timeout_s:g} s") from None

    def _take(self) -> _Connection | None:
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        while self._idle:
            conn = self._idle.pop()
            if conn.loop is not loop:  # made under a loop that has ended (a CLI's asyncio.run, a test's)
                continue
            if conn.reusable and not conn.transport_closing() and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn.close()
        return None

    async def _connect(self, timeout_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self.max_bytes), self.host, self.port, ssl=self._ssl,
                                       server_hostname=self.host if self._ssl else None), timeout_s)
        except TimeoutError:
            raise HttpError(f"not connected within {timeout_s:g} s") from None
        return conn

    def _done_with(self, conn: _Connection) -> None:
        """The exchange is over: the connection back (answer whole, kept alive) or closed; its slot freed."""
        self._slots.release()
        if conn.reusable and conn.complete and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:  # mid-answer (cancelled, timed out, released early), closed by the server, or not to be kept
            conn.close()

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
