"""Carry a Redis budget store written by the earlier layout (one key per calendar window holding a
decimal string, one hash per rolling period, holds as `rh` id -> amount, the rate bucket in its own
key) into the layout of budgets/lua.py, so spend in windows still open and holds in flight are
not forgotten when the gateways are upgraded.

Run it with every gateway of the old version stopped (`x402-budgets` or a one-off script:
`await migrate_layout(redis_from_url(url), prefix)`), before the new ones start. It is safe to run
again: each old key is deleted once folded in; a crash between the two counts that key twice on the
next run, which can only refuse more, never less. The earlier layout counted every commit in every
period, so every period with a counter is marked tracked.
"""

from __future__ import annotations

import re
from typing import Any

from budgets import lua

_CALENDAR = re.compile(r"^(hour|day|week|month):\d{4}-\d\d-\d\dT\d\d$")
_ROLLING = re.compile(r"^roll:(hour|day|week|month)$")
_NEW_FIELDS = {"t", "x", "e", "tokens", "ts"}


def _limbs(amount: int) -> list[int]:
    out = []
    while amount:
        amount, limb = divmod(amount, lua.LIMB)
        out.append(limb)
    return out


async def _add(r: Any, key: str, name: str, amount: int) -> int:
    limbs = _limbs(amount)
    for i, limb in enumerate(limbs):
        if limb:
            await r.hincrby(key, f"{name}#{i}", limb)  # readers carry limbs of any size
    return len(limbs)


async def migrate_layout(r: Any, prefix: str = "x402b:") -> int:
    """Fold every old-layout key under `prefix` into the new layout; returns how many it folded."""
    scopes: dict[str, dict[str, str]] = {}  # "{prefix}b:{tag}:<scope name>" -> suffix -> key
    async for key in r.scan_iter(match=f"{prefix}b:*", count=1000):
        m = re.match(r"^(.*?b:\{[^}]*\}:)(agent|group):([^:]+):([^:]+:[^:]+):([^:]+):(.+)$", key)
        if m is None:
            continue
        base = f"{m[1]}{m[2]}:{m[3]}:{m[4]}:{m[5]}"
        scopes.setdefault(base, {})[m[6]] = key
    folded = 0
    for base, keys in scopes.items():
        c_key = f"{base}:c"
        top = 0
        calendar: dict[str, list[str]] = {}
        for suffix, key in sorted(keys.items()):
            if _CALENDAR.match(suffix):
                value = await r.get(key)
                if value is not None:
                    top = max(top, await _add(r, c_key, suffix, int(value)))
                    calendar.setdefault(suffix.split(":", 1)[0], []).append(suffix)
                await r.delete(key)
                folded += 1
            elif _ROLLING.match(suffix) and await r.type(key) == "hash":
                buckets = await r.hgetall(key)
                for bucket, value in buckets.items():
                    top = max(top, await _add(r, c_key, f"{suffix}:{bucket}", int(value)))
                if buckets:
                    lo = min(int(b) for b in buckets)
                    current = await r.hget(c_key, f"lo:{suffix}")
                    await r.hset(c_key, f"lo:{suffix}", str(min(lo, int(current)) if current else lo))
                await r.delete(key)
                folded += 1
        for period, windows in calendar.items():
            windows.sort()
            if await r.hsetnx(c_key, f"cur:{period}", windows[-1]) and len(windows) > 1:
                await r.hset(c_key, f"prev:{period}", windows[-2])
        if top:
            n = int(await r.hget(c_key, "n") or 0)
            if top > n:
                await r.hset(c_key, "n", top)
            await r.expire(c_key, lua.COUNTERS_TTL_S)
        folded += await _holds(r, base, keys)
    return folded


async def _holds(r: Any, base: str, keys: dict[str, str]) -> int:
    """`rh` id -> amount becomes `h:<id>` -> amount with the running total `t`; the rate bucket
    moves into `rh`; `rz` keeps its members and gets the '' member that keeps it alive."""
    folded = 0
    rh, rz = f"{base}:rh", f"{base}:rz"
    fields = await r.hgetall(rh) if "rh" in keys else {}
    old = {f: v for f, v in fields.items() if not f.startswith("h:") and f not in _NEW_FIELDS}
    if old:
        ttl = max(await r.ttl(rh), await r.ttl(rz), 3600)
        total = sum(int(v) for f, v in fields.items() if f.startswith("h:")) + sum(int(v) for v in old.values())
        await r.hset(rh, mapping={**{f"h:{f}": v for f, v in old.items()},
                                  "t": ",".join(str(x) for x in _limbs(total)), "x": "0"})
        await r.hdel(rh, *old)
        await r.expire(rh, ttl)
        if await r.exists(rz):
            await r.zadd(rz, {"": float("inf")})
            await r.expire(rz, ttl)
        folded += 1
    if "rate" in keys:
        bucket = await r.hgetall(keys["rate"])
        if bucket:
            await r.hset(rh, mapping={k: v for k, v in bucket.items() if k in ("tokens", "ts")})
            if await r.ttl(rh) < 3600:
                await r.expire(rh, 3600)
        await r.delete(keys["rate"])
        folded += 1
    return folded


def main(argv: list[str] | None = None) -> int:
    """`python -m budgets.redis_migrate REDIS_URL [--prefix P]`: the one-off upgrade step."""
    import argparse
    import asyncio

    from storage import redis_from_url

    parser = argparse.ArgumentParser(prog="python -m budgets.redis_migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the budget store's Redis URL (single server or Sentinel)")
    parser.add_argument("--prefix", default="x402b:", help="the budget store's key prefix (default x402b:)")
    args = parser.parse_args(argv)

    async def run() -> int:
        client = redis_from_url(args.url)
        try:
            return await migrate_layout(client, args.prefix)
        finally:
            await client.aclose()

    print(f"folded {asyncio.run(run())} keys into the current layout")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
