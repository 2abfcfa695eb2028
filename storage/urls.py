"""One reading of a store URL for every store of the project:

    sqlite:///path/to/file.sqlite3   the embedded default (a file shared by the processes of a host)
    memory://                        a private in-memory SQLite store
    redis://… rediss://… unix://…    Redis, Sentinel (redis+sentinel://) or Cluster (redis+cluster://):
                                     see storage/redis_client.py

Each layer keeps its own `open_…(url)` and passes `open_url` the constructors of its two backends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from storage.redis_client import RedisClient, is_redis_url, redis_from_url

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StoreURL:
    kind: Literal["sqlite", "redis"]
    url: str
    path: str = ""  # sqlite: the file, or ":memory:"


def parse_store_url(url: str, *, what: str = "store") -> StoreURL:
    """Raises ValueError for any other scheme (`what` names the store in the message)."""
    if is_redis_url(url):
        return StoreURL("redis", url)
    if url.startswith("sqlite://") or url == "memory://":
        return StoreURL("sqlite", url, ":memory:" if url == "memory://" else url.removeprefix("sqlite://"))
    raise ValueError(f"unsupported {what} URL scheme: {url.split(':', 1)[0]!r}")


def open_url(url: str, *, sqlite: Callable[[str], T], redis: Callable[[RedisClient], T], what: str = "store",
             decode_responses: bool = True) -> T:
    """`sqlite(path)` or `redis(client)`, by the URL's scheme."""
    parsed = parse_store_url(url, what=what)
    if parsed.kind == "redis":
        return redis(redis_from_url(url, decode_responses=decode_responses))
    return sqlite(parsed.path)
