"""storage/redis_client.py's LinearPack writes the bytes redis-py's own pack_command writes, for
every kind of argument the stores send (and refuses what redis-py refuses)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.exceptions import DataError

from storage.redis_client import linear_packing, redis_from_url

CASES = [
    ("EVALSHA", "a" * 40, 3, "k1", "k2", "k3", "1.5", 0, -1, 10**30, "ünïcode ✓", b"\x00\xffraw", 2.5, 1e-7, ""),
    ("SCRIPT LOAD", "return 1"),
    (b"CONFIG GET", b"maxmemory"),
    ("SET", "k", "x" * 100_000, "NX", "EX", 604800),
    ("HSET", "h", "f", memoryview(b"view"), "g", 3.0),
    ("PING",),
]


@pytest.mark.parametrize("ssl", [False, True])
@pytest.mark.parametrize("args", CASES, ids=range(len(CASES)))
def test_the_same_bytes_as_redis_py(args: tuple, ssl: bool) -> None:
    base = aioredis.SSLConnection if ssl else aioredis.Connection
    ours, theirs = linear_packing(base)(decode_responses=True), base(decode_responses=True)
    assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args))


def test_a_bool_is_refused_as_redis_py_refuses_it() -> None:
    with pytest.raises(DataError):
        linear_packing(aioredis.Connection)().pack_command("SET", "k", True)


def test_single_server_clients_pack_linearly() -> None:
    client = redis_from_url("redis://127.0.0.1:6379/0")
    assert issubclass(client.connection_pool.connection_class, aioredis.Connection)
    assert client.connection_pool.connection_class.pack_command is linear_packing(aioredis.Connection).pack_command
