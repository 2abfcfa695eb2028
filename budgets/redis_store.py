"""Budgets on Redis: one Lua script per atomic operation, on a single Redis, behind Sentinel, or
on Cluster.

Key layout: every key a script touches carries the hash tag of the agent's group (or of the
agent itself when it has no group), `{prefix}b:{<tag>}:…`, so the agent's budget, its group's
budget, their reservations, the rate bucket and the ledger live in one slot and change together.
Amounts are decimal strings with exact arithmetic in Lua: 18-decimal tokens pass both Lua's
doubles (2^53) and Redis' int64 counters after a few tokens.
"""

from __future__ import annotations

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from budgets.models import BudgetUsage, LedgerEntry, Policy, RateLimit, Refusal, Scope, Window
from budgets.store import BudgetStoreUnavailableError, Check, RateState
from storage import BackendErrors, redis_from_url
from storage.lua import BIGNUM

_errors = BackendErrors(BudgetStoreUnavailableError)

_HELPERS = BIGNUM + """
-- reserved total of a scope, dropping expired holds
local function reserved(z, h, now)
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, id in ipairs(expired) do redis.call('HDEL', h, id) end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', now) end
  local total = '0'
  for _, v in ipairs(redis.call('HVALS', h)) do total = add(total, v) end
  return total
end
-- spent in a window (rolling: the current bucket and the 60 before it, so spend is never forgiven early)
local function spent(key, w)
  if w.rolling then
    local total = '0'
    local all = redis.call('HGETALL', key)
    for i = 1, #all, 2 do
      if tonumber(all[i]) >= w.bucket - 60 then total = add(total, all[i + 1]) else redis.call('HDEL', key, all[i]) end
    end
    return total
  end
  return redis.call('GET', key) or '0'
end
local function bucket(key, r, now, take)
  local cap = r.burst
  if cap <= 0 then cap = r.per_minute end
  local per_s = r.per_minute / 60.0
  local st = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(st[1]) or cap
  local ts = tonumber(st[2]) or now
  tokens = math.min(cap, tokens + math.max(0, now - ts) * per_s)
  if tokens < 1 then return false, (1 - tokens) / per_s end
  if take then
    -- numbers, not tostring(): Redis converts them exactly; tostring keeps 14 digits and would
    -- round a unix time with a fraction to 0.1 ms
    redis.call('HSET', key, 'tokens', tokens - 1, 'ts', now)
    redis.call('EXPIRE', key, 3600)
  end
  return true, 0
end
"""

_RESERVE = _HELPERS + """
local spec = cjson.decode(ARGV[1])
local now, amt = spec.now, spec.amount
for ci, c in ipairs(spec.checks) do
  local held = reserved(KEYS[c.z], KEYS[c.h], now)
  for wi, w in ipairs(c.windows) do
    local used = add(spent(KEYS[w.k], w), held)
    if cmp(add(used, amt), w.limit) > 0 then
      return {'budget', ci, wi, sub(w.limit, used)}
    end
  end
end
for ci, c in ipairs(spec.checks) do
  if c.rate then
    local ok, wait = bucket(KEYS[c.rate.k], c.rate, now, false)
    if not ok then return {'rate', ci, 0, tostring(math.ceil(wait))} end
  end
end
for _, c in ipairs(spec.checks) do
  if c.rate then bucket(KEYS[c.rate.k], c.rate, now, true) end
  redis.call('ZADD', KEYS[c.z], spec.exp, spec.id)
  redis.call('HSET', KEYS[c.h], spec.id, amt)
  if redis.call('ZCOUNT', KEYS[c.z], '+inf', '+inf') == 0 then  -- a pinned hold keeps its keys forever
    redis.call('EXPIRE', KEYS[c.z], spec.keep)
    redis.call('EXPIRE', KEYS[c.h], spec.keep)
  end
end
return {'ok'}
"""

_COMMIT = _HELPERS + """
local spec = cjson.decode(ARGV[1])
local first = redis.call('SET', KEYS[spec.done], '1', 'NX', 'EX', 604800)
for _, c in ipairs(spec.checks) do
  redis.call('ZREM', KEYS[c.z], spec.id)
  redis.call('HDEL', KEYS[c.h], spec.id)
end
if first == false then return 0 end  -- counted before (under this or another hold): only the hold goes
for _, c in ipairs(spec.checks) do
  for _, w in ipairs(c.windows) do
    local key = KEYS[w.k]
    if w.rolling then
      local b = tostring(w.bucket)
      redis.call('HSET', key, b, add(redis.call('HGET', key, b) or '0', spec.amount))
    else
      redis.call('SET', key, add(redis.call('GET', key) or '0', spec.amount))
    end
    redis.call('EXPIRE', key, w.ttl)
  end
end
redis.call('ZADD', KEYS[spec.ledger], spec.now, ARGV[2])
return 1
"""

_RELEASE = """
local spec = cjson.decode(ARGV[1])
for _, c in ipairs(spec.checks) do
  redis.call('ZREM', KEYS[c.z], spec.id)
  redis.call('HDEL', KEYS[c.h], spec.id)
end
return 1
"""

