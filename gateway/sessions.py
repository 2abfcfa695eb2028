"""upto sessions: one signed Permit2 maximum covers many calls, settled once.

A session is opened by the first paid call and named by `X-Upto-Session`. Each later call holds
its worst-case cost against what remains of the signed cap (atomically, in the shared store, so
replicas cannot overspend it together), then turns the hold into the metered cost. A session is
settled exactly once for the sum, by whichever replica's reaper finds it due: idle, cap used up,
or close to the permit's deadline. It never serves past its cap or inside the deadline margin,
and a crashed replica loses nothing (the session lives in the store; another replica settles it).

The three ways OpenGradient's own code documents losing money are closed here: sessions stop
serving well before the permit deadline and are settled before it; a settlement counts only when
the facilitator reports it settled on-chain (a pending one is retried, never taken as paid); a
cost is held before the call, so nothing is ever refused after it was served.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from redis.typing import EncodableT, FieldT

import storage
from storage import BackendErrors, RedisClient, connect_sqlite, immediate, redis_from_url
from storage.lua import BIGNUM, hash_fields


class SessionState(StrEnum):
    OPEN = "open"
    SETTLING = "settling"
    SETTLED = "settled"
    FAILED = "failed"


class HoldOutcome(StrEnum):
    OK = "ok"
    MISSING = "missing"
    CLOSED = "closed"  # settling or settled
    EXPIRED = "expired"  # inside the deadline margin
    EXHAUSTED = "exhausted"  # the cap cannot cover this call's worst case


class SessionStoreUnavailableError(storage.StoreUnavailableError):
    pass


_errors = BackendErrors(SessionStoreUnavailableError)


@dataclass(slots=True)
class Session:
    id: str
    payer: str
    network: str
    asset: str
    cap: int
    accrued: int
    held: int
    calls: int
    deadline: float  # the permit's deadline (unix s)
    last_used: float
    state: SessionState
    payment: str  # {"payload", "requirements"} JSON of the opening payment
    route: str = ""
    per_call: int = 0  # the worst case one call may cost: below this remaining, the session is due
    tx: str = ""
    result: str = ""  # SettleResponse JSON once settled or failed


def new_session_id() -> str:
    return "ses_" + uuid.uuid4().hex


def exposure_key(payer: str, network: str, asset: str) -> str:
    """What a payer's unsettled exposure is counted under: its sessions on one asset."""
    return f"{payer.lower()}|{network}|{asset.lower()}"


class SessionStore(Protocol):
    async def open(self, session: Session, *, first_hold: int, due_at: float) -> None:
        """`session.last_used` is the caller's now: the store keeps the session until 7 days after
        its deadline, counted from that now (never from the store's own clock)."""
        ...

    async def hold(self, id: str, amount: int, *, now: float, serve_until: float, due_at: float) -> HoldOutcome:
        """Reserve `amount` of what remains of the cap for one call, if the session may serve."""
        ...

    async def finish_call(self, id: str, held: int, charge: int, *, now: float, due_at: float) -> None: ...

    async def due(self, *, now: float, limit: int = 50) -> list[str]: ...

    async def claim_settlement(self, id: str, *, now: float, force: bool, lease_s: float) -> Session | None:
        """OPEN (or SETTLING with an expired lease) -> SETTLING for this caller. Not while calls
        are in flight unless `force` (the deadline is near)."""
        ...

    async def finish_settlement(self, id: str, *, state: SessionState, tx: str, result: str, retry_at: float | None) -> None:
        ...

    async def reschedule(self, id: str, due_at: float) -> None: ...

    async def drain(self, id: str, *, now: float) -> bool:
        """OPEN -> SETTLING, due now: no new call is served, and the reaper settles it as soon
        as the calls in flight end (its funds no longer cover it). False if it was not open."""
        ...

    async def open_ids(self, *, now: float, limit: int = 10_000) -> list[str]:
        """Sessions not settled yet (open or settling), for the funds watch."""
        ...

    async def expose(self, key: str, id: str, delta: int, *, limit: int | None) -> bool:
        """Add `delta` (may be negative) to session `id`'s unsettled exposure under `key` (one
        payer and asset: `exposure_key`). An increase that would take the key's total over `limit`
        writes nothing and returns False; a decrease always applies."""
        ...

    async def unexpose(self, key: str, id: str) -> None:
        """The session is settled (or failed): it exposes nothing any more."""
        ...

    async def exposure(self, key: str) -> dict[str, int]: ...

    async def get(self, id: str) -> Session | None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------------------------
