"""Budgets on SQLite: the embedded default. Each operation is one BEGIN IMMEDIATE transaction, so
it is atomic across processes sharing the file. Amounts are TEXT (SQLite integers are int64;
18-decimal tokens overflow them) and summed with Python's exact integers.

A scope's outstanding holds are kept as a running total (`held`: the total and the earliest
expiry among them), so a reserve reads one row instead of summing every hold of a group; holds
that expired are swept by the (scope, expires) index only once that earliest expiry has passed,
each one once. Every statement that adds or drops a hold moves the total with it. A file written
before the running totals existed gets its totals on first use (the holds summed once); processes
of an older version must not share a file with newer ones (their holds would not move the totals).
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from budgets.models import BudgetUsage, LedgerEntry, Policy, RateLimit, Refusal, Scope, Window
from budgets.store import BudgetStore, BudgetStoreUnavailableError, Check, RateState
from storage import BackendErrors, connect_sqlite, immediate, open_url

_errors = BackendErrors(BudgetStoreUnavailableError)
PINNED = 1e300  # the expiry of a pinned hold: never

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (scope TEXT, wkey TEXT, bucket INTEGER, amount TEXT NOT NULL, expires REAL NOT NULL,
                                     PRIMARY KEY (scope, wkey, bucket));
CREATE INDEX IF NOT EXISTS counters_expires ON counters (expires);  -- commit prunes expired counters
CREATE TABLE IF NOT EXISTS holds (id TEXT, scope TEXT, amount TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (id, scope));
CREATE INDEX IF NOT EXISTS holds_scope ON holds (scope, expires);
CREATE TABLE IF NOT EXISTS held (scope TEXT PRIMARY KEY, total TEXT NOT NULL, first REAL);
CREATE TABLE IF NOT EXISTS rate (scope TEXT PRIMARY KEY, tokens REAL NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS done (id TEXT PRIMARY KEY, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS ledger (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, agent TEXT NOT NULL,
                                   grp TEXT, route TEXT NOT NULL, model TEXT, amount TEXT NOT NULL, asset TEXT NOT NULL,
                                   network TEXT NOT NULL, tx_hash TEXT NOT NULL, request_id TEXT NOT NULL, extra TEXT);
CREATE INDEX IF NOT EXISTS ledger_agent_ts ON ledger (agent, ts);
CREATE INDEX IF NOT EXISTS ledger_ts ON ledger (ts);
CREATE TABLE IF NOT EXISTS policies (key TEXT PRIMARY KEY, kind TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL);
"""


