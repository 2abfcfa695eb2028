"""Account nonces of the facilitator's signers, coordinated across every process that uses them.

A signer's "take a nonce, persist the signed transaction, broadcast it" step runs under a lock
on that signer, with a nonce counter that survives the step:
- `LocalNonces`: an asyncio lock and an in-memory counter (one process: the embedded store);
- `RedisNonces`: a Redis lock (taken and released by scripts that compare the holder's token) and a
  shared counter, so facilitator replicas (or gateway replicas with the facilitator in-process) can all
  use every key without ever sending two transactions with one nonce. Any replica can settle for
  any signer, which `upto` needs (the signed witness names the signer).
The counter is seeded from the chain's pending count when missing, and re-seeded after a nonce
error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from redis.exceptions import RedisError

from storage import BackendErrors, RedisClient, redis_from_url

ChainCount = Callable[[], Awaitable[int]]


class NonceUnavailableError(Exception):
    """The shared nonce state could not be reached or locked in time: nothing was sent."""


_errors = BackendErrors(NonceUnavailableError)


class Nonces(Protocol):
    def hold(self, key: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Exclusive use of one signer's nonce sequence (per chain) while held."""
        ...

    async def current(self, key: str, chain_count: ChainCount) -> int: ...

    async def advance(self, key: str, used: int) -> None: ...

    async def reset(self, key: str) -> None: ...

    async def peek(self, key: str) -> int | None: ...


class LocalNonces:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._next: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            yield

    async def current(self, key: str, chain_count: ChainCount) -> int:
        if key not in self._next:
            self._next[key] = await chain_count()
        return self._next[key]

    async def advance(self, key: str, used: int) -> None:
        self._next[key] = used + 1

    async def reset(self, key: str) -> None:
        self._next.pop(key, None)

    async def peek(self, key: str) -> int | None:
        return self._next.get(key)


# Taking is idempotent per token: a retried attempt whose first one ran (its reply lost to a broken
# connection) finds its own token and holds the lock, instead of waiting for itself until it expires.
_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# The counter's read and write, as scripts: on the client's one multiplexed connection
# (storage/resp.py) like the lock's, not through redis-py's pool (~50-90 us of CPU per command).
_COUNTER = "return redis.call('GET', KEYS[1])"
_ADVANCE = "redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1"
UNLOCK_RETRY_S = 0.1


class RedisNonces:
    def __init__(self, client: RedisClient, *, prefix: str = "x402:", lock_ttl_ms: int = 15_000,
                 wait_s: float = 10.0) -> None:
        self._r = client
        self._p = prefix
        self._ttl = lock_ttl_ms
        self._wait = wait_s
        self._lock = client.register_script(_LOCK)
        self._unlock = client.register_script(_UNLOCK)
        self._counter = client.register_script(_COUNTER)
        self._advance = client.register_script(_ADVANCE)
        self._owner = f"{os.getpid()}:{uuid.uuid4().hex}"
        self._releasing: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "x402:") -> RedisNonces:
        return cls(redis_from_url(url, max_connections=32), prefix=prefix)

    def _k(self, key: str, what: str) -> str:
        return f"{self._p}signer:{{{key}}}:{what}"  # lock and counter share a Cluster slot

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        token = f"{self._owner}:{uuid.uuid4().hex[:8]}"
        lock = self._k(key, "lock")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait
        delay = 0.001
        with _errors:
            while True:
                try:
                    taken = await self._lock(keys=[lock], args=[token, self._ttl])
                except BaseException:  # a timeout or a cancel: the take may still run in Redis
                    self._release_later(lock, token, until=loop.time() + self._ttl / 1000)
                    raise
                if taken:
                    break
                if loop.time() > deadline:
                    raise NonceUnavailableError(f"signer {key} stayed locked for {self._wait}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
        until = loop.time() + self._ttl / 1000
        try:
            yield
        finally:
            try:
                await self._unlock(keys=[lock], args=[token])
            except RedisError:
                self._release_later(lock, token, until=until)
            except asyncio.CancelledError:
                self._release_later(lock, token, until=until)
                raise

    def _release_later(self, lock: str, token: str, *, until: float) -> None:
        """A release lost to a Redis blip (or a take whose outcome is unknown) would leave the
        signer locked for the rest of the lock's ttl, every settlement of that signer failing
        meanwhile: it is retried until it lands or the lock expired by itself. It deletes the lock
        only while it holds this token."""

        async def release() -> None:
            # Until it deleted the lock or the lock expired: a lost take sent on a connection that
            # broke may still run after an attempt here found nothing to delete.
            loop, delay = asyncio.get_running_loop(), UNLOCK_RETRY_S
            while loop.time() < until:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                with contextlib.suppress(RedisError):
                    if await self._unlock(keys=[lock], args=[token]):
                        return

        task = asyncio.ensure_future(release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def current(self, key: str, chain_count: ChainCount) -> int:
        with _errors:
            stored = await self._counter(keys=[self._k(key, "next")])
        chain = await chain_count()
        # The chain's pending count catches up with transactions any process sent; the stored
        # counter covers ones a load-balanced RPC node has not seen yet.
        return max(chain, int(stored)) if stored is not None else chain

    async def advance(self, key: str, used: int) -> None:
        with _errors:
            await self._advance(keys=[self._k(key, "next")], args=[used + 1, 86_400])

    async def reset(self, key: str) -> None:
        with contextlib.suppress(RedisError):
            await self._r.delete(self._k(key, "next"))

    async def peek(self, key: str) -> int | None:
        try:
            stored = await self._r.get(self._k(key, "next"))
        except RedisError:
            return None
        return int(stored) if stored is not None else None

    async def close(self) -> None:
        for task in list(self._releasing):
            task.cancel()
        await self._r.aclose()