# Redis: a hash per session, a sorted set of due times. Amounts use storage's exact bignum Lua.

_KEEP_AFTER_DEADLINE_S = 7 * 86400

_HOLD = BIGNUM + """
local s = KEYS[1]
local st = redis.call('HGET', s, 'state')
if not st then return 'missing' end
if st ~= 'open' then return 'closed' end
if tonumber(ARGV[2]) > tonumber(ARGV[3]) then return 'expired' end
local used = add(redis.call('HGET', s, 'accrued'), redis.call('HGET', s, 'held'))
if cmp(add(used, ARGV[1]), redis.call('HGET', s, 'cap')) > 0 then return 'exhausted' end
redis.call('HSET', s, 'held', add(redis.call('HGET', s, 'held'), ARGV[1]), 'last_used', ARGV[2])
return 'ok'
"""

_FINISH_CALL = BIGNUM + """
local s = KEYS[1]
if not redis.call('HGET', s, 'state') then return 0 end
redis.call('HSET', s, 'held', sub(redis.call('HGET', s, 'held'), ARGV[1]),
           'accrued', add(redis.call('HGET', s, 'accrued'), ARGV[2]), 'last_used', ARGV[3],
           'calls', tonumber(redis.call('HGET', s, 'calls')) + 1)
if redis.call('HGET', s, 'state') == 'open' then return 2 end
return 1
"""

_CLAIM = """
local s = KEYS[1]
local st = redis.call('HGET', s, 'state')
local now = tonumber(ARGV[1])
if st == 'settling' and tonumber(redis.call('HGET', s, 'lease') or '0') < now then st = 'open' end
if st ~= 'open' then return nil end
if ARGV[2] ~= '1' and redis.call('HGET', s, 'held') ~= '0' then return nil end
redis.call('HSET', s, 'state', 'settling', 'lease', now + tonumber(ARGV[3]))
return redis.call('HGETALL', s)
"""


_DRAIN = """
local s = KEYS[1]
if redis.call('HGET', s, 'state') ~= 'open' then return 0 end
redis.call('HSET', s, 'state', 'settling', 'lease', '0')
return 1
"""

_EXPOSURE_TTL_S = 8 * 86400  # past any session's life (max_timeout_s <= 1 day, kept 7 days after)

# ARGV: id, |delta|, 1 if negative, limit ('' for none)
_EXPOSE = BIGNUM + """
local h, id, delta, neg, limit = KEYS[1], ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
if not neg and limit ~= '' then
  local total = delta
  for _, v in ipairs(redis.call('HVALS', h)) do total = add(total, v) end
  if cmp(total, limit) > 0 then return 0 end
end
local cur = redis.call('HGET', h, id) or '0'
local v
if neg then v = sub(cur, delta) else v = add(cur, delta) end
if v == '0' then redis.call('HDEL', h, id) else redis.call('HSET', h, id, v) end
redis.call('EXPIRE', h, TTL)
return 1
""".replace("TTL", str(_EXPOSURE_TTL_S))


def _session_from(fields: dict[str, str]) -> Session:
    return Session(
        id=fields["id"], payer=fields["payer"], network=fields["network"], asset=fields["asset"], cap=int(fields["cap"]),
        accrued=int(fields["accrued"]), held=int(fields["held"]), calls=int(fields["calls"]),
        deadline=float(fields["deadline"]), last_used=float(fields["last_used"]), state=SessionState(fields["state"]),
        payment=fields["payment"], route=fields.get("route", ""), tx=fields.get("tx", ""), result=fields.get("result", ""),
        per_call=int(fields.get("per_call", "0")),
    )  # fmt: skip


