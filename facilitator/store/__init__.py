from facilitator.store.base import (
    TERMINAL,
    ClaimResult,
    SettlementRecord,
    SettlementState,
    SettlementStore,
    StoreUnavailableError,
)

__all__ = [
    "TERMINAL",
    "ClaimResult",
    "SettlementRecord",
    "SettlementState",
    "SettlementStore",
    "StoreUnavailableError",
    "open_store",
]


def open_store(url: str, *, prefix: str = "x402:") -> SettlementStore:
    """`redis://…`, `redis+sentinel://…`, `redis+cluster://…` -> RedisSettlementStore;
    `sqlite:///path` or `memory://` -> SQLiteSettlementStore (the embedded default)."""
    from facilitator.store.redis_client import is_redis_url

    if is_redis_url(url):
        from facilitator.store.redis_store import RedisSettlementStore

        return RedisSettlementStore.from_url(url, prefix=prefix)
    if url.startswith("sqlite://") or url == "memory://":
        from facilitator.store.sqlite_store import SQLiteSettlementStore

        path = ":memory:" if url == "memory://" else url.removeprefix("sqlite://")
        return SQLiteSettlementStore(path)
    raise ValueError(f"unsupported store URL scheme: {url.split(':', 1)[0]!r}")
