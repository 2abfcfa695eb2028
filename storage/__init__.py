"""The storage layer under facilitator, budgets and gateway: how every store of the project is
reached (one URL reading, Redis in its three topologies, SQLite), the one `StoreUnavailableError`
their errors derive from, and the Lua the Redis stores share. It imports none of the packages
above it."""

from storage.errors import BackendErrors, StoreUnavailableError
from storage.redis_client import RedisClient, is_redis_url, redis_from_url
from storage.sqlite_conn import connect_sqlite, immediate
from storage.urls import StoreURL, open_url, parse_store_url

__all__ = [
    "BackendErrors",
    "RedisClient",
    "StoreURL",
    "StoreUnavailableError",
    "connect_sqlite",
    "immediate",
    "is_redis_url",
    "open_url",
    "parse_store_url",
    "redis_from_url",
]