class RedisSessionStore:
    """Scripts touch one session key each (a Cluster slot of its own); the due index is a sorted
    set written after them. A lost index write only delays a settlement to the next due time: the
    reaper reads the session's real state before it acts."""

    def __init__(self, client: RedisClient, *, prefix: str = "x402gw:") -> None:
        self._r = client
        self._p = prefix
        self._due = f"{prefix}sessions:due"
        self._hold = client.register_script(_HOLD)
        self._finish = client.register_script(_FINISH_CALL)
        self._claim = client.register_script(_CLAIM)
        self._drain = client.register_script(_DRAIN)
        self._expose = client.register_script(_EXPOSE)
        self._open = f"{prefix}sessions:open"  # id -> permit deadline, until settled or failed

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "x402gw:") -> RedisSessionStore:
        return cls(redis_from_url(url), prefix=prefix)

    def _k(self, id: str) -> str:
        return f"{self._p}session:{{{id}}}"

    @_errors
    async def _call(self, coro):
        return await coro

    async def open(self, session: Session, *, first_hold: int, due_at: float) -> None:
        fields: dict[FieldT, EncodableT] = {
            "id": session.id, "payer": session.payer, "network": session.network, "asset": session.asset,
            "cap": str(session.cap), "accrued": "0", "held": str(first_hold), "calls": "0",
            "deadline": repr(session.deadline), "last_used": repr(session.last_used), "state": "open",
            "payment": session.payment, "route": session.route, "per_call": str(session.per_call),
        }  # fmt: skip
        await self._call(self._r.hset(self._k(session.id), mapping=fields))
        # A TTL relative to the caller's now: an absolute EXPIREAT would be read on Redis's clock.
        ttl_s = int(max(0.0, session.deadline - session.last_used)) + _KEEP_AFTER_DEADLINE_S
        await self._call(self._r.expire(self._k(session.id), ttl_s))
        await self._call(self._r.zadd(self._due, {session.id: due_at}))
        await self._call(self._r.zadd(self._open, {session.id: session.deadline}))

    async def hold(self, id: str, amount: int, *, now: float, serve_until: float, due_at: float) -> HoldOutcome:
        res = HoldOutcome(await self._call(self._hold(keys=[self._k(id)], args=[str(amount), repr(now), repr(serve_until)])))
        if res == HoldOutcome.OK:
            await self._call(self._r.zadd(self._due, {id: due_at}))
        return res

    async def finish_call(self, id: str, held: int, charge: int, *, now: float, due_at: float) -> None:
        if await self._call(self._finish(keys=[self._k(id)], args=[str(held), str(charge), repr(now)])) == 2:
            await self._call(self._r.zadd(self._due, {id: due_at}))

    async def due(self, *, now: float, limit: int = 50) -> list[str]:
        return list(await self._call(self._r.zrangebyscore(self._due, "-inf", now, start=0, num=limit)))

    async def claim_settlement(self, id: str, *, now: float, force: bool, lease_s: float) -> Session | None:
        res = await self._call(self._claim(keys=[self._k(id)], args=[repr(now), "1" if force else "0", repr(lease_s)]))
        if not res:
            return None
        return _session_from(hash_fields(res))

    async def finish_settlement(self, id: str, *, state: SessionState, tx: str, result: str, retry_at: float | None) -> None:
        await self._call(self._r.hset(self._k(id), mapping={"state": state.value, "tx": tx, "result": result}))
        if retry_at is None:
            await self._call(self._r.zrem(self._due, id))
            if state in (SessionState.SETTLED, SessionState.FAILED):
                await self._call(self._r.zrem(self._open, id))
        else:
            await self._call(self._r.zadd(self._due, {id: retry_at}))

    async def reschedule(self, id: str, due_at: float) -> None:
        await self._call(self._r.zadd(self._due, {id: due_at}))

    async def drain(self, id: str, *, now: float) -> bool:
        if not await self._call(self._drain(keys=[self._k(id)], args=[])):
            return False
        await self.reschedule(id, now)
        return True

    async def open_ids(self, *, now: float, limit: int = 10_000) -> list[str]:
        # an id whose session outlived its store TTL (deadline + 7 days) is only an index entry
        await self._call(self._r.zremrangebyscore(self._open, "-inf", now - _KEEP_AFTER_DEADLINE_S))
        return list(await self._call(self._r.zrange(self._open, 0, limit - 1)))

    def _ek(self, key: str) -> str:
        return f"{self._p}exposure:{{{key}}}"

    async def expose(self, key: str, id: str, delta: int, *, limit: int | None) -> bool:
        args = [id, str(abs(delta)), "1" if delta < 0 else "0", "" if limit is None else str(limit)]
        return bool(await self._call(self._expose(keys=[self._ek(key)], args=args)))

    async def unexpose(self, key: str, id: str) -> None:
        await self._call(self._r.hdel(self._ek(key), id))

    async def exposure(self, key: str) -> dict[str, int]:
        return {k: int(v) for k, v in (await self._call(self._r.hgetall(self._ek(key)))).items()}

    async def get(self, id: str) -> Session | None:
        fields = await self._call(self._r.hgetall(self._k(id)))
        return _session_from(fields) if fields else None

    @_errors
    async def ping(self) -> None:
        await self._r.ping()

    async def close(self) -> None:
        await self._r.aclose()


