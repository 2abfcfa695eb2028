"""Settlement intents, written ahead: what a replica is about to ask the facilitator to settle,
recorded in the shared store before it asks, closed once the budget is committed (or released).

An intent carries everything needed to finish the work without the replica that started it: the
signed payment (to ask the facilitator again: its settle is idempotent and answers with the first
result), the budget hold and what to write in the ledger, and the payment's record identity (so the
call stays owed to its agent). Each intent is leased to one owner at a time: the replica settling
it, then whichever replica's recovery loop (gateway/paywall/recovery.py) takes it once that lease
lapsed. The budget commit is idempotent by the hold's id (= the intent's id), so the budget store
and this store may differ and a retry never counts twice.

SQLite: one table. Redis: one hash of bodies, one of owners and a sorted set of leases, all under
one hash tag, so every script touches one Cluster slot.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import orjson

import storage
from budgets.models import Hold
from storage import BackendErrors, RedisClient, connect_sqlite, immediate


class IntentStoreUnavailableError(storage.StoreUnavailableError):
    pass


def commit_key(tx_hash: str, hold_id: str) -> str:
    """What a settlement's budget commit is counted once for: its on-chain transaction (two
    requests may both have settled one payment), else the hold (a zero-amount upto settlement)."""
    return tx_hash.lower() if tx_hash.startswith("0x") else hold_id


_errors = BackendErrors(IntentStoreUnavailableError)


@dataclass(slots=True)
class Intent:
    id: str  # the budget hold's id: the budget commit is idempotent by it
    key: str  # the payment's record key
    hold: Hold
    amount: int  # what is settled (upto: the metered amount)
    payment: str  # {"payload", "requirements"} JSON: what settlement is asked (again) with
    request_id: str
    request_fp: str = ""
    digest: str = ""
    delivered: bool = False  # the content already went out (a metered stream): nothing is owed
    details: dict = field(default_factory=dict)  # for the ledger entry
    created_ms: int = 0

    @property
    def payer(self) -> str:
        return self.hold.agent

    def to_json(self) -> str:
        # Field by field, not dataclasses.asdict (a deep copy of everything: a third of a
        # settlement's write-ahead cost); amounts as strings (beyond 64 bits).
        doc = {name: getattr(self, name) for name in _INTENT_FIELDS}
        doc["amount"] = str(self.amount)
        doc["hold"] = {name: getattr(self.hold, name) for name in _HOLD_FIELDS} | {"amount": str(self.hold.amount)}
        return orjson.dumps(doc).decode()

    @classmethod
    def from_json(cls, raw: str | bytes) -> Intent:
        doc = orjson.loads(raw)
        hold = doc.pop("hold")
        hold["amount"] = int(hold["amount"])
        return cls(**(doc | {"amount": int(doc["amount"]), "hold": Hold(**hold)}))


_INTENT_FIELDS = tuple(f.name for f in dataclasses.fields(Intent))
_HOLD_FIELDS = tuple(f.name for f in dataclasses.fields(Hold))


class IntentStore(Protocol):
    async def write(self, intent: Intent, *, owner: str, lease_until_ms: int) -> None:
        """Record the intent, leased to `owner` until `lease_until_ms`."""
        ...

    async def lease(self, id: str, owner: str, *, until_ms: int) -> bool:
        """Move `owner`'s lease to `until_ms` (0: hand it to recovery now); False if not its owner."""
        ...

    async def take(self, id: str, owner: str, *, now_ms: int, lease_ms: int) -> Intent | None:
        """Lease an intent whose lease lapsed to `owner`; None if it is gone or leased to someone."""
        ...

    async def lapsed(self, *, now_ms: int, limit: int) -> list[Intent]:
        """Intents whose lease lapsed (their owner is gone, or handed them over), oldest lease first."""
        ...

    async def finish(self, id: str) -> None:
        """The work is done (committed or released): forget the intent."""
        ...

    async def count(self) -> int: ...

    async def get(self, id: str) -> Intent | None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS intents (id TEXT PRIMARY KEY, body TEXT NOT NULL, owner TEXT NOT NULL,
                                    lease_until_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS intents_lease ON intents (lease_until_ms);
"""


class SQLiteIntents:
    def __init__(self, path: str) -> None:
        with _errors:
            self._db = connect_sqlite(path, _SCHEMA)

    def _tx(self):
        return immediate(self._db, IntentStoreUnavailableError)

    # One statement each where one does: SQLite runs it as its own transaction (atomic across
    # processes), without BEGIN and COMMIT's two more round trips through the driver.
    async def write(self, intent: Intent, *, owner: str, lease_until_ms: int) -> None:
        with _errors:
            self._db.execute("INSERT OR REPLACE INTO intents (id, body, owner, lease_until_ms) VALUES (?, ?, ?, ?)",
                             (intent.id, intent.to_json(), owner, lease_until_ms))

    async def lease(self, id: str, owner: str, *, until_ms: int) -> bool:
        with _errors:
            return self._db.execute("UPDATE intents SET lease_until_ms = ? WHERE id = ? AND owner = ?",
                                    (until_ms, id, owner)).rowcount == 1

    async def take(self, id: str, owner: str, *, now_ms: int, lease_ms: int) -> Intent | None:
        with self._tx():
            row = self._db.execute("SELECT body FROM intents WHERE id = ? AND lease_until_ms < ?", (id, now_ms)).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE intents SET owner = ?, lease_until_ms = ? WHERE id = ?", (owner, now_ms + lease_ms, id))
            return Intent.from_json(row[0])

    @_errors
    async def lapsed(self, *, now_ms: int, limit: int) -> list[Intent]:
        rows = self._db.execute("SELECT body FROM intents WHERE lease_until_ms < ? ORDER BY lease_until_ms LIMIT ?",
                                (now_ms, limit)).fetchall()
        return [Intent.from_json(body) for (body,) in rows]

    async def finish(self, id: str) -> None:
        with _errors:
            self._db.execute("DELETE FROM intents WHERE id = ?", (id,))

    @_errors
    async def count(self) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM intents").fetchone()
        return int(n)

    @_errors
    async def get(self, id: str) -> Intent | None:
        row = self._db.execute("SELECT body FROM intents WHERE id = ?", (id,)).fetchone()
        return Intent.from_json(row[0]) if row else None

    @_errors
    async def ping(self) -> None:
        self._db.execute("SELECT 1")

    async def close(self) -> None:
        self._db.close()


# KEYS: bodies, owners, leases
_WRITE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return 1
"""
_LEASE = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
"""
_TAKE = """
local lease = redis.call('ZSCORE', KEYS[3], ARGV[1])
if (not lease) or tonumber(lease) >= tonumber(ARGV[3]) then return false end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[1])
return redis.call('HGET', KEYS[1], ARGV[1])
"""
_CLOSE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""


class RedisIntents:
    def __init__(self, client: RedisClient, *, prefix: str = "x402gw:") -> None:
        self._r = client
        tag = f"{prefix}intents:{{i}}"
        self._keys = [f"{tag}:body", f"{tag}:owner", f"{tag}:lease"]
        self._write = client.register_script(_WRITE)
        self._lease = client.register_script(_LEASE)
        self._take = client.register_script(_TAKE)
        self._close = client.register_script(_CLOSE)

    @_errors
    async def _run(self, script: Any, args: list[Any]) -> Any:
        return await script(keys=self._keys, args=args)

    async def write(self, intent: Intent, *, owner: str, lease_until_ms: int) -> None:
        await self._run(self._write, [intent.id, intent.to_json(), owner, lease_until_ms])

    async def lease(self, id: str, owner: str, *, until_ms: int) -> bool:
        return await self._run(self._lease, [id, owner, until_ms]) == 1

    async def take(self, id: str, owner: str, *, now_ms: int, lease_ms: int) -> Intent | None:
        raw = await self._run(self._take, [id, owner, now_ms, lease_ms])
        return Intent.from_json(raw) if raw else None

    @_errors
    async def lapsed(self, *, now_ms: int, limit: int) -> list[Intent]:
        ids: list[str] = await self._r.zrangebyscore(self._keys[2], "-inf", f"({now_ms}", start=0, num=limit)  # type: ignore[assignment]
        bodies = await self._r.hmget(self._keys[0], ids) if ids else []
        return [Intent.from_json(b) for b in bodies if b]

    async def finish(self, id: str) -> None:
        await self._run(self._close, [id])

    @_errors
    async def count(self) -> int:
        return int(await self._r.zcard(self._keys[2]))

    @_errors
    async def get(self, id: str) -> Intent | None:
        raw = await self._r.hget(self._keys[0], id)
        return Intent.from_json(raw) if raw else None

    @_errors
    async def ping(self) -> None:
        await self._r.ping()

    async def close(self) -> None:
        await self._r.aclose()


def open_intents(url: str, *, prefix: str = "x402gw:") -> IntentStore:
    return cast(IntentStore, storage.open_url(url, sqlite=SQLiteIntents, redis=lambda r: RedisIntents(r, prefix=prefix),
                                              what="intent store"))