# A pinned hold scores +inf in the expiry set, which `reserved` never drops; the keys lose their
# TTL (Redis deletes an emptied set or hash by itself once the hold is committed or released).
# Only a live hold is pinned (0 otherwise): an expired one's budget may belong to another call.
_PIN = """
local spec = cjson.decode(ARGV[1])
for _, c in ipairs(spec.checks) do
  local expires = redis.call('ZSCORE', KEYS[c.z], spec.id)
  if (not expires) or tonumber(expires) <= spec.now or not redis.call('HGET', KEYS[c.h], spec.id) then return 0 end
end
for _, c in ipairs(spec.checks) do
  redis.call('ZADD', KEYS[c.z], 'inf', spec.id)
  redis.call('PERSIST', KEYS[c.z])
  redis.call('PERSIST', KEYS[c.h])
end
return 1
"""

_RATE = _HELPERS + """
local r = cjson.decode(ARGV[1])
local ok, wait = bucket(KEYS[1], r, r.now, r.take)
if ok then return {1, '0'} end
return {0, tostring(wait)}
"""

_USAGE = _HELPERS + """
local spec = cjson.decode(ARGV[1])
local c = spec.checks[1]
local held = reserved(KEYS[c.z], KEYS[c.h], spec.now)
local out = {held}
for _, w in ipairs(c.windows) do out[#out + 1] = spent(KEYS[w.k], w) end
return out
"""


class _Keys:
    """Collects KEYS for a script and hands out their 1-based indexes."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def add(self, key: str) -> int:
        self.keys.append(key)
        return len(self.keys)


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
        self._reserve = client.register_script(_RESERVE)
        self._commit = client.register_script(_COMMIT)
        self._release = client.register_script(_RELEASE)
        self._pin = client.register_script(_PIN)
        self._rate = client.register_script(_RATE)
        self._usage = client.register_script(_USAGE)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "x402b:") -> "RedisBudgetStore":
        return cls(redis_from_url(url), prefix=prefix)

    def _k(self, scope: Scope, suffix: str) -> str:
        return f"{self._p}b:{{{scope.tag}}}:{scope.name}:{suffix}"

    def _spec(self, checks: list[Check], keys: _Keys) -> list[dict]:
        out = []
        for c in checks:
            item: dict = {
                "z": keys.add(self._k(c.scope, "rz")),
                "h": keys.add(self._k(c.scope, "rh")),
                "windows": [
                    {"k": keys.add(self._k(c.scope, w.key)), "rolling": w.rolling, "limit": str(w.limit),
                     "bucket": w.bucket, "ttl": w.ttl_s}
                    for w in c.windows
                ],
            }
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
                     *, now: float, once: str | None = None) -> bool:
        keys = _Keys()
        tag_scope = checks[0].scope
        spec = {"now": now, "amount": str(amount), "id": reservation_id, "checks": self._spec(checks, keys),
                "done": keys.add(self._k(tag_scope, f"done:{once or reservation_id}")),
                "ledger": keys.add(f"{self._p}b:{{{tag_scope.tag}}}:ledger")}
        res = await self._run(self._commit, keys.keys, [orjson.dumps(spec).decode(), _entry_json(entry)])
        try:
            await self._r.sadd(f"{self._p}ledger:tags", tag_scope.tag)
        except RedisError:
            pass  # only an index: the entry itself is in the ledger already
        return res == 1

    async def release(self, checks: list[Check], reservation_id: str) -> None:
        keys = _Keys()
        spec = {"id": reservation_id, "checks": self._spec(checks, keys)}
        await self._run(self._release, keys.keys, [orjson.dumps(spec).decode()])

    async def pin(self, checks: list[Check], reservation_id: str, amount: int, *, now: float) -> bool:
        keys = _Keys()
        spec = {"id": reservation_id, "now": now, "checks": self._spec(checks, keys)}
        return await self._run(self._pin, keys.keys, [orjson.dumps(spec).decode()]) == 1

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
        if old.tag == new.tag:
            return
        for w in windows:
            src, dst = self._k(old, w.key), self._k(new, w.key)
            if w.rolling:
                buckets = await self._r.hgetall(src)
                for bucket, amount in buckets.items():
                    current = await self._r.hget(dst, bucket)
                    await self._r.hset(dst, bucket, str(int(current or 0) + int(amount)))
            else:
                amount = await self._r.get(src)
                if amount is None:
                    continue
                current = await self._r.get(dst)
                await self._r.set(dst, str(int(current or 0) + int(amount)))
            await self._r.expire(dst, w.ttl_s)
            await self._r.delete(src)
        holds = await self._r.zrange(self._k(old, "rz"), 0, -1, withscores=True)
        amounts = await self._r.hgetall(self._k(old, "rh"))
        for hold_id, expires in holds:
            if hold_id in amounts:
                await self._r.zadd(self._k(new, "rz"), {hold_id: expires})
                await self._r.hset(self._k(new, "rh"), hold_id, amounts[hold_id])
        await self._r.delete(self._k(old, "rz"), self._k(old, "rh"))

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