# --------------------------------------------------------------------------------------------
# SQLite: the embedded default, one transaction per operation, amounts as TEXT.

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, payer TEXT, network TEXT, asset TEXT, cap TEXT, accrued TEXT, held TEXT, calls INTEGER,
    deadline REAL, last_used REAL, state TEXT, payment TEXT, route TEXT, tx TEXT DEFAULT '', result TEXT DEFAULT '',
    per_call TEXT DEFAULT '0', lease REAL DEFAULT 0, due_at REAL);
CREATE INDEX IF NOT EXISTS sessions_due ON sessions (due_at);
CREATE TABLE IF NOT EXISTS exposure (key TEXT, id TEXT, amount TEXT NOT NULL, PRIMARY KEY (key, id));
"""
_COLS = ("id, payer, network, asset, cap, accrued, held, calls, deadline, last_used, state, payment, route, tx, result,"
         " per_call")


class SQLiteSessionStore:
    def __init__(self, path: str) -> None:
        with _errors:
            self._db = connect_sqlite(path, _SCHEMA)

    def _row(self, id: str) -> Session | None:
        r = self._db.execute(f"SELECT {_COLS} FROM sessions WHERE id = ?", (id,)).fetchone()
        if r is None:
            return None
        return Session(id=r[0], payer=r[1], network=r[2], asset=r[3], cap=int(r[4]), accrued=int(r[5]), held=int(r[6]),
                       calls=r[7], deadline=r[8], last_used=r[9], state=SessionState(r[10]), payment=r[11],
                       route=r[12] or "", tx=r[13] or "", result=r[14] or "", per_call=int(r[15] or 0))

    def _tx(self, fn):
        with immediate(self._db, SessionStoreUnavailableError):
            return fn()

    async def open(self, session: Session, *, first_hold: int, due_at: float) -> None:
        self._tx(lambda: self._db.execute(
            f"INSERT INTO sessions ({_COLS}, due_at) VALUES (?, ?, ?, ?, ?, '0', ?, 0, ?, ?, 'open', ?, ?, '', '', ?, ?)",
            (session.id, session.payer, session.network, session.asset, str(session.cap), str(first_hold),
             session.deadline, session.last_used, session.payment, session.route, str(session.per_call), due_at)))

    async def hold(self, id: str, amount: int, *, now: float, serve_until: float, due_at: float) -> HoldOutcome:
        def run() -> HoldOutcome:
            s = self._row(id)
            if s is None:
                return HoldOutcome.MISSING
            if s.state != SessionState.OPEN:
                return HoldOutcome.CLOSED
            if now > serve_until:
                return HoldOutcome.EXPIRED
            if s.accrued + s.held + amount > s.cap:
                return HoldOutcome.EXHAUSTED
            self._db.execute("UPDATE sessions SET held = ?, last_used = ?, due_at = ? WHERE id = ?",
                             (str(s.held + amount), now, due_at, id))
            return HoldOutcome.OK
        return self._tx(run)

    async def finish_call(self, id: str, held: int, charge: int, *, now: float, due_at: float) -> None:
        def run() -> None:
            s = self._row(id)
            if s is None:
                return
            self._db.execute(
                "UPDATE sessions SET held = ?, accrued = ?, calls = calls + 1, last_used = ?,"
                " due_at = CASE WHEN state = 'open' THEN ? ELSE due_at END WHERE id = ?",
                (str(max(0, s.held - held)), str(s.accrued + charge), now, due_at, id))
        self._tx(run)

    @_errors
    async def due(self, *, now: float, limit: int = 50) -> list[str]:
        rows = self._db.execute("SELECT id FROM sessions WHERE due_at IS NOT NULL AND due_at <= ? ORDER BY due_at LIMIT ?",
                                (now, limit)).fetchall()
        return [r[0] for r in rows]

    async def claim_settlement(self, id: str, *, now: float, force: bool, lease_s: float) -> Session | None:
        def run() -> Session | None:
            r = self._db.execute("SELECT state, lease, held FROM sessions WHERE id = ?", (id,)).fetchone()
            if r is None:
                return None
            state, lease, held = r
            if not (state == "open" or (state == "settling" and lease < now)):
                return None
            if not force and held != "0":
                return None
            self._db.execute("UPDATE sessions SET state = 'settling', lease = ? WHERE id = ?", (now + lease_s, id))
            return self._row(id)
        return self._tx(run)

    async def finish_settlement(self, id: str, *, state: SessionState, tx: str, result: str, retry_at: float | None) -> None:
        self._tx(lambda: self._db.execute("UPDATE sessions SET state = ?, tx = ?, result = ?, due_at = ? WHERE id = ?",
                                          (state.value, tx, result, retry_at, id)))

    async def reschedule(self, id: str, due_at: float) -> None:
        self._tx(lambda: self._db.execute("UPDATE sessions SET due_at = ? WHERE id = ?", (due_at, id)))

    async def drain(self, id: str, *, now: float) -> bool:
        return bool(self._tx(lambda: self._db.execute(
            "UPDATE sessions SET state = 'settling', lease = 0, due_at = ? WHERE id = ? AND state = 'open'",
            (now, id)).rowcount))

    @_errors
    async def open_ids(self, *, now: float, limit: int = 10_000) -> list[str]:
        rows = self._db.execute("SELECT id FROM sessions WHERE state IN ('open', 'settling') LIMIT ?", (limit,))
        return [r[0] for r in rows.fetchall()]

    async def expose(self, key: str, id: str, delta: int, *, limit: int | None) -> bool:
        def run() -> bool:
            rows = dict(self._db.execute("SELECT id, amount FROM exposure WHERE key = ?", (key,)).fetchall())
            if delta > 0 and limit is not None and sum(int(a) for a in rows.values()) + delta > limit:
                return False
            left = max(0, int(rows.get(id, "0")) + delta)
            if left:
                self._db.execute("INSERT OR REPLACE INTO exposure (key, id, amount) VALUES (?, ?, ?)", (key, id, str(left)))
            else:
                self._db.execute("DELETE FROM exposure WHERE key = ? AND id = ?", (key, id))
            return True
        return bool(self._tx(run))

    async def unexpose(self, key: str, id: str) -> None:
        self._tx(lambda: self._db.execute("DELETE FROM exposure WHERE key = ? AND id = ?", (key, id)))

    @_errors
    async def exposure(self, key: str) -> dict[str, int]:
        return {i: int(a) for i, a in self._db.execute("SELECT id, amount FROM exposure WHERE key = ?", (key,))}

    @_errors
    async def get(self, id: str) -> Session | None:
        return self._row(id)

    @_errors
    async def ping(self) -> None:
        self._db.execute("SELECT 1")

    async def close(self) -> None:
        self._db.close()


def open_sessions(url: str, *, prefix: str = "x402gw:") -> SessionStore:
    """Beside the payment records, in a file of its own on SQLite (`….sqlite3` -> `…-sessions.sqlite3`)."""
    def sqlite(path: str) -> SessionStore:
        return SQLiteSessionStore(_own_file(path))

    return storage.open_url(url, sqlite=sqlite, redis=lambda r: RedisSessionStore(r, prefix=prefix))


def _own_file(path: str) -> str:
    return path if path == ":memory:" else path.replace(".sqlite3", "") + "-sessions.sqlite3"
