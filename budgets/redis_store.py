"""Budgets on Redis: one Lua script per atomic operation (budgets/lua.py), on a single Redis,
behind Sentinel, or on Cluster. A paid call costs two round trips: reserve (with the rate limit)
and commit (with the ledger entry).

Key layout: every key a script touches carries the hash tag of the agent's group (or of the
agent itself when it has no group), `{prefix}b:{<tag>}:…`, so the agent's budget, its group's
budget, their reservations, the rate bucket and the ledger live in one slot and change together.
The one key outside it, the index of tags that have a ledger, is written once per tag and
process (a set only grows, so knowing a tag is in it is never stale).
"""

from __future__ import annotations

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from budgets import lua
from budgets.models import BudgetUsage, LedgerEntry, Policy, RateLimit, Refusal, Scope, Window
from budgets.store import BudgetStoreUnavailableError, Check, RateState
from storage import BackendErrors, redis_from_url

_errors = BackendErrors(BudgetStoreUnavailableError)


class _Keys:
    """Collects KEYS for a script and hands out their 1-based indexes."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def add(self, key: str) -> int:
        self.keys.append(key)
        return len(self.keys)


def _window(w: Window, commit: bool) -> dict:
    """A window as the scripts read it: `k` the calendar window's key or the rolling period's
    (its buckets are the fields `k:<bucket>`), `p` the period's name in the cleanup markers."""
    out = {"k": w.key, "p": w.key if w.rolling else w.period, "rolling": w.rolling, "bucket": w.bucket}
    if not commit:
        out["limit"] = str(w.limit)
    return out


def _entry_json(entry: LedgerEntry) -> str:
    return orjson.dumps({
        "ts": entry.ts, "agent": entry.agent, "group": entry.group, "route": entry.route, "model": entry.model,
        "amount": str(entry.amount), "asset": entry.asset, "network": entry.network, "tx_hash": entry.tx_hash,
        "request_id": entry.request_id, **({"extra": entry.extra} if entry.extra else {}),
    }).decode()  # fmt: skip


def entry_from(doc: dict) -> LedgerEntry:
    return LedgerEntry(ts=float(doc["ts"]), agent=doc["agent"], group=doc.get("group"), route=doc["route"],
                       model=doc.get("model"), amount=int(doc["amount"]), asset=doc["asset"], network=doc["network"],
                       tx_hash=doc["tx_hash"], request_id=doc["request_id"], extra=doc.get("extra") or {})


