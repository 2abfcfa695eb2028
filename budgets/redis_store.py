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

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import orjson
from redis.exceptions import RedisError
from redis.typing import EncodableT

from budgets import lua
from budgets.models import BudgetUsage, LedgerEntry, Policy, RateLimit, Refusal, Scope, Window
from budgets.store import BudgetStoreUnavailableError, Check, RateState
from storage import BackendErrors, RedisClient, redis_from_url

_errors = BackendErrors(BudgetStoreUnavailableError)


def _limbs(amount: int) -> list[int]:
    """An amount as the scripts take it: its length, then its base-10^9 limbs, lowest first."""
    out = []
    while amount:
        amount, limb = divmod(amount, lua.LIMB)
        out.append(limb)
    return [len(out), *out]


def _from_limbs(limbs: list[int]) -> int:
    return sum(int(x) * lua.LIMB**i for i, x in enumerate(limbs))


def _window_args(w: Window) -> tuple[int, str, str, int, int, int, str]:
    """A window as RESERVE and USAGE take it (budgets/lua.py): rolling, its marker field, its key
    (a calendar window's, or the rolling period's: its buckets are `key:<bucket>`), bucket,
    bucket_s, first hour, limit."""
    return (int(w.rolling), f"lo:{w.key}" if w.rolling else f"cur:{w.period}", w.key, w.bucket, w.bucket_s or 1,
            int(w.start // 3600), str(w.limit))


def _limbs_to_read(windows: tuple[Window, ...]) -> int:
    """As many limbs as the longest limit has (a counter with more shows in the hash's `n`, and the
    script reads again)."""
    top = max((w.limit for w in windows), default=0)
    return max(1, (len(str(top)) + 8) // 9) if top else 1


def _commit_window_args(w: Window) -> tuple[str, str, str]:
    """A window as END counts in it: its marker field, the previous window's marker field ('' for a
    rolling window), its counter's name."""
    if w.rolling:
        return f"lo:{w.key}", "", f"{w.key}:{w.bucket}"
    return f"cur:{w.period}", f"prev:{w.period}", w.key


def _limb_strings(amount: int) -> list[str | int]:
    """The amount's limbs for END: their number, then each as a decimal string, lowest first."""
    limbs = _limbs(amount)
    return [limbs[0], *(str(x) for x in limbs[1:])]


def _merge_counters(src: dict[str, str], dst: dict[str, str]) -> dict[str, str | int]:
    """Two scopes' counter hashes as one (budgets/lua.py has the layout)."""
    counters: dict[str, int] = {}
    out: dict[str, str | int] = {}
    for side in (src, dst):
        for field, value in side.items():
            if "#" in field:
                name, limb = field.rsplit("#", 1)
                counters[name] = counters.get(name, 0) + int(value) * lua.LIMB ** int(limb)
    tracked = {f for f in src if f.startswith(("cur:", "lo:")) and f != "lo:h"}
    both = tracked & set(dst)
    for field in both:
        out[field] = min(src[field], dst[field], key=int) if field.startswith("lo:") else dst[field]
        prev = "prev:" + field[4:]
        if field.startswith("cur:") and prev in dst:
            out[prev] = dst[prev]
    dropped = [f.split(":", 1)[1] for f in (tracked | {f for f in dst if f.startswith(("cur:", "lo:"))}) - both
               if f != "lo:h"]
    for name, amount in counters.items():
        period = name.split(":", 1)[0] if not name.startswith("roll:") else name.rsplit(":", 1)[0]
        if period in dropped:
            continue
        for i, part in enumerate(_limbs(amount)[1:]):
            out[f"{name}#{i}"] = part
    out["n"] = max([int(src.get("n", 0)), int(dst.get("n", 0)), *(len(_limbs(v)) - 1 for v in counters.values())])
    his = [int(x) for x in (src.get("lo:h"), dst.get("lo:h")) if x is not None]
    if his:
        out["lo:h"] = min(his)
    return out


def _glob_escape(text: str) -> str:
    """`text` matched literally by a Redis glob (SCAN MATCH)."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


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


_MAX_ENDS = 256  # calls per END script (a bound on one script's run, not a tuning knob)


@dataclass(slots=True)
class _Ending:
    checks: list[Check]
    lease_id: str
    call_id: str
    reserved: int
    amount: int
    entry: LedgerEntry | None
    once: str
    now: float
    ended: Callable[[], None] | None


class RedisBudgetStore:
    def __init__(self, client: RedisClient, *, prefix: str = "x402b:") -> None:
        self._r = client
        self._p = prefix
        self._reserve = client.register_script(lua.RESERVE)
        self._release = client.register_script(lua.RELEASE)
        self._pin = client.register_script(lua.PIN)
        self._rate = client.register_script(lua.RATE)
        self._usage = client.register_script(lua.USAGE)
        self._end_script = client.register_script(lua.END)
        # (tag, hour, windows) -> calls waiting for an END, and those with an END running
        self._ending: dict[tuple[str, int, int], list[tuple[_Ending, asyncio.Future[bool]]]] = {}
        self._flushing: set[tuple[str, int, int]] = set()
        self._tasks: set[asyncio.Task] = set()
        self._indexed: set[str] = set()  # tags known to be in the ledger's index
        # windows as the scripts take them, per tuple of windows (the enforcer's WindowCache hands
        # out the same tuple until a window moves on): keyed by id, the tuple kept to check it
        self._wargs: dict[tuple[int, bool], tuple[tuple[Window, ...], list[str | int | float]]] = {}

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "x402b:") -> RedisBudgetStore:
        return cls(redis_from_url(url), prefix=prefix)

    def _k(self, scope: Scope, suffix: str) -> str:
        return f"{self._p}b:{{{scope.tag}}}:{scope.name}:{suffix}"

    def _windows_args(self, windows: tuple[Window, ...], commit: bool) -> list[str | int | float]:
        hit = self._wargs.get((id(windows), commit))
        if hit is not None and hit[0] is windows:
            return hit[1]
        out: list[str | int | float] = []
        if commit:
            out.append(len(windows))
            for w in windows:
                out += _commit_window_args(w)
        else:
            out += [_limbs_to_read(windows), len(windows)]
            for w in windows:
                out += _window_args(w)
        if len(self._wargs) >= 1024:
            self._wargs.clear()
        self._wargs[(id(windows), commit)] = (windows, out)
        return out

    def _check_args(self, c: Check, keys: list[str], *, rate: bool) -> list[str | int | float]:
        """Its keys z, h, c go to `keys`; returns per_minute, burst, limbs to read, #windows, windows."""
        keys += [self._k(c.scope, "rz"), self._k(c.scope, "rh"), self._k(c.scope, "c")]
        out: list[str | int | float] = [c.rate.per_minute, c.rate.burst] if rate and c.rate is not None else [0, 0]
        return out + self._windows_args(c.windows, False)

    @_errors
    async def _run(self, script, keys: list[str], args: list[str | int | float]):
        return await script(keys=keys, args=args)

    async def reserve(self, checks: list[Check], amount: int, reservation_id: str, *, now: float,
                      hold_s: float) -> Refusal | None:
        return await self.reserve_lease(checks, amount, reservation_id, now=now, hold_s=hold_s, calls=1)

    async def reserve_lease(self, checks: list[Check], amount: int, lease_id: str, *, now: float, hold_s: float,
                            calls: int) -> Refusal | None:
        keys: list[str] = []
        args: list[str | int | float] = [repr(now), repr(now + hold_s), int(hold_s) + 3600, lease_id,
                                         str(amount), int(now // 3600), len(checks), calls]
        for c in checks:
            args += self._check_args(c, keys, rate=True)
        res = await self._run(self._reserve, keys, args)
        if res[0] == "ok":
            return None
        check = checks[int(res[1]) - 1]
        if res[0] == "rate":
            wait = max(1, int(res[3]))
            return Refusal("rate_limited", "rate limit reached", status=429, scope=check.scope.name,
                           retry_after_s=wait, resets_at=now + wait)
        window = check.windows[int(res[2]) - 1]
        used = _from_limbs(res[3:])
        kind = "group" if check.scope.kind == "group" else "agent"
        return Refusal("budget_exceeded", f"{kind} {window.period}{' (rolling)' if window.rolling else ''} budget exceeded",
                       scope=check.scope.name, remaining=max(0, window.limit - used), resets_at=window.resets_at)

    async def commit(self, checks: list[Check], reservation_id: str, amount: int, entry: LedgerEntry,
                     *, now: float, once: str | None = None) -> bool:
        """Counts in the windows of `checks` that the scope is limited by (tracked); pass every
        period's window (the enforcer's `for_commit`), so a period tracked since is counted too.
        The END script, as a call out of a lease has it, without a lease: batched with the other
        ends of its hash tag."""
        return await self.end_leased(checks, "", reservation_id, 0, amount, entry, now=now, once=once)

    async def _index(self, tag_scope: Scope) -> None:
        if tag_scope.tag not in self._indexed:
            try:
                await self._r.sadd(f"{self._p}ledger:tags", tag_scope.tag)
            except RedisError:
                pass  # only an index: the entry itself is in the ledger already; the next commit retries
            else:
                if len(self._indexed) > 100_000:
                    self._indexed.clear()
                self._indexed.add(tag_scope.tag)

    async def end_leased(self, checks: list[Check], lease_id: str, call_id: str, reserved: int, amount: int,
                         entry: LedgerEntry | None, *, now: float, once: str | None = None,
                         ended: Callable[[], None] | None = None) -> bool:
        """The end of a call served from a lease: the lease gives up `reserved` (once per call,
        whoever ends it), a hold of the call's own is dropped, and with `entry` (a commit) `amount`
        is counted once per `once` (default the call) with its ledger entry. `checks` as commit
        takes them. True when counted now. `ended` is called once the call is ended in the store,
        even if the caller stopped waiting.

        Calls of one hash tag ended while an END of that tag runs go together in the next one (one
        script, each lease shrunk and each scope counted once): no call waits for a timer, and
        under load a round trip ends many calls."""
        # one END counts in one set of windows at one hour: calls are batched by those too
        tag = (checks[0].scope.tag, int(now // 3600), id(checks[0].windows))
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._ending.setdefault(tag, []).append(
            (_Ending(checks, lease_id, call_id, reserved, amount, entry, once or call_id, now, ended), done))
        if tag not in self._flushing:
            self._flushing.add(tag)
            task = asyncio.ensure_future(self._end_batches(tag))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await done

    async def _end_batches(self, tag: tuple[str, int, int]) -> None:
        try:
            while batch := self._ending.pop(tag, None):
                if len(batch) > _MAX_ENDS:
                    self._ending[tag] = batch[_MAX_ENDS:] + self._ending.get(tag, [])
                    batch = batch[:_MAX_ENDS]
                try:
                    counted = await self._end([e for e, _ in batch])
                except BaseException as exc:  # every caller gets it (BudgetStoreUnavailableError: retried)
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (e, done), c in zip(batch, counted, strict=True):
                    if e.ended is not None:
                        e.ended()
                    if not done.done():
                        done.set_result(c == 1)
        finally:
            self._flushing.discard(tag)
            # stopped early (the loop is going away): nobody would send what is still queued
            for _, done in self._ending.pop(tag, []):
                if not done.done():
                    done.set_exception(BudgetStoreUnavailableError("the budget store is closing"))

    async def _end(self, ends: list[_Ending]) -> list[int]:
        first = ends[0].checks[0].scope
        keys = [f"{self._p}b:{{{first.tag}}}:ledger"]
        for e in ends:
            # each under its own call's agent scope (as every end of that call names them), not the
            # batch's first: a batch mixes the agents of a group
            agent = e.checks[0].scope
            done = self._k(agent, f"done:{e.once}")  # a hold of its own: no `out` set (its slot is filled)
            keys += [done, self._k(agent, f"out:{e.lease_id}") if e.lease_id else done]
        scopes: dict[str, int] = {}
        scope_args: list[str | int | float] = []
        call_args: list[str | int | float] = []
        previous: tuple[Window, ...] | None = None
        for e in ends:
            own = []
            for c in e.checks:
                si = scopes.get(c.scope.name)
                if si is None:
                    si = scopes[c.scope.name] = len(scopes) + 1
                    keys += [self._k(c.scope, "rz"), self._k(c.scope, "rh"), self._k(c.scope, "c")]
                    if c.windows is previous or c.windows == previous:
                        scope_args.append(-1)
                    else:
                        scope_args += self._windows_args(c.windows, True)
                    previous = c.windows
                own.append(si)
            call_args += [e.lease_id, e.call_id, str(e.reserved), _entry_json(e.entry) if e.entry is not None else "",
                          repr(e.now), *_limb_strings(e.amount if e.entry is not None else 0), len(own), *own]
        now = ends[0].now
        args: list[str | int | float] = [repr(now), int(now // 3600), len(ends), len(scopes), *scope_args, *call_args]
        res = await self._run(self._end_script, keys, args)
        if any(e.entry is not None for e in ends):
            await self._index(first)
        return [int(x) for x in res]

    async def retire_lease(self, checks: list[Check], lease_id: str, *, now: float, unused_calls: int) -> None:
        """Drop what is left of a lease; its unused calls go back to the rate buckets it took them from."""
        keys, args = self._holds_args(checks, lease_id, now)
        for c in checks:
            args += [unused_calls, c.rate.burst or c.rate.per_minute] if c.rate is not None else [0, 0]
        await self._run(self._release, keys, args)

    def _holds_args(self, checks: list[Check], reservation_id: str, now: float) -> tuple[list[str], list[str | int | float]]:
        keys: list[str] = []
        for c in checks:
            keys += [self._k(c.scope, "rz"), self._k(c.scope, "rh")]
        return keys, [repr(now), reservation_id]

    async def release(self, checks: list[Check], reservation_id: str, *, now: float) -> None:
        await self._run(self._release, *self._holds_args(checks, reservation_id, now))

    async def pin(self, checks: list[Check], reservation_id: str, amount: int, *, now: float) -> bool:
        return await self._run(self._pin, *self._holds_args(checks, reservation_id, now)) == 1

    async def _bucket(self, scope: Scope, rate: RateLimit, now: float, take: bool) -> RateState:
        args = {"per_minute": rate.per_minute, "burst": rate.burst, "now": now, "take": take}
        ok, wait = await self._run(self._rate, [self._k(scope, "rh")], [orjson.dumps(args).decode()])
        return RateState(allowed=ok == 1, retry_after_s=float(wait))

    async def rate_peek(self, scope: Scope, rate: RateLimit, *, now: float) -> RateState:
        return await self._bucket(scope, rate, now, False)

    async def rate_take(self, scope: Scope, rate: RateLimit, *, now: float) -> RateState:
        return await self._bucket(scope, rate, now, True)

    async def usage(self, check: Check, *, now: float) -> list[BudgetUsage]:
        keys: list[str] = []
        args = [repr(now), int(now // 3600), *self._check_args(check, keys, rate=False)]
        res = [int(x) for x in await self._run(self._usage, keys, args)]
        lists, i = [], 0
        while i < len(res):
            lists.append(res[i + 1:i + 1 + res[i]])
            i += 1 + res[i]
        held = _from_limbs(lists[0])
        out = []
        for w, limbs in zip(check.windows, lists[1:], strict=True):
            used = _from_limbs(limbs)
            out.append(BudgetUsage(scope=check.scope.name, period=w.period, rolling=w.rolling, limit=w.limit,
                                   spent=used, reserved=held, remaining=max(0, w.limit - used - held),
                                   resets_at=w.resets_at))
        return out

    @_errors
    async def move_spend(self, old: Scope, new: Scope, windows: tuple[Window, ...]) -> None:
        """Every counter and hold of `old` is added to `new` (counters) or moved there (holds). A
        period tracked on one side only is dropped from tracking (and its counters with it): the
        next reserve limited by it rebuilds it from the merged hourly spend."""
        if old.tag == new.tag:
            return
        src_c, dst_c = self._k(old, "c"), self._k(new, "c")
        # the client decodes replies (redis_from_url): str, not bytes
        src = cast(dict[str, str], await self._r.hgetall(src_c))
        dst = cast(dict[str, str], await self._r.hgetall(dst_c))
        if src:
            merged: dict[EncodableT, EncodableT] = dict((_merge_counters(src, dst) if dst else src).items())
            await self._r.delete(dst_c)
            await self._r.hset(dst_c, mapping=merged)
            await self._r.expire(dst_c, lua.COUNTERS_TTL_S)
            await self._r.delete(src_c)
        old_h, new_h, new_z = self._k(old, "rh"), self._k(new, "rh"), self._k(new, "rz")
        holds = cast(list[tuple[str, float]], await self._r.zrange(self._k(old, "rz"), 0, -1, withscores=True))
        amounts = cast(dict[str, str], await self._r.hgetall(old_h))
        pinned = 0
        for hold_id, expires in holds:
            if f"h:{hold_id}" in amounts:
                await self._r.zadd(new_z, {hold_id: expires})
                await self._r.hset(new_h, f"h:{hold_id}", amounts[f"h:{hold_id}"])
                pinned += expires == float("inf")
        await self._r.delete(self._k(old, "rz"), old_h)
        # the new scope's running total, from its holds (an admin operation: a sum is fine here);
        # 'x' goes, so the next reserve sweeps by score
        moved = cast(dict[str, str], await self._r.hgetall(new_h))
        held = sum(int(v) for f, v in moved.items() if f.startswith("h:"))
        if held or await self._r.exists(new_h):
            await self._r.hset(new_h, "t", ",".join(str(x) for x in _limbs(held)[1:]))
            await self._r.hset(new_h, "x", "0")
            if pinned:  # moved pinned holds keep the keys alive as PIN has it (budgets/lua.py)
                await self._r.hincrby(new_h, "p", pinned)
                await self._r.hset(new_h, "e", "1000000000000000")
            if int(moved.get("p", 0)) + pinned > 0:
                await self._r.persist(new_h)
                await self._r.persist(new_z)
            else:
                await self._r.expire(new_h, max(await self._r.ttl(new_h), 3600))
        await self._carry_ends(old, new)

    async def _carry_ends(self, old: Scope, new: Scope) -> None:
        """The scope's `done:` keys (settlements counted) and `out:` sets (leased calls ended) go
        with its spend: else a settlement ended before the move and again after it (recovery) would
        be counted twice, and a leased call's lease shrink twice."""
        base = self._k(old, "")
        for kind in ("done:", "out:"):
            async for key in self._r.scan_iter(match=_glob_escape(base + kind) + "*", count=1000):
                target = self._k(new, key[len(base):])
                ttl = await self._r.pttl(key)
                if kind == "done:":
                    await self._r.set(target, "1", nx=True, px=ttl if ttl > 0 else None)
                else:
                    members = cast(set[str], await self._r.smembers(key))
                    if members:
                        await self._r.sadd(target, *members)
                        if ttl > 0:
                            await self._r.pexpire(target, ttl)
                await self._r.delete(key)

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
        keys = sorted(cast(set[str], await self._r.smembers(f"{self._p}pol:index")))
        values = await self._r.mget(keys) if keys else []
        out = []
        for key, raw in zip(keys, values, strict=True):
            if raw:
                kind, id = key[len(self._p) + 4:].split(":", 2)[:2]
                out.append((kind, id, Policy.model_validate_json(raw)))
        return out

    @_errors
    async def ledger(self, *, agent: str | None, start: float, end: float, limit: int) -> list[LedgerEntry]:
        tags = cast(set[str], await self._r.smembers(f"{self._p}ledger:tags"))
        entries: list[LedgerEntry] = []
        for tag in tags:
            for raw in cast(list[str], await self._r.zrangebyscore(f"{self._p}b:{{{tag}}}:ledger", start, end)):
                e = entry_from(orjson.loads(raw))
                if agent is None or e.agent.lower() == agent.lower():
                    entries.append(e)
        entries.sort(key=lambda e: (e.ts, e.request_id))
        return entries[:limit]

    @_errors
    async def ping(self) -> None:
        await self._r.ping()

    async def close(self) -> None:
        if self._tasks:  # ends on their way finish first
            await asyncio.wait(list(self._tasks), timeout=5)
        await self._r.aclose()
