"""storage/resp.py: the project's scripts on one multiplexed connection, against real redis-servers
(private ones where a test stops, stalls or restarts the server)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.redis_client import redis_from_url
from storage.resp import MultiplexedScript, ScriptedRedis
from tests.conftest import RedisServer

pytestmark = pytest.mark.integration

ECHO = "return {KEYS[1], ARGV[1]}"


@pytest.fixture
def private_redis():
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


async def test_plain_tcp_urls_get_the_multiplexed_scripts_and_tls_urls_do_not(redis_server: RedisServer) -> None:
    client = redis_from_url(redis_server.url)
    assert isinstance(client, ScriptedRedis)
    assert isinstance(client.register_script(ECHO), MultiplexedScript)
    await client.aclose()
    tls = redis_from_url(redis_server.url.replace("redis://", "rediss://"))
    assert not isinstance(tls, ScriptedRedis)
    await tls.aclose()


async def test_each_caller_gets_its_own_reply_while_others_are_cancelled(redis_server: RedisServer) -> None:
    client = redis_from_url(redis_server.url)
    script = client.register_script(ECHO)
    rng = random.Random(7)

    async def one(i: int) -> tuple[int, list[str] | None]:
        return i, await script(keys=[f"k{i}"], args=[f"v{i}"])

    for _ in range(5):
        tasks = [asyncio.ensure_future(one(i)) for i in range(400)]
        await asyncio.sleep(0)
        cancelled = {i for i in range(400) if rng.random() < 0.3}
        for i in cancelled:
            tasks[i].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, result in enumerate(results):
            if isinstance(result, asyncio.CancelledError):
                assert i in cancelled
                continue
            assert result == (i, [f"k{i}", f"v{i}"])
    await client.aclose()


async def test_replies_decode_as_the_client_asks(redis_server: RedisServer) -> None:
    raw = redis_from_url(redis_server.url, decode_responses=False)
    script = raw.register_script("return {ARGV[1], tonumber(ARGV[2]), false, redis.status_reply('OK')}")
    assert await script(args=["é", 12]) == ["é".encode(), 12, None, b"OK"]
    await raw.aclose()
    text = redis_from_url(redis_server.url)
    script = text.register_script("return {ARGV[1], tonumber(ARGV[2]), false}")
    assert await script(args=["é", 3.5]) == ["é", 3, None]  # a float argument goes as redis-py writes it
    await text.aclose()


async def test_a_script_error_is_a_response_error_and_the_connection_goes_on(redis_server: RedisServer) -> None:
    client = redis_from_url(redis_server.url)
    bad = client.register_script("return redis.error_reply('NOPE no budget')")
    good = client.register_script(ECHO)
    results = await asyncio.gather(bad(), good(keys=["a"], args=["b"]), bad(), return_exceptions=True)
    assert isinstance(results[0], ResponseError) and "NOPE" in str(results[0])
    assert results[1] == ["a", "b"]
    assert isinstance(results[2], ResponseError)
    await client.aclose()


async def test_a_flushed_script_cache_is_loaded_again(redis_server: RedisServer) -> None:
    client = redis_from_url(redis_server.url)
    script = client.register_script(ECHO + " -- flushed")
    assert await script(keys=["a"], args=["1"]) == ["a", "1"]
    plain = aioredis.Redis.from_url(redis_server.url)
    await plain.script_flush()
    await plain.aclose()
    assert await asyncio.gather(*(script(keys=["a"], args=[str(i)]) for i in range(20))) == \
        [["a", str(i)] for i in range(20)]
    await client.aclose()


async def test_password_and_database_from_the_url() -> None:
    server = RedisServer()
    server.start()
    try:
        setup = aioredis.Redis(port=server.port)
        await setup.config_set("requirepass", "s3cret")
        await setup.aclose()
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        client = redis_from_url(url)
        await client.register_script("return redis.call('SET', KEYS[1], ARGV[1])")(keys=["where"], args=["here"])
        check = aioredis.Redis(port=server.port, password="s3cret", db=3, decode_responses=True)
        assert await check.get("where") == "here"
        await check.aclose()
        await client.aclose()
        wrong = redis_from_url(f"redis://:wrong@127.0.0.1:{server.port}/3")
        with pytest.raises(RedisError):
            await wrong.register_script(ECHO)(keys=["a"], args=["b"])
        await wrong.aclose()
    finally:
        server.stop()


async def test_a_restarted_server_is_reached_again_and_its_empty_script_cache_filled(private_redis: RedisServer) -> None:
    client = redis_from_url(private_redis.url)
    script = client.register_script(ECHO)
    assert await script(keys=["a"], args=["1"]) == ["a", "1"]
    private_redis.stop()
    with pytest.raises(RedisConnectionError):
        await script(keys=["a"], args=["2"])
    private_redis.start()
    assert await script(keys=["a"], args=["3"]) == ["a", "3"]
    await client.aclose()


async def test_a_stalled_server_times_out_everyone_waiting_then_recovers(private_redis: RedisServer) -> None:
    client = redis_from_url(private_redis.url)
    script = client.register_script(ECHO)
    assert await script(keys=["a"], args=["1"]) == ["a", "1"]
    assert private_redis.proc is not None
    os.kill(private_redis.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(script(keys=["a"], args=[str(i)]) for i in range(10)), return_exceptions=True)
        waited = time.monotonic() - started
    finally:
        os.kill(private_redis.proc.pid, signal.SIGCONT)
    assert all(isinstance(r, RedisTimeoutError) for r in results), results
    assert 1.5 < waited < 6
    assert await script(keys=["a"], args=["back"]) == ["a", "back"]
    await client.aclose()


async def test_no_server_is_a_connection_error_not_a_hang(private_redis: RedisServer) -> None:
    client = redis_from_url(private_redis.url)
    private_redis.stop()
    started = time.monotonic()
    with pytest.raises(RedisConnectionError):
        await client.register_script(ECHO)(keys=["a"], args=["b"])
    assert time.monotonic() - started < 3
    await client.aclose()


async def test_a_closed_client_refuses_scripts(redis_server: RedisServer) -> None:
    client = redis_from_url(redis_server.url)
    script = client.register_script(ECHO)
    assert await script(keys=["a"], args=["b"]) == ["a", "b"]
    await client.aclose()
    with pytest.raises(RedisConnectionError):
        await script(keys=["a"], args=["b"])


def test_a_client_used_from_a_second_event_loop_opens_its_own_connection(redis_server: RedisServer) -> None:
    client = redis_from_url(redis_server.url)
    script = client.register_script(ECHO)
    assert asyncio.run(script(keys=["a"], args=["1"])) == ["a", "1"]
    assert asyncio.run(script(keys=["a"], args=["2"])) == ["a", "2"]
    asyncio.run(client.aclose())


# Found by review (each failed before its fix).


async def test_a_connect_whose_callers_all_left_does_not_hand_out_a_dead_connection(private_redis: RedisServer) -> None:
    client = redis_from_url(private_redis.url)
    script = client.register_script("return 1")
    first = asyncio.ensure_future(script())
    await asyncio.sleep(0)  # waiting for the connect
    first.cancel()  # e.g. its HTTP request went away
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.sleep(0.1)
    assert await script() == 1
    admin = aioredis.Redis(port=private_redis.port)
    for c in await admin.client_list():
        if c["cmd"] == "evalsha":
            await admin.client_kill_filter(_id=c["id"])
    await admin.aclose()
    await asyncio.sleep(0.1)  # the connection is known lost
    started = time.monotonic()
    assert await script() == 1  # a new connection at once, not the dead one
    assert time.monotonic() - started < 1.0
    await client.aclose()


async def test_closing_while_connecting_leaves_no_connection_open(private_redis: RedisServer) -> None:
    client = redis_from_url(private_redis.url)
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    call = asyncio.ensure_future(script(keys=["after_close"]))
    await asyncio.sleep(0)
    await client.aclose()
    result = (await asyncio.gather(call, return_exceptions=True))[0]
    assert isinstance(result, RedisError) or result == 1
    await asyncio.sleep(0.2)
    admin = aioredis.Redis(port=private_redis.port)
    open_cmds = [c["cmd"] for c in await admin.client_list() if c["cmd"] != "client|list"]
    await admin.aclose()
    assert open_cmds == []


def test_a_connect_cut_short_by_a_finished_event_loop_is_not_left_to_the_next_one(redis_server: RedisServer) -> None:
    client = redis_from_url(redis_server.url)
    script = client.register_script(ECHO)

    async def leave_while_connecting() -> None:
        asyncio.ensure_future(script(keys=["a"], args=["1"]))
        await asyncio.sleep(0)  # asyncio.run ends now, cancelling the connect

    asyncio.run(leave_while_connecting())
    assert asyncio.run(script(keys=["a"], args=["2"])) == ["a", "2"]
    asyncio.run(client.aclose())


async def test_an_error_inside_a_returned_table_is_a_response_error(redis_server: RedisServer) -> None:
    client = redis_from_url(redis_server.url)
    reply = await client.register_script("return {1, redis.error_reply('NESTED oops')}")()
    assert reply[0] == 1 and isinstance(reply[1], ResponseError)
    await client.aclose()