class RedisBudgetStore:
    def __init__(self, client: aioredis.Redis, *, prefix: str = "x402b:") -> None:
        self._r = client
        self._p = prefix
        self._reserve = client.register_script(lua.RESERVE)
        self._commit = client.register_script(lua.COMMIT)
        self._release = client.register_script(lua.RELEASE)
        self._rate = client.register_script(lua.RATE)
        self._usage = client.register_script(lua.USAGE)
        self._indexed: set[str] = set()  # tags known to be in the ledger's index

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "x402b:") -> "RedisBudgetStore":
        return cls(redis_from_url(url), prefix=prefix)

    def _k(self, scope: Scope, suffix: str) -> str:
        return f"{self._p}b:{{{scope.tag}}}:{scope.name}:{suffix}"

    def _spec(self, checks: list[Check], keys: _Keys, *, commit: bool = False) -> list[dict]:
        out = []
        for c in checks:
            item: dict = {"z": keys.add(self._k(c.scope, "rz")), "h": keys.add(self._k(c.scope, "rh")),
                          "t": keys.add(self._k(c.scope, "rt")), "c": keys.add(self._k(c.scope, "c")),
                          "windows": [_window(w, commit) for w in c.windows]}
            if commit:
                item["ttl"] = max((w.ttl_s for w in c.windows), default=0)
            if c.rate is not None:
                item["rate"] = {"k": keys.add(self._k(c.scope, "rate")), "per_minute": c.rate.per_minute,
                                "burst": c.rate.burst}
            out.append(item)
        return out

    @_errors
    async def _run(self, script, keys: list[str], args: list[str]):
        return await script(keys=keys, args=args)

    async def reserve(self, checks: list[Check], amount: int, reservation_id: str, *, now: float,
                      hold_s: float) -> Refusal | None:
        keys = _Keys()
        spec = {"now": now, "amount": str(amount), "id": reservation_id, "exp": now + hold_s,
                "keep": int(hold_s) + 3600, "checks": self._spec(checks, keys)}
        res = await self._run(self._reserve, keys.keys, [orjson.dumps(spec).decode()])
        if res[0] == "ok":
            return None
        check = checks[int(res[1]) - 1]
        if res[0] == "rate":
            wait = max(1, int(res[3]))
            return Refusal("rate_limited", "rate limit reached", status=429, scope=check.scope.name,
                           retry_after_s=wait, resets_at=now + wait)
        window = check.windows[int(res[2]) - 1]
        kind = "group" if check.scope.kind == "group" else "agent"
        return Refusal("budget_exceeded", f"{kind} {window.period}{' (rolling)' if window.rolling else ''} budget exceeded",
                       scope=check.scope.name, remaining=int(res[3]), resets_at=window.resets_at)

    async def commit(self, checks: list[Check], reservation_id: str, amount: int, entry: LedgerEntry,
                     *, now: float) -> bool:
        keys = _Keys()
        tag_scope = checks[0].scope
        spec = {"now": now, "amount": str(amount), "id": reservation_id,
                "checks": self._spec(checks, keys, commit=True),
                "done": keys.add(self._k(tag_scope, f"done:{reservation_id}")),
                "ledger": keys.add(f"{self._p}b:{{{tag_scope.tag}}}:ledger")}
        res = await self._run(self._commit, keys.keys, [orjson.dumps(spec).decode(), _entry_json(entry)])
        if tag_scope.tag not in self._indexed:
            try:
                await self._r.sadd(f"{self._p}ledger:tags", tag_scope.tag)
            except RedisError:
                pass  # only an index: the entry itself is in the ledger already; the next commit retries
            else:
                if len(self._indexed) > 100_000:
                    self._indexed.clear()
                self._indexed.add(tag_scope.tag)
        return res == 1

    async def release(self, checks: list[Check], reservation_id: str) -> None:
        keys = _Keys()
        spec = {"id": reservation_id, "checks": self._spec(checks, keys)}
        await self._run(self._release, keys.keys, [orjson.dumps(spec).decode()])

    async def _bucket(self, scope: Scope, rate: RateLimit, now: float, take: bool) -> RateState:
        args = {"per_minute": rate.per_minute, "burst": rate.burst, "now": now, "take": take}
        ok, wait = await self._run(self._rate, [self._k(scope, "rate")], [orjson.dumps(args).decode()])
        return RateState(allowed=ok == 1, retry_after_s=float(wait))

    async def rate_peek(self, scope: Scope, rate: RateLimit, *, now: float) -> RateState:
        return await self._bucket(scope, rate, now, False)

    async def rate_take(self, scope: Scope, rate: RateLimit, *, now: float) -> RateState:
        return await self._bucket(scope, rate, now, True)

    async def usage(self, check: Check, *, now: float) -> list[BudgetUsage]:
        keys = _Keys()
        spec = {"now": now, "checks": self._spec([check], keys)}
        res = await self._run(self._usage, keys.keys, [orjson.dumps(spec).decode()])
        held = int(res[0])
        out = []
        for w, spent in zip(check.windows, res[1:]):
            used = int(spent)
            out.append(BudgetUsage(scope=check.scope.name, period=w.period, rolling=w.rolling, limit=w.limit,
                                   spent=used, reserved=held, remaining=max(0, w.limit - used - held),
                                   resets_at=w.resets_at))
        return out

    @_errors
    async def move_spend(self, old: Scope, new: Scope, windows: tuple[Window, ...]) -> None:
        """Every counter and hold of `old` is added to `new` (counters) or moved there (holds)."""
        if old.tag == new.tag:
            return
        src_c, dst_c = self._k(old, "c"), self._k(new, "c")
        src = await self._r.hgetall(src_c)
        if src:
            dst = await self._r.hgetall(dst_c)
            for field, value in src.items():
                if field.startswith(("cur:", "prev:", "lo:")):
                    dst.setdefault(field, value)  # markers only steer cleanup
                else:
                    dst[field] = str(int(dst.get(field, 0)) + int(value))
            ttl = max(await self._r.ttl(src_c), await self._r.ttl(dst_c), max((w.ttl_s for w in windows), default=0))
            await self._r.hset(dst_c, mapping=dst)
            await self._r.expire(dst_c, ttl)
            await self._r.delete(src_c)
        holds = await self._r.zrange(self._k(old, "rz"), 0, -1, withscores=True)
        amounts = await self._r.hgetall(self._k(old, "rh"))
        for hold_id, expires in holds:
            if hold_id in amounts:
                await self._r.zadd(self._k(new, "rz"), {hold_id: expires})
                await self._r.hset(self._k(new, "rh"), hold_id, amounts[hold_id])
        await self._r.delete(self._k(old, "rz"), self._k(old, "rh"), self._k(old, "rt"))
        # the new scope's running total, from its holds (an admin operation: a sum is fine here)
        held = sum(int(v) for v in (await self._r.hgetall(self._k(new, "rh"))).values())
        keep = max(await self._r.ttl(self._k(new, "rh")), 3600)
        await self._r.set(self._k(new, "rt"), str(held), ex=keep)

    def _pk(self, kind: str, id: str, network: str, asset: str) -> str:
        return f"{self._p}pol:{kind}:{id.lower() if kind == 'agent' else id}:{network}:{asset.lower()}"

    @_errors
    async def get_policy(self, kind: str, id: str, network: str, asset: str) -> Policy | None:
        raw = await self._r.get(self._pk(kind, id, network, asset))
        return Policy.model_validate_json(raw) if raw else None

    @_errors
    async def put_policy(self, kind: str, id: str, policy: Policy) -> None:
        key = self._pk(kind, id, policy.network, policy.asset)
        await self._r.set(key, policy.model_dump_json())
        await self._r.sadd(f"{self._p}pol:index", key)

    @_errors
    async def delete_policy(self, kind: str, id: str, network: str, asset: str) -> bool:
        key = self._pk(kind, id, network, asset)
        removed = await self._r.delete(key)
        await self._r.srem(f"{self._p}pol:index", key)
        return removed == 1

    @_errors
    async def list_policies(self) -> list[tuple[str, str, Policy]]:
        keys = sorted(await self._r.smembers(f"{self._p}pol:index"))
        values = await self._r.mget(keys) if keys else []
        out = []
        for key, raw in zip(keys, values):
            if raw:
                kind, id = key[len(self._p) + 4:].split(":", 2)[:2]
                out.append((kind, id, Policy.model_validate_json(raw)))
        return out

    @_errors
    async def ledger(self, *, agent: str | None, start: float, end: float, limit: int) -> list[LedgerEntry]:
        tags = await self._r.smembers(f"{self._p}ledger:tags")
        entries: list[LedgerEntry] = []
        for tag in tags:
            for raw in await self._r.zrangebyscore(f"{self._p}b:{{{tag}}}:ledger", start, end):
                e = entry_from(orjson.loads(raw))
                if agent is None or e.agent.lower() == agent.lower():
                    entries.append(e)
        entries.sort(key=lambda e: (e.ts, e.request_id))
        return entries[:limit]

    @_errors
    async def ping(self) -> None:
        await self._r.ping()

    async def close(self) -> None:
        await self._r.aclose()
