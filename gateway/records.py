"""Payment records of the gateway: each signed payment is served at most once, across replicas
and restarts.

A record is keyed by the payment's on-chain identity (network, payer, nonce) and moves
PROCESSING -> SETTLED | PENDING, or is deleted when nothing was charged (verify refused it, the
upstream failed, the facilitator definitively refused settlement) so the same payment may be
tried again. SETTLED keeps the settlement and, when small enough, the response, so a resend of
the same request (or a `payment-identifier` retry) gets the earlier result without a new charge.
PENDING means the facilitator may have moved the money: it is written *before* settlement is
asked for (write-ahead), so a replica that dies mid-settlement leaves a record a resend can
resolve; a resend asks the facilitator again and never serves before it says settled.

Whoever works on a record holds its lease (`owner`, `lease_until_ms`), renewed while it works
(gateway/claim.py): a live owner's record answers `payment_in_progress`, a dead owner's lease
lapses within seconds and another request takes over. Every record keeps the digest of the signed
payment it belongs to, so only the very payment that was recorded ever gets its result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, cast

import orjson

import storage
from storage import BackendErrors, RedisClient, connect_sqlite, immediate, redis_from_url
from storage.lua import CLAIM_WITH_LEASE, claim_args, hash_fields


class RecordState(StrEnum):
    PROCESSING = "processing"
    SETTLED = "settled"
    PENDING = "pending"


class RecordStoreUnavailableError(storage.StoreUnavailableError):
    pass


_errors = BackendErrors(RecordStoreUnavailableError)


# A PROCESSING record outlives its lease this many times over (its owner renews both), so a
# record whose owner vanished without a trace is eventually forgotten.
PROCESSING_TTL_LEASES = 20


@dataclass(slots=True)
class PaymentRecord:
    key: str
    state: RecordState
    request_fp: str
    lease_until_ms: int = 0
    tx: str = ""
    settle: str = ""  # SettleResponse JSON
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    cached: bool = False  # status/headers/body hold the complete response
    payment: str = ""  # {"payload", "requirements"} JSON: what a PENDING settlement is retried with
    delivered: bool = False  # True once the response reached the agent to its end; settled and not
    # delivered (nor cached) means the call is owed: a resend of the same payment is served once
    digest: str = ""  # of the signed payment (gateway.payment.payment_digest)
    owner: str = ""  # who holds the lease


class PaymentRecords(Protocol):
    async def begin(self, key: str, request_fp: str, digest: str, *, owner: str, now_ms: int,
                    lease_ms: int) -> PaymentRecord | None:
        """Create a PROCESSING record leased to `owner` and return None (the caller owns the
        payment), or return the record that exists. A PROCESSING record whose lease expired is
        taken over (returns None): nothing was asked of the facilitator under it."""
        ...

    async def acquire(self, key: str, owner: str, *, now_ms: int, lease_ms: int) -> PaymentRecord | None:
        """Lease an existing record to `owner` if nobody else holds it; the record, or None when it
        is missing or leased to another owner."""
        ...

    async def renew(self, key: str, owner: str, *, now_ms: int, lease_ms: int) -> bool:
        """Extend `owner`'s lease; False when the record is gone or leased to someone else."""
        ...

    async def save(self, record: PaymentRecord, *, ttl_s: int, owner: str | None = None,
                   now_ms: int | None = None) -> bool:
        """Write the whole record for `ttl_s` from the caller's now (`now_ms`, else the real clock:
        the same clock `begin` is given). With `owner`: only while that owner holds the lease
        (returns False otherwise, writing nothing); the record's own owner/lease fields are written
        as given."""
        ...

    async def abandon(self, key: str, owner: str) -> None:
        """Delete the record if `owner` holds it and it is not SETTLED: nothing was charged."""
        ...

    async def link_id(self, payment_id: str, key: str, *, ttl_s: int, replace: bool = False,
                      now_ms: int | None = None) -> str:
        """Bind a payment-identifier to a payment key for `ttl_s` from the caller's now (`now_ms`,
        else the real clock); returns the key it is bound to (an earlier one if the id was used
        before, unless `replace`)."""
        ...

    async def get(self, key: str) -> PaymentRecord | None: ...

    async def sweep(self, *, now_ms: int, limit: int = 1000) -> int:
        """Forget up to `limit` records and as many payment ids past their expiry; how many went.
        Redis expires its keys by itself (0)."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def _encode_headers(headers: list[tuple[str, str]]) -> str:
    return orjson.dumps(headers).decode()


def _decode_headers(raw: str | bytes) -> list[tuple[str, str]]:
    return [tuple(h) for h in orjson.loads(raw)] if raw else []


_RECORDS_SCHEMA = """
            CREATE TABLE IF NOT EXISTS records (
                key TEXT PRIMARY KEY, state TEXT NOT NULL, request_fp TEXT NOT NULL,
                lease_until_ms INTEGER NOT NULL DEFAULT 0, tx TEXT NOT NULL DEFAULT '',
                settle TEXT NOT NULL DEFAULT '', status INTEGER NOT NULL DEFAULT 0,
                headers TEXT NOT NULL DEFAULT '', body BLOB, cached INTEGER NOT NULL DEFAULT 0,
                payment TEXT NOT NULL DEFAULT '', delivered INTEGER NOT NULL DEFAULT 0,
                digest TEXT NOT NULL DEFAULT '', owner TEXT NOT NULL DEFAULT '',
                expires_ms INTEGER NOT NULL DEFAULT 0);
            CREATE TABLE IF NOT EXISTS payment_ids (id TEXT PRIMARY KEY, key TEXT NOT NULL, expires_ms INTEGER NOT NULL);
            CREATE INDEX IF NOT EXISTS records_expiry ON records (expires_ms) WHERE expires_ms > 0;
            CREATE INDEX IF NOT EXISTS payment_ids_expiry ON payment_ids (expires_ms);
            """


_COLUMNS = "key, state, request_fp, lease_until_ms, tx, settle, status, headers, body, cached, payment, delivered, digest, owner"
_MARKS = ", ".join("?" * 15)  # _COLUMNS and expires_ms


class SQLitePaymentRecords:
    def __init__(self, path: str) -> None:
        with _errors:
            self._db = connect_sqlite(path, _RECORDS_SCHEMA)

    def _row(self, key: str) -> PaymentRecord | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM records WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return PaymentRecord(
            key=row[0], state=RecordState(row[1]), request_fp=row[2], lease_until_ms=row[3], tx=row[4], settle=row[5],
            status=row[6], headers=_decode_headers(row[7]), body=row[8] or b"", cached=bool(row[9]), payment=row[10],
            delivered=bool(row[11]), digest=row[12], owner=row[13],
        )  # fmt: skip

    def _live_row(self, key: str, now_ms: int) -> PaymentRecord | None:
        self._db.execute("DELETE FROM records WHERE key = ? AND expires_ms > 0 AND expires_ms < ?", (key, now_ms))
        return self._row(key)

    @staticmethod
    def _values(record: PaymentRecord, expires_ms: int) -> tuple[Any, ...]:  # in _COLUMNS' order, then expires_ms
        return (record.key, record.state.value, record.request_fp, record.lease_until_ms, record.tx, record.settle,
                record.status, _encode_headers(record.headers), record.body, int(record.cached), record.payment,
                int(record.delivered), record.digest, record.owner, expires_ms)  # fmt: skip

    def _write(self, record: PaymentRecord, expires_ms: int, *, verb: str = "INSERT OR REPLACE") -> int:
        return self._db.execute(f"{verb} INTO records ({_COLUMNS}, expires_ms) VALUES ({_MARKS})",
                                self._values(record, expires_ms)).rowcount

    async def begin(self, key: str, request_fp: str, digest: str, *, owner: str, now_ms: int,
                    lease_ms: int) -> PaymentRecord | None:
        record = PaymentRecord(key=key, state=RecordState.PROCESSING, request_fp=request_fp,
                               lease_until_ms=now_ms + lease_ms, digest=digest, owner=owner)
        expires_ms = now_ms + lease_ms * PROCESSING_TTL_LEASES
        with _errors:  # a payment seen for the first time (the usual case): one statement, atomic
            if self._write(record, expires_ms, verb="INSERT OR IGNORE") == 1:
                return None
        with immediate(self._db, RecordStoreUnavailableError):
            existing = self._live_row(key, now_ms)
            if existing is None or (existing.state == RecordState.PROCESSING and existing.lease_until_ms < now_ms):
                self._write(record, expires_ms)
                return None
            return existing

    async def acquire(self, key: str, owner: str, *, now_ms: int, lease_ms: int) -> PaymentRecord | None:
        with immediate(self._db, RecordStoreUnavailableError):
            existing = self._live_row(key, now_ms)
            if existing is None or (existing.lease_until_ms >= now_ms and existing.owner != owner):
                return None
            existing.owner, existing.lease_until_ms = owner, now_ms + lease_ms
            self._db.execute("UPDATE records SET owner = ?, lease_until_ms = ? WHERE key = ?",
                             (owner, existing.lease_until_ms, key))
            return existing

    async def renew(self, key: str, owner: str, *, now_ms: int, lease_ms: int) -> bool:
        with immediate(self._db, RecordStoreUnavailableError):
            cur = self._db.execute(
                "UPDATE records SET lease_until_ms = ?,"
                " expires_ms = CASE WHEN state = 'processing' THEN ? ELSE expires_ms END"
                " WHERE key = ? AND owner = ?",
                (now_ms + lease_ms, now_ms + lease_ms * PROCESSING_TTL_LEASES, key, owner),
            )
            return cur.rowcount == 1

    async def save(self, record: PaymentRecord, *, ttl_s: int, owner: str | None = None,
                   now_ms: int | None = None) -> bool:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        with _errors:  # one statement, atomic: kept only while `owner` holds the record
            if owner is None:
                self._write(record, now + ttl_s * 1000)
                return True
            return self._db.execute(f"UPDATE records SET ({_COLUMNS}, expires_ms) = ({_MARKS}) WHERE key = ? AND owner = ?",
                                    (*self._values(record, now + ttl_s * 1000), record.key, owner)).rowcount == 1

    @_errors
    async def abandon(self, key: str, owner: str) -> None:
        self._db.execute("DELETE FROM records WHERE key = ? AND owner = ? AND state != 'settled'", (key, owner))

    async def link_id(self, payment_id: str, key: str, *, ttl_s: int, replace: bool = False,
                      now_ms: int | None = None) -> str:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        with immediate(self._db, RecordStoreUnavailableError):
            self._db.execute("DELETE FROM payment_ids WHERE id = ? AND (expires_ms < ? OR ?)", (payment_id, now, replace))
            self._db.execute(
                "INSERT OR IGNORE INTO payment_ids (id, key, expires_ms) VALUES (?, ?, ?)",
                (payment_id, key, now + ttl_s * 1000),
            )
            (bound,) = self._db.execute("SELECT key FROM payment_ids WHERE id = ?", (payment_id,)).fetchone()
            return bound

    @_errors
    async def get(self, key: str) -> PaymentRecord | None:
        return self._row(key)

    @_errors
    async def sweep(self, *, now_ms: int, limit: int = 1000) -> int:
        # Bounded by `limit` (through the expiry indexes): the event loop is never held long.
        gone = self._db.execute("DELETE FROM records WHERE rowid IN (SELECT rowid FROM records"
                                " WHERE expires_ms > 0 AND expires_ms < ? LIMIT ?)", (now_ms, limit)).rowcount
        return gone + self._db.execute("DELETE FROM payment_ids WHERE rowid IN (SELECT rowid FROM payment_ids"
                                       " WHERE expires_ms < ? LIMIT ?)", (now_ms, limit)).rowcount

    @_errors
    async def ping(self) -> None:
        self._db.execute("SELECT 1")

    async def close(self) -> None:
        self._db.close()


# KEYS[1] record; ARGV: owner, now_ms, lease_ms
_ACQUIRE = """
local lease = redis.call('HGET', KEYS[1], 'lease_until_ms')
if not lease then return 0 end
if tonumber(lease) >= tonumber(ARGV[2]) and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lease_until_ms', tonumber(ARGV[2]) + tonumber(ARGV[3]))
return redis.call('HGETALL', KEYS[1])
"""

# KEYS[1] record; ARGV: owner, now_ms, lease_ms, ttl_ms (of a PROCESSING record)
_RENEW = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until_ms', tonumber(ARGV[2]) + tonumber(ARGV[3]))
if redis.call('HGET', KEYS[1], 'state') == 'processing' then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4])) end
return 1
"""

