"""The facilitator's signer lock on Redis (facilitator/evm/nonces.py) across Redis failures: a retried
take never waits for itself, and a release lost to an outage is not left to the lock's expiry."""

from __future__ import annotations

import asyncio
import time

import pytest

from facilitator.evm.nonces import NonceUnavailableError, RedisNonces
from storage.redis_client import redis_from_url
from tests.conftest import RedisServer

pytestmark = pytest.mark.integration


async def test_a_retried_take_with_the_same_token_holds_the_lock(redis_server: RedisServer, redis_prefix: str) -> None:
    nonces = RedisNonces(redis_from_url(redis_server.url), prefix=redis_prefix)
    lock = nonces._k("84532:0xabc", "lock")
    # The first attempt ran but its reply was lost: the retry finds its own token.
    assert await nonces._lock(keys=[lock], args=["mine", 15_000]) == 1
    assert await nonces._lock(keys=[lock], args=["mine", 15_000]) == 1
    assert await nonces._lock(keys=[lock], args=["theirs", 15_000]) == 0
    await nonces.close()


async def test_a_release_lost_to_an_outage_lands_once_redis_is_back(redis_prefix: str) -> None:
    server = RedisServer(["--appendonly", "yes", "--appendfsync", "always"])  # the lock survives the crash
    server.start()
    try:
        holder = RedisNonces(redis_from_url(server.url), prefix=redis_prefix, lock_ttl_ms=15_000)
        async with holder.hold("84532:0xabc"):
            await asyncio.to_thread(server.kill)
        # The release failed (nothing to reach); it is retried in the background.
        await asyncio.to_thread(server.start)
        other = RedisNonces(redis_from_url(server.url), prefix=redis_prefix, wait_s=5.0)
        started = time.monotonic()
        try:
            async with other.hold("84532:0xabc"):
                pass
        except NonceUnavailableError:
            pytest.fail("the signer stayed locked until the lock expired")
        assert time.monotonic() - started < 5.0
        await other.close()
        await holder.close()
    finally:
        server.stop()


async def test_a_take_lost_to_a_stalled_redis_does_not_leave_the_signer_locked(redis_prefix: str) -> None:
    import os
    import signal

    server = RedisServer()
    server.start()
    try:
        taker = RedisNonces(redis_from_url(server.url), prefix=redis_prefix)
        async with taker.hold("84532:0xabc"):
            pass  # connection open, scripts loaded
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)  # the next take is sent, then times out; it runs on resume
        try:
            with pytest.raises(NonceUnavailableError):
                async with taker.hold("84532:0xabc"):
                    pass
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        other = RedisNonces(redis_from_url(server.url), prefix=redis_prefix, wait_s=5.0)
        async with other.hold("84532:0xabc"):  # not the lock's 15 s
            pass
        await other.close()
        await taker.close()
    finally:
        server.stop()


async def test_a_take_whose_caller_was_cancelled_does_not_leave_the_signer_locked(
        redis_server: RedisServer, redis_prefix: str) -> None:
    taker = RedisNonces(redis_from_url(redis_server.url), prefix=redis_prefix)
    async with taker.hold("84532:0xabc"):
        pass

    async def settle() -> None:
        async with taker.hold("84532:0xabc"):
            await asyncio.sleep(1)

    task = asyncio.ensure_future(settle())
    await asyncio.sleep(0)  # the take is sent, its reply not read
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    other = RedisNonces(redis_from_url(redis_server.url), prefix=redis_prefix, wait_s=5.0)
    started = time.monotonic()
    async with other.hold("84532:0xabc"):
        pass
    assert time.monotonic() - started < 5.0
    await other.close()
    await taker.close()
