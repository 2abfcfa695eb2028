"""The project's Lua scripts over one multiplexed connection per client (plain-TCP single servers and
Sentinel masters; Cluster and TLS keep redis-py's path).

redis-py spends 50-90 us of CPU per command here (a pooled connection taken and given back under
locks, a health check, retry wrappers, a reply parsed through layers), more than Redis spends
running most of our scripts. Every store's hot path is a script (EVALSHA): this sends each one on a
single connection the moment it is called, and hiredis parses the replies, which Redis sends in the
order it got the commands; so each reply goes to the oldest waiting caller. No pool, no locks: the
callers of one event loop share the connection, their commands pipelined by the socket.

Kept from the redis-py path (storage/redis_client.py): the same bytes on the wire, the same reply
types (decode_responses), RedisError subclasses for every failure (stores turn them into their own
"unavailable" error), a 2 s timeout per command, one retry when the connection broke (a restarted
server has not seen the command; every script is idempotent per id for the rare reply lost after
it ran), NOSCRIPT answered by loading the script, and a Sentinel master found again after a failover
(READONLY or a lost connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis._parsers.encoders import Encoder
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def pack_command(encoder: Any, args: Sequence[Any]) -> bytes:  # encoder: redis-py's Encoder (untyped)
    """RESP bytes of a command, as redis-py's `pack_command` writes them, in one pass (redis-py
    joins its whole buffer again for every argument: quadratic in a command's length)."""
    first = args[0]
    if isinstance(first, str):
        args = (*first.encode().split(), *args[1:])
    elif b" " in first:
        args = (*first.split(), *args[1:])
    out = [b"*%d\r\n" % len(args)]
    encoding, errors = encoder.encoding, encoder.encoding_errors
    for arg in args:
        kind = type(arg)
        if kind is str:
            b = arg.encode(encoding, errors)
        elif kind is bytes:
            b = arg
        elif kind is int:
            b = b"%d" % arg
        else:  # floats, memoryviews, bool (refused), anything else: as redis-py has it
            b = bytes(encoder.encode(arg))
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _error(message: str) -> ResponseError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith("READONLY"):
        return ReadOnlyError(message)
    return ResponseError(message)