# KEYS[1] record; ARGV: ttl_s, owner ('' = unconditional), field, value, ...
_SAVE = """
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""

_ABANDON = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] and redis.call('HGET', KEYS[1], 'state') ~= 'settled' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisPaymentRecords:
    def __init__(self, client: RedisClient, *, prefix: str = "x402gw:") -> None:
        self._redis = client
        self._prefix = prefix
        self._begin = client.register_script(CLAIM_WITH_LEASE)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._abandon = client.register_script(_ABANDON)
        self._save = client.register_script(_SAVE)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "x402gw:") -> RedisPaymentRecords:
        return cls(redis_from_url(url, decode_responses=False), prefix=prefix)

    def _key(self, key: str) -> str:
        return f"{self._prefix}pay:{{{key}}}"

    @staticmethod
    def _record(key: str, raw: dict[bytes, bytes]) -> PaymentRecord:
        f = {k.decode(): v for k, v in raw.items()}
        return PaymentRecord(
            key=key,
            state=RecordState(f["state"].decode()),
            request_fp=f.get("request_fp", b"").decode(),
            lease_until_ms=int(f.get("lease_until_ms", b"0") or 0),
            tx=f.get("tx", b"").decode(),
            settle=f.get("settle", b"").decode(),
            status=int(f.get("status", b"0") or 0),
            headers=_decode_headers(f.get("headers", b"")),
            body=f.get("body", b""),
            cached=f.get("cached", b"0") == b"1",
            payment=f.get("payment", b"").decode(),
            delivered=f.get("delivered", b"0") == b"1",
            digest=f.get("digest", b"").decode(),
            owner=f.get("owner", b"").decode(),
        )

    @_errors
    async def _script(self, script, keys: list[str], args: list) -> Any:
        return await script(keys=keys, args=args)

    async def begin(self, key: str, request_fp: str, digest: str, *, owner: str, now_ms: int,
                    lease_ms: int) -> PaymentRecord | None:
        args = claim_args(RecordState.PROCESSING.value, now_ms=now_ms, lease_ms=lease_ms,
                          ttl_ms=lease_ms * PROCESSING_TTL_LEASES,
                          fields={"request_fp": request_fp, "digest": digest, "owner": owner, "delivered": "0"})
        res = await self._script(self._begin, [self._key(key)], args)
        return None if res == 1 else self._record(key, hash_fields(res))

    async def acquire(self, key: str, owner: str, *, now_ms: int, lease_ms: int) -> PaymentRecord | None:
        res = await self._script(self._acquire, [self._key(key)], [owner, now_ms, lease_ms])
        return None if res == 0 else self._record(key, hash_fields(res))

    async def renew(self, key: str, owner: str, *, now_ms: int, lease_ms: int) -> bool:
        ttl_ms = lease_ms * PROCESSING_TTL_LEASES
        return await self._script(self._renew, [self._key(key)], [owner, now_ms, lease_ms, ttl_ms]) == 1

    async def save(self, record: PaymentRecord, *, ttl_s: int, owner: str | None = None,
                   now_ms: int | None = None) -> bool:
        # now_ms: not needed here, EXPIRE is relative to Redis's own clock
        mapping = {
            "state": record.state.value, "request_fp": record.request_fp, "lease_until_ms": record.lease_until_ms,
            "tx": record.tx, "settle": record.settle, "status": record.status,
            "headers": _encode_headers(record.headers), "body": record.body, "cached": "1" if record.cached else "0",
            "payment": record.payment, "delivered": "1" if record.delivered else "0", "digest": record.digest,
            "owner": record.owner,
        }  # fmt: skip
        args: list = [ttl_s, owner or ""]
        for name, value in mapping.items():
            args += [name, value]
        return await self._script(self._save, [self._key(record.key)], args) == 1

    async def abandon(self, key: str, owner: str) -> None:
        await self._script(self._abandon, [self._key(key)], [owner])

    @_errors
    async def link_id(self, payment_id: str, key: str, *, ttl_s: int, replace: bool = False,
                      now_ms: int | None = None) -> str:
        k = f"{self._prefix}pid:{{{payment_id}}}"
        await self._redis.set(k, key, nx=not replace, ex=ttl_s)
        # This client returns bytes (decode_responses=False); redis-py types replies `bytes | str`.
        bound = cast(bytes | None, await self._redis.get(k))
        return bound.decode() if bound else key

    @_errors
    async def get(self, key: str) -> PaymentRecord | None:
        raw = cast(dict[bytes, bytes], await self._redis.hgetall(self._key(key)))
        return self._record(key, raw) if raw else None

    async def sweep(self, *, now_ms: int, limit: int = 1000) -> int:
        return 0  # every key carries its own expiry

    @_errors
    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()


async def sweep_forever(records: PaymentRecords, *, interval_s: float = 30.0, limit: int = 1000) -> None:
    """Expired records leave the embedded store (without it, a SQLite or memory:// store only ever
    grows: a record is read, and deleted when expired, only if its payment comes again)."""
    pause = interval_s
    while True:
        await asyncio.sleep(pause)
        try:  # a full batch: more to go, soon (calls run in between)
            pause = 0.0 if await records.sweep(now_ms=int(time.time() * 1000), limit=limit) >= limit else interval_s
        except RecordStoreUnavailableError:
            pause = interval_s


def open_records(url: str, *, prefix: str = "x402gw:") -> PaymentRecords:
    sqlite: Callable[[str], PaymentRecords] = SQLitePaymentRecords  # checks that it is one
    return storage.open_url(url, sqlite=sqlite, redis=lambda r: RedisPaymentRecords(r, prefix=prefix),
                            decode_responses=False)
