"""Recent refusals, for the operator's console: the last calls the gateway refused (budget,
payment, settlement, upstream), kept in the shared store so every replica's show up.

Notes are buffered in memory and written in the background once a second: a refusal never waits
on its log, nor fails because the store is down (its notes are then dropped, counted in a log
line). The store keeps the newest KEEP notes (a Redis list trimmed on write; a SQLite table
pruned on write, in a file of its own beside the payment records)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

import storage
from storage import BackendErrors, RedisClient, connect_sqlite, immediate

log = logging.getLogger("gateway.refusals")

KEEP = 5000  # notes kept in the store
BUFFER_MAX = 1000  # notes waiting for the next write (more in one second are dropped)


class RefusalStoreUnavailableError(storage.StoreUnavailableError):
    pass


_errors = BackendErrors(RefusalStoreUnavailableError)


@dataclass(frozen=True, slots=True)
class RefusalNote:
    ts: float
    route: str
    reason: str
    status: int
    message: str
    payer: str = ""  # empty when the refusal came before the payment was decoded
    network: str = ""
    asset: str = ""
    kind: str = "call"  # "budget" (budgets refused it), "settlement" (settling failed or is unresolved), "call"
    tx: str = ""  # settlement: the transaction, when one was sent

    def dumps(self) -> bytes:
        return orjson.dumps(self)  # orjson writes a dataclass as asdict would, without its deep copy

    @classmethod
    def loads(cls, raw: str | bytes) -> RefusalNote:
        doc = orjson.loads(raw)
        return cls(**{k: doc[k] for k in cls.__slots__ if k in doc})


class RefusalStore(Protocol):
    async def add(self, notes: list[RefusalNote]) -> None: ...

    async def recent(self, *, since: float, limit: int) -> list[RefusalNote]:
        """Newest first."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class SQLiteRefusalStore:
    def __init__(self, path: str) -> None:
        with _errors:
            self._db = connect_sqlite(path, "CREATE TABLE IF NOT EXISTS refusals"
                                            " (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, note TEXT NOT NULL);")

    async def add(self, notes: list[RefusalNote]) -> None:
        with immediate(self._db, RefusalStoreUnavailableError):
            self._db.executemany("INSERT INTO refusals (ts, note) VALUES (?, ?)",
                                 [(n.ts, n.dumps().decode()) for n in notes])
            self._db.execute("DELETE FROM refusals WHERE id <= (SELECT MAX(id) FROM refusals) - ?", (KEEP,))

    @_errors
    async def recent(self, *, since: float, limit: int) -> list[RefusalNote]:
        rows = self._db.execute("SELECT note FROM refusals WHERE ts >= ? ORDER BY id DESC LIMIT ?",
                                (since, limit)).fetchall()
        return [RefusalNote.loads(r[0]) for r in rows]

    @_errors
    async def ping(self) -> None:
        self._db.execute("SELECT 1")

    async def close(self) -> None:
        self._db.close()


class RedisRefusalStore:
    def __init__(self, client: RedisClient, *, prefix: str) -> None:
        self._redis = client
        self._key = f"{prefix}refusals"

    @_errors
    async def add(self, notes: list[RefusalNote]) -> None:
        # Two commands, not a transaction: a note briefly beyond KEEP harms no one (and one key
        # needs nothing of Cluster).
        await self._redis.lpush(self._key, *[n.dumps() for n in notes])
        await self._redis.ltrim(self._key, 0, KEEP - 1)

    @_errors
    async def recent(self, *, since: float, limit: int) -> list[RefusalNote]:
        notes = [RefusalNote.loads(raw) for raw in await self._redis.lrange(self._key, 0, KEEP - 1)]
        return [n for n in notes if n.ts >= since][:limit]

    @_errors
    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()


def open_refusals(url: str, *, prefix: str = "x402gw:") -> RefusalStore:
    """Beside the payment records; on SQLite in a file of its own (`….sqlite3` -> `…-refusals.sqlite3`)."""
    def sqlite(path: str) -> RefusalStore:
        return SQLiteRefusalStore(path if path == ":memory:" else path.replace(".sqlite3", "") + "-refusals.sqlite3")

    return storage.open_url(url, sqlite=sqlite, redis=lambda r: RedisRefusalStore(r, prefix=prefix))


class RefusalLog:
    """What the gateway notes (sync, never raises) and the console reads (flushing first)."""

    def __init__(self, store: RefusalStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._pending: list[RefusalNote] = []
        self._dropped = 0

    def note(self, route: str, reason: str, status: int, message: str, payer: str = "", network: str = "",
             asset: str = "", *, kind: str = "call", tx: str = "") -> None:
        if len(self._pending) >= BUFFER_MAX:
            self._dropped += 1
            return
        self._pending.append(RefusalNote(self.clock(), route, reason, status, message[:300], payer.lower(),
                                         network, asset.lower(), kind, tx))

    async def flush(self) -> None:
        notes, self._pending = self._pending, []
        if not notes:
            return
        try:
            await self.store.add(notes)
        except storage.StoreUnavailableError:
            self._dropped += len(notes)
        if self._dropped:
            log.warning("refusal_notes_dropped", extra={"count": self._dropped})
            self._dropped = 0

    async def flush_forever(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()

    async def recent(self, *, since: float, limit: int = 1000) -> list[RefusalNote]:
        await self.flush()
        return await self.store.recent(since=since, limit=limit)