class _Protocol(asyncio.Protocol):
    """One connection: replies go to the waiting callers in the order their commands were sent."""

    def __init__(self, encoding: str | None, errors: str, timeout_s: float) -> None:
        # Errors nested in a reply (a script's returned table) come as ResponseError, as in redis-py.
        self.reader = (hiredis.Reader(replyError=ResponseError, encoding=encoding, errors=errors) if encoding
                       else hiredis.Reader(replyError=ResponseError))
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.broken: Exception | None = None
        self.timeout_s = timeout_s
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while (reply := self.reader.gets()) is not False:
            if not waiting:  # a reply nobody asked for: the stream cannot be trusted any more
                self.fail(RedisConnectionError("redis sent a reply nobody waited for"))
                return
            future, _ = waiting.popleft()
            if future.done():  # its caller was cancelled or timed out; the reply is dropped
                continue
            if isinstance(reply, ResponseError):
                future.set_exception(_error(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to redis lost: {exc or 'closed by the server'}"))

    def fail(self, error: Exception) -> None:
        if self.broken is None:
            self.broken = error
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.close()

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        assert self.transport is not None
        future = self.loop.create_future()
        deadline = self.loop.time() + self.timeout_s
        self.waiting.append((future, deadline))
        self.transport.write(packed)
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self.check_timeout)
        return future

    def check_timeout(self) -> None:
        """One timer per connection, not one per command: replies come in order, so the oldest
        command (its caller may have left; its reply is still due) is the first to time out."""
        self.timer = None
        if not self.waiting:
            return
        deadline = self.waiting[0][1]
        if deadline <= self.loop.time():  # the server stalled or the link is gone: start afresh
            self.fail(RedisTimeoutError(f"redis did not answer within {self.timeout_s} s"))
            return
        self.timer = self.loop.call_at(deadline, self.check_timeout)


class ScriptConnection:
    """A client's multiplexed connection, opened on first use and again after it broke."""

    def __init__(self, address: Callable[[], Awaitable[tuple[str, int]]], *, encoder: Encoder,
                 username: str | None, password: str | None, db: int, timeout_s: float, connect_timeout_s: float) -> None:
        self._address = address
        self.encoder = encoder
        self._auth = ([username] if username else []) + ([password] if password else [])
        self._db = db
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._proto: _Protocol | None = None
        self._opening: asyncio.Task[_Protocol] | None = None
        self._closed = False

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RedisConnectionError("the redis client is closed")
        proto = self._proto
        if proto is not None and proto.broken is None:
            if proto.loop is loop:
                return proto
            self._drop(RedisConnectionError("opened on another event loop"))  # e.g. a finished asyncio.run's
        opening = self._opening
        if opening is None or opening.get_loop() is not loop:  # one connect at a time; concurrent callers share it
            opening = self._opening = loop.create_task(self._connect())
            opening.add_done_callback(self._opened)
        proto = await asyncio.shield(opening)  # a caller that leaves does not stop the others' connect
        if proto.broken is not None:  # lost at once, or the client was closed while it connected
            raise RedisConnectionError(f"connection to redis not usable: {proto.broken}")
        return proto

    def _opened(self, task: asyncio.Task[_Protocol]) -> None:
        """The connect ended, whoever still waits for it: keep its connection, or let the next
        caller connect again (its error is read here, so none is left unretrieved)."""
        if self._opening is task:
            self._opening = None
        if task.cancelled() or task.exception() is not None:
            return
        self._drop(RedisConnectionError("replaced"))
        self._proto = task.result()
        if self._closed:  # closed while connecting: this connection is nobody's
            self._drop(RedisConnectionError("the redis client is closed"))

    def _drop(self, error: Exception) -> None:
        proto, self._proto = self._proto, None
        if proto is not None:
            with contextlib.suppress(RuntimeError):  # its loop may be gone already
                proto.fail(error)

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        encoding = self.encoder.encoding if self.encoder.decode_responses else None
        proto: _Protocol | None = None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                host, port = await self._address()
                _, proto = await loop.create_connection(
                    lambda: _Protocol(encoding, self.encoder.encoding_errors, self._timeout_s), host, port)
                if self._auth:
                    await proto.send(pack_command(self.encoder, ("AUTH", *self._auth)))
                if self._db:
                    await proto.send(pack_command(self.encoder, ("SELECT", self._db)))
        except BaseException as exc:
            if proto is not None:
                proto.fail(RedisConnectionError("connection to redis not set up"))
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError("timed out connecting to redis") from None
            if isinstance(exc, OSError):
                raise RedisConnectionError(f"cannot connect to redis: {exc}") from exc
            raise
        return proto

    async def call(self, packed: bytes) -> Any:
        """One command's reply; a broken connection is opened again and the command sent once more."""
        for attempt in (0, 1):
            proto = await self._open()
            try:
                return await proto.send(packed)
            except RedisConnectionError:
                if attempt:
                    raise
            except ReadOnlyError:  # a demoted Sentinel master: find the new one
                proto.fail(RedisConnectionError("redis master changed"))
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closed = True
        self._drop(RedisConnectionError("the redis client is closed"))  # one still connecting: when it ends


class MultiplexedScript:
    """What `register_script` gives on a `ScriptedRedis`: called as redis-py's AsyncScript is."""

    def __init__(self, connection: ScriptConnection, script: str | bytes) -> None:
        self.connection = connection
        self.script = script
        raw = script.encode() if isinstance(script, str) else script
        self.sha = hashlib.sha1(raw).hexdigest()

    async def __call__(self, keys: Sequence[Any] | None = None, args: Iterable[Any] | None = None) -> Any:
        keys = keys or []
        command = ("EVALSHA", self.sha, len(keys), *keys, *(args or ()))
        packed = pack_command(self.connection.encoder, command)
        try:
            return await self.connection.call(packed)
        except NoScriptError:  # a restarted (or another) server: load it, then run it
            await self.connection.call(pack_command(self.connection.encoder, ("SCRIPT", "LOAD", self.script)))
            return await self.connection.call(packed)


class ScriptedRedis(aioredis.Redis):
    """redis-py's client, whose registered scripts run over one multiplexed connection."""

    _scripts: ScriptConnection | None = None

    def script_connection(self) -> ScriptConnection:
        if self._scripts is None:
            pool = self.connection_pool
            kw = pool.connection_kwargs
            encoder: Encoder = pool.get_encoder()  # type: ignore[no-untyped-call]
            get_master = getattr(pool, "get_master_address", None)

            async def address() -> tuple[str, int]:
                if get_master is not None:  # Sentinel: the master now
                    host, port = await get_master()
                    return host, int(port)
                return kw.get("host", "localhost"), int(kw.get("port", 6379))

            self._scripts = ScriptConnection(
                address, encoder=encoder, username=kw.get("username"), password=kw.get("password"),
                db=int(kw.get("db", 0) or 0), timeout_s=kw.get("socket_timeout") or 2.0,
                connect_timeout_s=kw.get("socket_connect_timeout") or 2.0)
        return self._scripts

    def register_script(self, script: str | bytes) -> MultiplexedScript:  # type: ignore[override]
        return MultiplexedScript(self.script_connection(), script)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        if self._scripts is not None:
            await self._scripts.close()
        await super().aclose(close_connection_pool)
