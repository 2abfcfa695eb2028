"""batch-settlement channels as the gateway keeps them, in the shared store (Redis or SQLite).

One record per channel: its config and requirement, what was charged (cumulative), the latest
voucher the payer signed, the on-chain state mirrored (balance, totalClaimed, a pending timed
withdrawal, the refund nonce) and the call in flight (`held`). Every replica serves every
channel: a call takes the channel with one compare-and-set in one round trip (a Lua script on
Redis, one IMMEDIATE transaction on SQLite) that checks the voucher continues exactly from what
was charged, fits the balance, and that no other call holds the channel; there is no
process-local lock. A hold belongs to its call (`holder`): it is short and renewed while the call
runs, so a hold whose replica died lapses within seconds and the channel serves again; a call
whose hold lapsed and was taken by another is not charged (its commit finds the hold gone) and
never releases the other call's hold.

The channel manager's coordination lives here too: a lease (one replica claims at a time) and
the journal of the claim in flight (a claim whose outcome is unknown is sent again, unchanged,
until it is terminal: the facilitator keys it by its signed batch, so it lands once).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from redis.typing import EncodableT, FieldT

import storage
from storage import BackendErrors, RedisClient, connect_sqlite, immediate
from storage.lua import BIGNUM, hash_fields


class HoldOutcome(StrEnum):
    OK = "ok"
    MISSING = "missing"  # no such channel here (yet)
    BUSY = "busy"  # another call of this channel is in flight
    MISMATCH = "mismatch"  # the voucher does not continue from what was charged
    EXCEEDS = "exceeds"  # the voucher is above the channel's balance
    WITHDRAWING = "withdrawing"  # the payer started a timed withdrawal: no more calls


class ChannelStoreUnavailableError(storage.StoreUnavailableError):
    pass


_errors = BackendErrors(ChannelStoreUnavailableError)


@dataclass(slots=True)
class Channel:
    id: str  # 0x + 64 hex, lowercase
    network: str
    asset: str  # lowercase
    payer: str
    route: str
    config: str  # channelConfig, wire JSON
    requirement: str  # the route's batch-settlement requirement for this asset, wire JSON
    charged: int = 0  # cumulative, what calls cost
    signed_max: int = 0  # the latest voucher's maxClaimableAmount
    signature: str = ""  # ... and its signature (0x hex)
    balance: int = 0  # mirrored from chain
    total_claimed: int = 0  # mirrored from chain (and raised by our own claims)
    withdraw_at: int = 0  # a pending timed withdrawal's start (chain time), 0: none
    refund_nonce: int = 0
    held: int = 0  # the call in flight's worst case
    hold_until: float = 0.0
    synced_at: float = 0.0
    holder: str = ""  # the call in flight (its request id)

    def snapshot(self) -> dict[str, Any]:
        """`extra.channelState` of a payment response (the spec's field names)."""
        return {"channelId": self.id, "balance": str(self.balance), "totalClaimed": str(self.total_claimed),
                "withdrawRequestedAt": self.withdraw_at, "refundNonce": str(self.refund_nonce),
                "chargedCumulativeAmount": str(self.charged)}


_INT_FIELDS = ("charged", "signed_max", "balance", "total_claimed", "withdraw_at", "refund_nonce", "held")


def _channel_from(fields: dict[str, str]) -> Channel:
    return Channel(
        id=fields["id"], network=fields["network"], asset=fields["asset"], payer=fields["payer"], route=fields["route"],
        config=fields["config"], requirement=fields["requirement"], signature=fields.get("signature", ""),
        hold_until=float(fields.get("hold_until", "0")), synced_at=float(fields.get("synced_at", "0")),
        holder=fields.get("holder", ""), **{name: int(fields.get(name, "0")) for name in _INT_FIELDS},
    )  # fmt: skip


class ChannelStore(Protocol):
    async def mirror(self, channel: Channel, *, now: float) -> Channel:
        """Create the channel from `channel` if new (charged starts at its totalClaimed: what was
        never claimed by anyone is not ours to ask for); else take its on-chain fields
        (balance, totalClaimed never lowered, withdrawal, refund nonce). Returns the record."""
        ...

    async def hold(self, id: str, *, charged: int, voucher_max: int, signature: str, amount: int, now: float,
                   lease_s: float, holder: str = "") -> tuple[HoldOutcome, Channel | None]:
        """Take the channel for one call (`holder`) of `amount` paid by a voucher for
        `voucher_max`, until `now + lease_s` unless renewed: only if no call holds it, `charged`
        is what was charged, the voucher fits the balance and no withdrawal is pending. The
        voucher is kept (a signed voucher is never lost)."""
        ...

    async def renew(self, id: str, *, holder: str, until: float) -> bool:
        """Extend `holder`'s hold to `until`; False if the channel is not held by it any more."""
        ...

    async def commit(self, id: str, *, charge: int, holder: str = "", reply: str = "",
                     voucher: str = "") -> Channel | None:
        """The call is over: `charge` (at most the hold) is added to what was charged, if the
        channel is still held by `holder` (else None, nothing charged: its hold lapsed and
        another call took the channel). `reply`: the call's answer, kept with it (for the
        voucher `voucher`, its signature) until `delivered`: a resend of that voucher after a
        crash or a cut gets it (owed_reply)."""
        ...

    async def delivered(self, id: str, *, voucher: str) -> None:
        """The answer kept for `voucher` went out to its end: a resend of it is a replay (refused)."""
        ...

    async def owed_reply(self, id: str, *, voucher: str) -> str | None:
        """The answer kept for `voucher` and not yet delivered, if any."""
        ...

    async def release(self, id: str, *, holder: str = "") -> None:
        """The call is over and charged nothing (the channel is freed only if `holder` holds it)."""
        ...

    async def claimed(self, id: str, *, total: int) -> None: ...

    async def refunded(self, id: str, *, balance: int, refund_nonce: int) -> None: ...

    async def get(self, id: str) -> Channel | None: ...

    async def ids(self) -> list[str]: ...

    async def lease(self, name: str, owner: str, *, ttl_s: float, now: float) -> bool:
        """Take or extend the named lease for `owner`: True while it is ours."""
        ...

    async def journal(self, name: str, value: str | None) -> None:
        """Write (or, with None, clear) the named journal entry."""
        ...

    async def read_journal(self, name: str) -> str | None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------------------------
# Redis: a hash per channel (one Cluster slot each), a set of channel ids.

_MIRROR = BIGNUM + """
local c = KEYS[1]
if redis.call('EXISTS', c) == 0 then
  redis.call('HSET', c, unpack(ARGV, 6))
  redis.call('HSET', c, 'charged', ARGV[2], 'signed_max', '0', 'held', '0', 'hold_until', '0')
end
local claimed = redis.call('HGET', c, 'total_claimed') or '0'
if cmp(ARGV[2], claimed) > 0 then claimed = ARGV[2] end
local charged = redis.call('HGET', c, 'charged')
if cmp(claimed, charged) > 0 then charged = claimed end
redis.call('HSET', c, 'balance', ARGV[1], 'total_claimed', claimed, 'charged', charged, 'withdraw_at', ARGV[3],
           'refund_nonce', ARGV[4], 'synced_at', ARGV[5])
return redis.call('HGETALL', c)
"""

# ARGV: charged, voucher_max, signature, amount, now, hold_until, holder
_HOLD = BIGNUM + """
local c = KEYS[1]
if redis.call('EXISTS', c) == 0 then return {'missing'} end
if redis.call('HGET', c, 'held') ~= '0' and tonumber(redis.call('HGET', c, 'hold_until')) > tonumber(ARGV[5]) then
  return {'busy'}
end
if redis.call('HGET', c, 'withdraw_at') ~= '0' then return {'withdrawing'} end
if cmp(redis.call('HGET', c, 'charged'), ARGV[1]) ~= 0 then return {'mismatch', redis.call('HGETALL', c)} end
if cmp(ARGV[2], redis.call('HGET', c, 'balance')) > 0 then return {'exceeds', redis.call('HGETALL', c)} end
redis.call('HSET', c, 'held', ARGV[4], 'hold_until', ARGV[6], 'holder', ARGV[7])
if cmp(ARGV[2], redis.call('HGET', c, 'signed_max')) > 0 then
  redis.call('HSET', c, 'signed_max', ARGV[2], 'signature', ARGV[3])
end
return {'ok', redis.call('HGETALL', c)}
"""

# KEYS: channel, its kept reply. ARGV: charge, reply, voucher signature, reply TTL (ms), holder
_COMMIT = BIGNUM + """
local c = KEYS[1]
local v = redis.call('HMGET', c, 'held', 'holder', 'charged')
if v[1] == false or v[1] == '0' or (v[2] or '') ~= ARGV[5] then return false end
redis.call('HSET', c, 'charged', add(v[3], ARGV[1]), 'held', '0', 'hold_until', '0', 'holder', '')
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[2], 'voucher', ARGV[3], 'reply', ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return redis.call('HGETALL', c)
"""

# ARGV: holder, then until (renew) or nothing (release)
_HELD_BY = """
local v = redis.call('HMGET', KEYS[1], 'held', 'holder')
if v[1] == false or v[1] == '0' or (v[2] or '') ~= ARGV[1] then return 0 end
if ARGV[2] then redis.call('HSET', KEYS[1], 'hold_until', ARGV[2])
else redis.call('HSET', KEYS[1], 'held', '0', 'hold_until', '0', 'holder', '') end
return 1
"""

_DELIVERED = """
if redis.call('HGET', KEYS[1], 'voucher') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

REPLY_TTL_MS = 86_400_000  # an owed answer is kept a day (as the payment records of exact calls)

_CLAIMED = BIGNUM + """
local c = KEYS[1]
if redis.call('EXISTS', c) == 0 then return 0 end
if cmp(ARGV[1], redis.call('HGET', c, 'total_claimed')) > 0 then redis.call('HSET', c, 'total_claimed', ARGV[1]) end
return 1
"""

_LEASE = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class RedisChannelStore:
    def __init__(self, client: RedisClient, *, prefix: str = "x402gw:") -> None:
        self._r = client
        self._p = prefix
        self._ids = f"{prefix}batch:channels"
        self._mirror = client.register_script(_MIRROR)
        self._hold = client.register_script(_HOLD)
        self._commit = client.register_script(_COMMIT)
        self._held_by = client.register_script(_HELD_BY)
        self._delivered = client.register_script(_DELIVERED)
        self._claimed = client.register_script(_CLAIMED)
        self._lease = client.register_script(_LEASE)

    def _k(self, id: str) -> str:
        return f"{self._p}batch:channel:{{{id}}}"

    def _reply_key(self, id: str) -> str:
        return f"{self._p}batch:reply:{{{id}}}"  # the channel's slot: one script writes both

    @_errors
    async def _call(self, coro: Any) -> Any:
        return await coro

    async def mirror(self, channel: Channel, *, now: float) -> Channel:
        c = channel
        identity = ["id", c.id, "network", c.network, "asset", c.asset, "payer", c.payer, "route", c.route,
                    "config", c.config, "requirement", c.requirement]
        reply = await self._call(self._mirror(keys=[self._k(c.id)], args=[
            str(c.balance), str(c.total_claimed), str(c.withdraw_at), str(c.refund_nonce), repr(now), *identity]))
        await self._call(self._r.sadd(self._ids, c.id))
        return _channel_from(hash_fields(reply))

    async def hold(self, id: str, *, charged: int, voucher_max: int, signature: str, amount: int, now: float,
                   lease_s: float, holder: str = "") -> tuple[HoldOutcome, Channel | None]:
        reply = await self._call(self._hold(keys=[self._k(id)], args=[
            str(charged), str(voucher_max), signature, str(amount), repr(now), repr(now + lease_s), holder]))
        outcome = HoldOutcome(reply[0])
        return outcome, (_channel_from(hash_fields(reply[1])) if len(reply) > 1 else None)

    async def renew(self, id: str, *, holder: str, until: float) -> bool:
        return bool(await self._call(self._held_by(keys=[self._k(id)], args=[holder, repr(until)])))

    async def commit(self, id: str, *, charge: int, holder: str = "", reply: str = "",
                     voucher: str = "") -> Channel | None:
        # the kept reply is written only if the charge is (in the same script)
        fields = await self._call(self._commit(keys=[self._k(id), self._reply_key(id)],
                                               args=[str(charge), reply, voucher, REPLY_TTL_MS, holder]))
        return _channel_from(hash_fields(fields)) if fields else None

    async def delivered(self, id: str, *, voucher: str) -> None:
        await self._call(self._delivered(keys=[self._reply_key(id)], args=[voucher]))

    async def owed_reply(self, id: str, *, voucher: str) -> str | None:
        kept, reply = await self._call(self._r.hmget(self._reply_key(id), ["voucher", "reply"]))
        return reply if kept == voucher and reply else None

    async def release(self, id: str, *, holder: str = "") -> None:
        await self._call(self._held_by(keys=[self._k(id)], args=[holder]))

    async def claimed(self, id: str, *, total: int) -> None:
        await self._call(self._claimed(keys=[self._k(id)], args=[str(total)]))

    async def refunded(self, id: str, *, balance: int, refund_nonce: int) -> None:
        mapping: dict[FieldT, EncodableT] = {"balance": str(balance), "refund_nonce": str(refund_nonce)}
        await self._call(self._r.hset(self._k(id), mapping=mapping))

    async def get(self, id: str) -> Channel | None:
        fields = await self._call(self._r.hgetall(self._k(id)))
        return _channel_from(fields) if fields else None

    async def ids(self) -> list[str]:
        return sorted(await self._call(self._r.smembers(self._ids)))

    async def lease(self, name: str, owner: str, *, ttl_s: float, now: float) -> bool:
        key = f"{self._p}batch:lease:{name}"
        return bool(await self._call(self._lease(keys=[key], args=[owner, str(int(ttl_s * 1000))])))

    async def journal(self, name: str, value: str | None) -> None:
        key = f"{self._p}batch:journal:{name}"
        await self._call(self._r.delete(key) if value is None else self._r.set(key, value))

    async def read_journal(self, name: str) -> str | None:
        value = await self._call(self._r.get(f"{self._p}batch:journal:{name}"))
        return value if isinstance(value, str) else None

    @_errors
    async def ping(self) -> None:
        await self._r.ping()

    async def close(self) -> None:
        await self._r.aclose()


# --------------------------------------------------------------------------------------------
# SQLite: one row per channel, amounts as TEXT, each operation one IMMEDIATE transaction.

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_channels (
    id TEXT PRIMARY KEY, network TEXT, asset TEXT, payer TEXT, route TEXT, config TEXT, requirement TEXT,
    charged TEXT, signed_max TEXT, signature TEXT, balance TEXT, total_claimed TEXT, withdraw_at INTEGER,
    refund_nonce TEXT, held TEXT, hold_until REAL, synced_at REAL);
CREATE TABLE IF NOT EXISTS batch_leases (name TEXT PRIMARY KEY, owner TEXT, until REAL);
CREATE TABLE IF NOT EXISTS batch_journal (name TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS batch_replies (id TEXT PRIMARY KEY, voucher TEXT, reply TEXT, until REAL);
"""
_COLS = ("id, network, asset, payer, route, config, requirement, charged, signed_max, signature, balance, total_claimed,"
         " withdraw_at, refund_nonce, held, hold_until, synced_at, holder")


# What a channel's calls change; the rest (config, requirement, …) never changes once written.
_MUTABLE = ("charged, signed_max, signature, balance, total_claimed, withdraw_at, refund_nonce, held, hold_until, synced_at,"
            " holder")


def _gt(a: str, b: str) -> str:
    """SQL: a > b for amounts kept as canonical decimal TEXT (no leading zeros: longer is larger)."""
    return f"(length({a}) > length({b}) OR (length({a}) = length({b}) AND {a} > {b}))"


# The hot path in one statement each (autocommit: atomic), the whole record returned. A hold that
# does not go through is retried in a transaction that tells why; a commit whose `charged` is not
# the one this process held (it always is, unless the store was changed under it) too. In SET,
# every expression reads the row as it was before the update.
_HOLD_FAST = (f"UPDATE batch_channels SET held = :amount, hold_until = :until, holder = :holder, "
              f"signed_max = CASE WHEN {_gt(':vmax', 'signed_max')} THEN :vmax ELSE signed_max END, "
              f"signature = CASE WHEN {_gt(':vmax', 'signed_max')} THEN :sig ELSE signature END "
              f"WHERE id = :id AND (held = '0' OR hold_until <= :now) AND withdraw_at = 0 AND charged = :charged "
              f"AND NOT {_gt(':vmax', 'balance')} RETURNING {_MUTABLE}")
_COMMIT_FAST = (f"UPDATE batch_channels SET charged = :new, held = '0', hold_until = 0, holder = '' WHERE id = :id "
                f"AND charged = :old AND held != '0' AND holder = :holder RETURNING {_MUTABLE}")


def _channel_of(r: Any) -> Channel:
    return Channel(id=r[0], network=r[1], asset=r[2], payer=r[3], route=r[4], config=r[5], requirement=r[6],
                   charged=int(r[7]), signed_max=int(r[8]), signature=r[9], balance=int(r[10]),
                   total_claimed=int(r[11]), withdraw_at=int(r[12]), refund_nonce=int(r[13]), held=int(r[14]),
                   hold_until=float(r[15]), synced_at=float(r[16]), holder=r[17] or "")


class SQLiteChannelStore:
    def __init__(self, path: str) -> None:
        with _errors:
            self._db = connect_sqlite(path, _SCHEMA)
            if "holder" not in {r[1] for r in self._db.execute("PRAGMA table_info(batch_channels)")}:
                with contextlib.suppress(sqlite3.OperationalError):  # another process added it meanwhile
                    self._db.execute("ALTER TABLE batch_channels ADD COLUMN holder TEXT NOT NULL DEFAULT ''")
        self._held: dict[str, int] = {}  # channel -> what was charged when this process took it
        self._fixed: dict[str, tuple[Any, ...]] = {}  # channel -> its columns that never change

    def _row(self, id: str) -> Channel | None:
        r = self._db.execute(f"SELECT {_COLS} FROM batch_channels WHERE id = ?", (id,)).fetchone()
        if r is None:
            return None
        self._fixed[id] = tuple(r[:7])
        return _channel_of(r)

    def _mutated(self, id: str, mutable: Any) -> Channel:
        """The channel from a fast statement's RETURNING (its mutable columns)."""
        fixed = self._fixed.get(id)
        if fixed is None:
            found = self._row(id)
            assert found is not None
            return found
        return _channel_of((*fixed, *mutable))

    def _tx(self, fn: Any) -> Any:
        with immediate(self._db, ChannelStoreUnavailableError):
            return fn()

    def _set(self, id: str, **fields: Any) -> None:
        names = ", ".join(f"{k} = ?" for k in fields)
        values = [str(v) if isinstance(v, int) and not isinstance(v, bool) and k != "withdraw_at" else v
                  for k, v in fields.items()]
        self._db.execute(f"UPDATE batch_channels SET {names} WHERE id = ?", (*values, id))

    async def mirror(self, channel: Channel, *, now: float) -> Channel:
        c = channel

        def run() -> Channel:
            row = self._row(c.id)
            if row is None:
                self._db.execute(
                    f"INSERT INTO batch_channels ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, '0', '', ?, ?, ?, ?, '0', 0, ?, '')",
                    (c.id, c.network, c.asset, c.payer, c.route, c.config, c.requirement, str(c.total_claimed),
                     str(c.balance), str(c.total_claimed), c.withdraw_at, str(c.refund_nonce), now))
            else:
                claimed = max(row.total_claimed, c.total_claimed)
                self._set(c.id, balance=c.balance, total_claimed=claimed, charged=max(row.charged, claimed),
                          withdraw_at=c.withdraw_at, refund_nonce=c.refund_nonce, synced_at=now)
            found = self._row(c.id)
            assert found is not None
            return found
        return self._tx(run)

    async def hold(self, id: str, *, charged: int, voucher_max: int, signature: str, amount: int, now: float,
                   lease_s: float, holder: str = "") -> tuple[HoldOutcome, Channel | None]:
        with _errors:
            r = self._db.execute(_HOLD_FAST, {"id": id, "amount": str(amount), "until": now + lease_s, "now": now,
                                              "vmax": str(voucher_max), "sig": signature, "charged": str(charged),
                                              "holder": holder}).fetchone()
        if r is not None:
            self._held[id] = charged
            return HoldOutcome.OK, self._mutated(id, r)

        def run() -> tuple[HoldOutcome, Channel | None]:
            c = self._row(id)
            if c is None:
                return HoldOutcome.MISSING, None
            if c.held != 0 and c.hold_until > now:
                return HoldOutcome.BUSY, None
            if c.withdraw_at != 0:
                return HoldOutcome.WITHDRAWING, None
            if c.charged != charged:
                return HoldOutcome.MISMATCH, c
            if voucher_max > c.balance:
                return HoldOutcome.EXCEEDS, c
            self._set(id, held=amount, hold_until=now + lease_s, holder=holder)
            if voucher_max > c.signed_max:
                self._set(id, signed_max=voucher_max, signature=signature)
            return HoldOutcome.OK, self._row(id)
        return self._tx(run)

    async def renew(self, id: str, *, holder: str, until: float) -> bool:
        with _errors:
            return self._db.execute("UPDATE batch_channels SET hold_until = ? WHERE id = ? AND held != '0' AND holder = ?",
                                    (until, id, holder)).rowcount == 1

    async def commit(self, id: str, *, charge: int, holder: str = "", reply: str = "",
                     voucher: str = "") -> Channel | None:
        if reply:
            # Kept before the charge, each statement atomic: a crash between (or a hold found
            # lapsed) leaves a reply for a voucher not charged, which the voucher's resend (held
            # and served as new) replaces.
            with _errors:
                self._db.execute("INSERT OR REPLACE INTO batch_replies (id, voucher, reply, until) VALUES (?, ?, ?, ?)",
                                 (id, voucher, reply, time.time() + REPLY_TTL_MS / 1000))
        old = self._held.pop(id, None)
        if old is not None:
            with _errors:
                r = self._db.execute(_COMMIT_FAST, {"id": id, "old": str(old), "new": str(old + charge),
                                                    "holder": holder}).fetchone()
            if r is not None:
                return self._mutated(id, r)

        def run() -> Channel | None:
            c = self._row(id)
            if c is None or c.held == 0 or c.holder != holder:
                if reply:  # not charged: nothing is owed for it
                    self._db.execute("DELETE FROM batch_replies WHERE id = ? AND voucher = ?", (id, voucher))
                return None
            self._set(id, charged=c.charged + charge, held=0, hold_until=0.0, holder="")
            return self._row(id)
        return self._tx(run)

    async def delivered(self, id: str, *, voucher: str) -> None:
        with _errors:
            self._db.execute("DELETE FROM batch_replies WHERE id = ? AND voucher = ?", (id, voucher))

    @_errors
    async def owed_reply(self, id: str, *, voucher: str) -> str | None:
        r = self._db.execute("SELECT reply FROM batch_replies WHERE id = ? AND voucher = ? AND until > ?",
                             (id, voucher, time.time())).fetchone()
        return None if r is None or not r[0] else str(r[0])

    async def release(self, id: str, *, holder: str = "") -> None:
        self._held.pop(id, None)
        with _errors:
            self._db.execute("UPDATE batch_channels SET held = '0', hold_until = 0, holder = '' WHERE id = ? AND held != '0'"
                             " AND holder = ?", (id, holder))

    async def claimed(self, id: str, *, total: int) -> None:
        def run() -> None:
            c = self._row(id)
            if c is not None and total > c.total_claimed:
                self._set(id, total_claimed=total)
        self._tx(run)

    async def refunded(self, id: str, *, balance: int, refund_nonce: int) -> None:
        self._tx(lambda: self._set(id, balance=balance, refund_nonce=refund_nonce))

    @_errors
    async def get(self, id: str) -> Channel | None:
        return self._row(id)

    @_errors
    async def ids(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT id FROM batch_channels ORDER BY id").fetchall()]

    async def lease(self, name: str, owner: str, *, ttl_s: float, now: float) -> bool:
        def run() -> bool:
            r = self._db.execute("SELECT owner, until FROM batch_leases WHERE name = ?", (name,)).fetchone()
            if r is not None and r[0] != owner and r[1] > now:
                return False
            self._db.execute("INSERT OR REPLACE INTO batch_leases (name, owner, until) VALUES (?, ?, ?)",
                             (name, owner, now + ttl_s))
            return True
        return self._tx(run)

    async def journal(self, name: str, value: str | None) -> None:
        if value is None:
            self._tx(lambda: self._db.execute("DELETE FROM batch_journal WHERE name = ?", (name,)))
        else:
            self._tx(lambda: self._db.execute("INSERT OR REPLACE INTO batch_journal (name, value) VALUES (?, ?)",
                                              (name, value)))

    @_errors
    async def read_journal(self, name: str) -> str | None:
        r = self._db.execute("SELECT value FROM batch_journal WHERE name = ?", (name,)).fetchone()
        return None if r is None else str(r[0])

    @_errors
    async def ping(self) -> None:
        self._db.execute("SELECT 1")

    async def close(self) -> None:
        self._db.close()


def open_channels(url: str, *, prefix: str = "x402gw:") -> ChannelStore:
    """Beside the payment records, in a file of its own on SQLite (`….sqlite3` -> `…-channels.sqlite3`)."""
    def sqlite(path: str) -> ChannelStore:
        return SQLiteChannelStore(path if path == ":memory:" else path.replace(".sqlite3", "") + "-channels.sqlite3")

    return storage.open_url(url, sqlite=sqlite, redis=lambda r: RedisChannelStore(r, prefix=prefix))
