"""One way to reach Redis from a URL, for every store of the project:

    redis://[:password@]host:port/db   rediss://…      a single server
    redis+sentinel://[:password@]host:port[,host:port…]/service_name[/db]
                                                      the master of a Sentinel-managed group
    redis+cluster://[:password@]host:port[,host:port…]   Redis Cluster (rediss+cluster:// with TLS)

Every Lua script of the project touches keys of one hash slot only (see each store), so the same
scripts run unchanged on all three. Single servers use a blocking pool: callers queue for a
connection instead of failing with "Too many connections" under load. Over plain TCP (single
servers, Sentinel masters) the scripts run on one multiplexed connection (storage/resp.py).
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from storage.resp import ScriptedRedis, pack_command

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://", "redis+cluster://",
                 "rediss+cluster://")
# Idle pooled connections are pinged before use, so the first commands after a Redis restart do
# not fail on a connection the server already closed.
TIMEOUTS = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0, "health_check_interval": 5}


# What `redis_from_url` returns: the cluster client has the same command API as a single server's
# (and a Sentinel master's) client, which every store uses.
RedisClient: TypeAlias = "aioredis.Redis | RedisCluster"


def _retry() -> dict[str, Any]:
    """One retry on a broken connection (a Redis restart closes pooled sockets; the new server has
    not seen the command). Not on timeouts, where the command may have run. Every script of the
    project is idempotent per id, for the rare reply lost after a command ran."""
    return {"retry": Retry(NoBackoff(), 1), "retry_on_error": [RedisConnectionError]}


def is_redis_url(url: str) -> bool:
    return url.startswith(REDIS_SCHEMES)


def _hosts(netloc: str) -> tuple[str | None, list[tuple[str, int]]]:
    password = None
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        password = unquote(auth.split(":", 1)[1] if ":" in auth else auth) or None
    hosts = []
    for part in netloc.split(","):
        host, _, port = part.rpartition(":")
        hosts.append((host or part, int(port) if port else 6379))
    return password, hosts


class BoundedRedisCluster(RedisCluster):
    """redis-py's async cluster client fails a cold-start burst (concurrent first connections and
    script loads: AttributeError inside send_packed_command, seen in the contract tests). The
    first command runs alone; after it succeeded, up to `max_in_flight` run at once."""

    def __init__(self, *args: Any, max_in_flight: int = 64, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_in_flight = max_in_flight
        self._warm = False
        self._first: asyncio.Lock | None = None
        self._gate: asyncio.Semaphore | None = None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if not self._warm:
            if self._first is None:
                self._first = asyncio.Lock()
            async with self._first:
                if not self._warm:
                    result = await super().execute_command(*args, **kwargs)
                    self._warm = True
                    return result
        if self._gate is None:
            self._gate = asyncio.Semaphore(self._max_in_flight)
        async with self._gate:
            return await super().execute_command(*args, **kwargs)


class LinearPack:
    """redis-py's connection with storage.resp's one-pass `pack_command` (redis-py's re-joins its
    buffer for every argument: a budget script's 60 arguments cost more there than the round trip)."""

    encoder: Any

    def pack_command(self, *args: Any) -> list[bytes]:
        return [pack_command(self.encoder, args)]


_LINEAR: dict[type, type] = {}


def linear_packing(cls: type) -> type:
    """`cls` (a redis-py connection class) with LinearPack's pack_command."""
    if cls not in _LINEAR:
        _LINEAR[cls] = type(cls.__name__, (LinearPack, cls), {})
    return _LINEAR[cls]


class BlockingSentinelConnectionPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The Sentinel pool, but callers queue for a connection (up to `timeout`) like the single-server
    pool, instead of failing with "Too many connections" under load."""


def redis_from_url(url: str, *, decode_responses: bool = True, max_connections: int = 64) -> RedisClient:
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        parts = urlsplit(url)
        password, hosts = _hosts(parts.netloc)
        # No health_check_interval here: redis-py's cluster client races on it under concurrent
        # connects (AttributeError in send_packed_command); the cluster client reconnects by itself.
        return BoundedRedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in hosts], password=password, decode_responses=decode_responses,
            ssl=url.startswith("rediss+"), max_connections=max(max_connections, 1024), max_in_flight=max_connections,
            socket_timeout=TIMEOUTS["socket_timeout"], socket_connect_timeout=TIMEOUTS["socket_connect_timeout"],
        )  # fmt: skip
    if url.startswith(("redis+sentinel://", "rediss+sentinel://")):
        parts = urlsplit(url)
        password, hosts = _hosts(parts.netloc)
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("redis+sentinel:// URLs name the service: redis+sentinel://host:port/service_name[/db]")
        service, db = path[0], int(path[1]) if len(path) > 1 else 0
        sentinel = Sentinel(hosts, sentinel_kwargs=dict(TIMEOUTS), **TIMEOUTS)
        tls = url.startswith("rediss+")
        master: aioredis.Redis = sentinel.master_for(
            service, redis_class=aioredis.Redis if tls else ScriptedRedis,
            connection_pool_class=BlockingSentinelConnectionPool, max_connections=max_connections, timeout=2.0,
            password=password, db=db, decode_responses=decode_responses, ssl=tls, **_retry(),
        )
        master.connection_pool.connection_class = linear_packing(master.connection_pool.connection_class)
        return master
    pool = aioredis.BlockingConnectionPool.from_url(
        url, decode_responses=decode_responses, max_connections=max_connections, timeout=2.0, **TIMEOUTS, **_retry()
    )
    pool.connection_class = linear_packing(pool.connection_class)
    # Plain TCP: the scripts run multiplexed (storage/resp.py); TLS and unix sockets: redis-py's path.
    client_class = ScriptedRedis if url.startswith("redis://") else aioredis.Redis
    return client_class.from_pool(pool)  # owns the pool: close() disconnects it
