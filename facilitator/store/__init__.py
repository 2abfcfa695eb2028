from collections.abc import Callable

import storage
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
    from facilitator.store.redis_store import RedisSettlementStore
    from facilitator.store.sqlite_store import SQLiteSettlementStore

    sqlite: Callable[[str], SettlementStore] = SQLiteSettlementStore  # checks that it is one
    return storage.open_url(url, sqlite=sqlite, redis=lambda r: RedisSettlementStore(r, prefix=prefix))