class SQLiteBudgetStore:
    def __init__(self, path: str) -> None:
        with _errors:
            self._db = connect_sqlite(path, _SCHEMA)

    # -- helpers (inside a transaction) ---------------------------------------------------------

    def _reserved(self, scope: Scope, now: float) -> int:
        """The scope's outstanding holds, after sweeping the expired ones (O(1) unless some expired)."""
        row = self._db.execute("SELECT total, first FROM held WHERE scope = ?", (scope.name,)).fetchone()
        if row is None:  # first use of this scope (or of a file from before the running totals)
            self._db.execute("DELETE FROM holds WHERE scope = ? AND expires <= ?", (scope.name, now))
            total = sum(int(a) for (a,) in self._db.execute("SELECT amount FROM holds WHERE scope = ?", (scope.name,)))
            self._db.execute("INSERT INTO held (scope, total, first) VALUES (?, ?, (SELECT MIN(expires) FROM holds"
                             " WHERE scope = ?))", (scope.name, str(total), scope.name))
            return total
        total, first = int(row[0]), row[1]
        if first is not None and first <= now:
            gone = self._db.execute("DELETE FROM holds WHERE scope = ? AND expires <= ? RETURNING amount",
                                    (scope.name, now)).fetchall()
            total -= sum(int(a) for (a,) in gone)
            self._db.execute("UPDATE held SET total = ?, first = (SELECT MIN(expires) FROM holds WHERE scope = ?)"
                             " WHERE scope = ?", (str(total), scope.name, scope.name))
        return total

    def _add_hold(self, scope: Scope, reservation_id: str, amount: int, expires: float, held: int) -> None:
        """After `_reserved(scope)` (which returned `held`) in the same transaction."""
        old = self._db.execute("SELECT amount FROM holds WHERE id = ? AND scope = ?", (reservation_id, scope.name)).fetchone()
        self._db.execute("INSERT OR REPLACE INTO holds (id, scope, amount, expires) VALUES (?, ?, ?, ?)",
                         (reservation_id, scope.name, str(amount), expires))
        total = held + amount - (int(old[0]) if old else 0)  # the same id again: replaced
        self._db.execute("UPDATE held SET total = ?, first = min(coalesce(first, ?), ?) WHERE scope = ?",
                         (str(total), expires, expires, scope.name))

    def _drop_hold(self, scope: Scope, reservation_id: str) -> None:
        gone = self._db.execute("DELETE FROM holds WHERE id = ? AND scope = ? RETURNING amount",
                                (reservation_id, scope.name)).fetchone()
        if gone is None:
            return
        row = self._db.execute("SELECT total FROM held WHERE scope = ?", (scope.name,)).fetchone()
        if row is None:  # a hold from before the running totals: the total is built (without it) on first use
            return
        # `first` may now be earlier than any hold left: the next sweep finds nothing and moves it on
        self._db.execute("UPDATE held SET total = ? WHERE scope = ?", (str(int(row[0]) - int(gone[0])), scope.name))

    def _spent(self, scope: Scope, windows: tuple[Window, ...]) -> list[int]:
        """Each window's spend, from one query over the scope's counters. A rolling window is its
        current bucket and the 60 before it: spend is never forgiven early (older buckets are
        dropped by commit once they expire)."""
        if not windows:
            return []
        keys = sorted({w.key for w in windows})
        rows = self._db.execute(f"SELECT wkey, bucket, amount FROM counters WHERE scope = ? AND wkey IN"
                                f" ({', '.join('?' * len(keys))})", (scope.name, *keys)).fetchall()
        out = []
        for w in windows:
            if w.rolling:
                out.append(sum(int(a) for k, b, a in rows if k == w.key and b >= w.bucket - 60))
            else:
                out.append(sum(int(a) for k, b, a in rows if k == w.key and b == 0))
        return out

    def _bucket(self, scope: Scope, rate: RateLimit, now: float, take: bool) -> RateState:
        cap = rate.burst or rate.per_minute
        per_s = rate.per_minute / 60.0
        row = self._db.execute("SELECT tokens, ts FROM rate WHERE scope = ?", (scope.name,)).fetchone()
        tokens = cap if row is None else min(cap, row[0] + max(0.0, now - row[1]) * per_s)
        if tokens < 1:
            return RateState(False, (1 - tokens) / per_s)
        if take:
            self._db.execute("INSERT OR REPLACE INTO rate (scope, tokens, ts) VALUES (?, ?, ?)", (scope.name, tokens - 1, now))
        return RateState(True, 0.0)

    def _tx(self):
        return immediate(self._db, BudgetStoreUnavailableError)

    # -- the protocol ----------------------------------------------------------------------------

    async def reserve(self, checks: list[Check], amount: int, reservation_id: str, *, now: float,
                      hold_s: float) -> Refusal | None:
        with self._tx():
            held_now: list[int] = []
            for c in checks:
                held = self._reserved(c.scope, now)
                held_now.append(held)
                for w, spent in zip(c.windows, self._spent(c.scope, c.windows), strict=True):
                    used = spent + held
                    if used + amount > w.limit:
                        kind = "group" if c.scope.kind == "group" else "agent"
                        return Refusal("budget_exceeded",
                                       f"{kind} {w.period}{' (rolling)' if w.rolling else ''} budget exceeded",
                                       scope=c.scope.name, remaining=max(0, w.limit - used), resets_at=w.resets_at)
            for c in checks:
                if c.rate is not None:
                    state = self._bucket(c.scope, c.rate, now, False)
                    if not state.allowed:
                        wait = max(1, int(state.retry_after_s + 0.999))
                        return Refusal("rate_limited", "rate limit reached", status=429, scope=c.scope.name,
                                       retry_after_s=wait, resets_at=now + wait)
            for c, held in zip(checks, held_now, strict=True):
                if c.rate is not None:
                    self._bucket(c.scope, c.rate, now, True)
                self._add_hold(c.scope, reservation_id, amount, now + hold_s, held)
        return None

    async def commit(self, checks: list[Check], reservation_id: str, amount: int, entry: LedgerEntry,
                     *, now: float, once: str | None = None) -> bool:
        with self._tx():
            if self._db.execute("INSERT OR IGNORE INTO done (id, ts) VALUES (?, ?)",
                                (once or reservation_id, now)).rowcount == 0:
                for c in checks:
                    self._drop_hold(c.scope, reservation_id)
                return False
            for c in checks:
                self._drop_hold(c.scope, reservation_id)
                if not c.windows:
                    continue
                # one read of the scope's counters and one batch of writes, not two statements a window
                keys = sorted({w.key for w in c.windows})
                have = {(k, b): int(a) for k, b, a in self._db.execute(
                    f"SELECT wkey, bucket, amount FROM counters WHERE scope = ? AND wkey IN ({', '.join('?' * len(keys))})",
                    (c.scope.name, *keys))}
                self._db.executemany(
                    "INSERT OR REPLACE INTO counters (scope, wkey, bucket, amount, expires) VALUES (?, ?, ?, ?, ?)",
                    [(c.scope.name, w.key, w.bucket, str(have.get((w.key, w.bucket), 0) + amount), now + w.ttl_s)
                     for w in c.windows])
            self._db.execute(
                "INSERT INTO ledger (ts, agent, grp, route, model, amount, asset, network, tx_hash, request_id, extra)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.ts, entry.agent, entry.group, entry.route, entry.model, str(entry.amount), entry.asset,
                 entry.network, entry.tx_hash, entry.request_id, orjson.dumps(entry.extra).decode() if entry.extra else None),
            )
            self._db.execute("DELETE FROM counters WHERE expires < ?", (now,))
        return True

    async def release(self, checks: list[Check], reservation_id: str, *, now: float) -> None:
        with self._tx():
            for c in checks:
                self._drop_hold(c.scope, reservation_id)

    async def pin(self, checks: list[Check], reservation_id: str, amount: int, *, now: float) -> bool:
        with self._tx():
            for c in checks:
                held = self._db.execute("SELECT 1 FROM holds WHERE id = ? AND scope = ? AND expires > ?",
                                        (reservation_id, c.scope.name, now)).fetchone()
                if held is None:
                    return False
            for c in checks:
                self._db.execute("UPDATE holds SET expires = ? WHERE id = ? AND scope = ?",
                                 (PINNED, reservation_id, c.scope.name))
            return True

    async def rate_peek(self, scope: Scope, rate: RateLimit, *, now: float) -> RateState:
        with self._tx():
            return self._bucket(scope, rate, now, False)

    async def rate_take(self, scope: Scope, rate: RateLimit, *, now: float) -> RateState:
        with self._tx():
            return self._bucket(scope, rate, now, True)

    async def usage(self, check: Check, *, now: float) -> list[BudgetUsage]:
        with self._tx():
            held = self._reserved(check.scope, now)
            out = []
            for w, spent in zip(check.windows, self._spent(check.scope, check.windows), strict=True):
                out.append(BudgetUsage(scope=check.scope.name, period=w.period, rolling=w.rolling, limit=w.limit,
                                       spent=spent, reserved=held, remaining=max(0, w.limit - spent - held),
                                       resets_at=w.resets_at))
            return out

    async def move_spend(self, old: Scope, new: Scope, windows: tuple[Window, ...]) -> None:
        """Rows are keyed by the scope's name, which a group change does not alter."""
        if old.name != new.name:
            raise ValueError("move_spend moves a scope to a new tag, not to another scope")

    @staticmethod
    def _pk(kind: str, id: str, network: str, asset: str) -> str:
        return f"{kind}:{id.lower() if kind == 'agent' else id}:{network}:{asset.lower()}"

    @_errors
    async def get_policy(self, kind: str, id: str, network: str, asset: str) -> Policy | None:
        row = self._db.execute("SELECT body FROM policies WHERE key = ?", (self._pk(kind, id, network, asset),)).fetchone()
        return Policy.model_validate_json(row[0]) if row else None

    async def put_policy(self, kind: str, id: str, policy: Policy) -> None:
        with self._tx():
            self._db.execute("INSERT OR REPLACE INTO policies (key, kind, id, body) VALUES (?, ?, ?, ?)",
                             (self._pk(kind, id, policy.network, policy.asset), kind,
                              id.lower() if kind == "agent" else id, policy.model_dump_json()))

    async def delete_policy(self, kind: str, id: str, network: str, asset: str) -> bool:
        with self._tx():
            return self._db.execute("DELETE FROM policies WHERE key = ?",
                                    (self._pk(kind, id, network, asset),)).rowcount == 1

    @_errors
    async def list_policies(self) -> list[tuple[str, str, Policy]]:
        rows = self._db.execute("SELECT kind, id, body FROM policies ORDER BY key").fetchall()
        return [(kind, id, Policy.model_validate_json(body)) for kind, id, body in rows]

    @_errors
    async def ledger(self, *, agent: str | None, start: float, end: float, limit: int) -> list[LedgerEntry]:
        sql = ("SELECT ts, agent, grp, route, model, amount, asset, network, tx_hash, request_id, extra FROM ledger"
               " WHERE ts >= ? AND ts <= ?")
        args: list = [start, end]
        if agent is not None:
            sql += " AND lower(agent) = ?"
            args.append(agent.lower())
        sql += " ORDER BY ts, seq LIMIT ?"
        args.append(limit)
        rows = self._db.execute(sql, args).fetchall()
        return [
            LedgerEntry(ts=r[0], agent=r[1], group=r[2], route=r[3], model=r[4], amount=int(r[5]), asset=r[6],
                        network=r[7], tx_hash=r[8], request_id=r[9], extra=orjson.loads(r[10]) if r[10] else {})
            for r in rows
        ]

    @_errors
    async def ping(self) -> None:
        self._db.execute("SELECT 1")

    async def close(self) -> None:
        self._db.close()


def open_budget_store(url: str, *, prefix: str = "x402b:") -> BudgetStore:
    from budgets.redis_store import RedisBudgetStore

    sqlite: Callable[[str], BudgetStore] = SQLiteBudgetStore  # checks that it is one
    return open_url(url, sqlite=sqlite, redis=lambda r: RedisBudgetStore(r, prefix=prefix), what="budget store")
