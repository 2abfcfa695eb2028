"""Redis execution time of the budget scripts, per script and per paid call.

A private `redis-server` (free loopback port, no persistence, stopped by pid) and the real
`RedisBudgetStore`, driven with the checks `BudgetEnforcer.checks` builds, in the shape of
bench_budgets.py: 256 agents in 16 groups; the agent has a daily limit and a rate limit, its group
a daily limit; commits count in every window (`for_commit=True`) and once per transaction. A paid
call is RESERVE (with the rate limit), PIN (the gateway pins the hold before settling) and COMMIT
(with its ledger entry). Every agent makes one warm-up call first (a period's first reserve
builds its counter from the hourly spend, once per scope), then `--n` paid calls are timed phase
by phase, sequentially: all reserves, all pins, all commits, then as many trivial `return 1`
EVALSHAs (the floor). Per phase:

- Redis µs per call: `cmdstat_evalsha` usec_per_call (Redis' own execution time of the script,
  without network I/O), stats reset (CONFIG RESETSTAT) before each phase;
- redis.calls per script: the commands the scripts ran (commandstats, every command but EVALSHA);
- client CPU µs per call: this process's CPU time (the store's Python side, redis-py, the loop).

A last phase runs whole paid calls (reserve, pin, commit) at concurrency 64 for a second, with the
trivial EVALSHA at the same concurrency: ops/s of both (the issue's 0.5x target is the first over
the second).

`--root DIR` measures the budgets package of another checkout (e.g. `/work/main`, the code before
a change); `--compare DIR` runs repetitions of this checkout and of DIR interleaved, each in its own
process with its own redis-server, and prints medians side by side. Nothing asserts a timing.

Run: `.venv/bin/python loadtests/bench_budget_scripts.py --compare /work/main --reps 5` (~1 min).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

NET = "eip155:84532"
ASSET = "0x" + "11" * 20
HUGE = 10**30  # limits nobody reaches: every call succeeds
AMOUNT = 5 * 10**15  # 0.005 of an 18-decimal token
PHASES = ("reserve", "pin", "commit", "evalsha")


async def _stats(r: Any, *, reset: bool = False) -> dict[str, dict[str, float]]:
    if reset:
        await r.config_resetstat()
        return {}
    info = await r.info("commandstats")
    out = {}
    for name, v in info.items():
        cmd = name.removeprefix("cmdstat_")
        if cmd not in ("config", "info", "ping", "hello", "client"):
            out[cmd] = {"calls": int(v["calls"]), "usec": float(v["usec"])}
    return out


async def measure(url: str, n: int, conc: int, seconds: float) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from budgets.enforcer import BudgetEnforcer
    from budgets.models import LedgerEntry, Limit, Policy, RateLimit
    from budgets.redis_store import RedisBudgetStore

    store = RedisBudgetStore.from_url(url, prefix="bs:")
    admin = aioredis.from_url(url)
    enforcer = BudgetEnforcer(store, timezone="UTC")
    agents = [f"0x{i:040x}" for i in range(256)]
    groups = [f"g-{g}" for g in range(16)]
    pol = {g: (Policy(network=NET, asset=ASSET, limits=[Limit(period="day", amount=HUGE)],
                      rate_limit=RateLimit(per_minute=1_000_000), group=g),
               Policy(network=NET, asset=ASSET, limits=[Limit(period="day", amount=HUGE)])) for g in groups}
    ids = itertools.count()

    def call_checks(agent: str, now: float) -> tuple[list[Any], list[Any], list[Any]]:
        p, g = pol[groups[int(agent, 16) % 16]]
        return (enforcer.checks(agent, p, g, NET, ASSET, now, with_rate=True),
                enforcer.checks(agent, p, g, NET, ASSET, now, with_rate=False),
                enforcer.checks(agent, p, g, NET, ASSET, now, with_rate=False, for_commit=True))

    def entry(agent: str, rid: str, now: float) -> Any:
        return LedgerEntry(ts=now, agent=agent, group=None, route="POST /v1/chat/completions", model="gpt-4o-mini",
                           amount=AMOUNT, asset=ASSET, network=NET, tx_hash="0x" + "ab" * 32, request_id=rid)

    async def paid_call(agent: str) -> None:
        rid = f"r{next(ids)}"
        now = time.time()
        rc, pc, cc = call_checks(agent, now)
        assert await store.reserve(rc, AMOUNT, rid, now=now, hold_s=600) is None
        assert await store.pin(pc, rid, AMOUNT, now=now)
        assert await store.commit(cc, rid, AMOUNT, entry(agent, rid, now), now=now, once=f"tx{rid}")

    noop = store._r.register_script("return 1")
    try:
        for a in agents:  # warm-up: every scope tracks its day window, connections are open
            await paid_call(a)
        for _ in range(20):
            await noop()
        out: dict[str, Any] = {}
        usec: dict[str, list[int]] = {p: [] for p in PHASES}
        cpu: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        counts: dict[str, dict[str, int]] = {p: {} for p in PHASES}

        async def measured(name: str, coro: Any) -> Any:
            """One script call: Redis' own execution time of it and of the commands it ran
            (commandstats, reset before it), and this process' CPU time for it."""
            await _stats(admin, reset=True)
            t = time.process_time()
            res = await coro
            cpu[name] += time.process_time() - t
            for c, v in (await _stats(admin)).items():
                if c == "evalsha":
                    usec[name].append(int(v["usec"]))
                elif c != "config|resetstat":
                    counts[name][c] = counts[name].get(c, 0) + int(v["calls"])
            return res

        for i in range(n):  # the calls in their real order
            a = agents[i % len(agents)]
            rid = f"r{next(ids)}"
            now = time.time()
            rc, pc, cc = call_checks(a, now)
            assert await measured("reserve", store.reserve(rc, AMOUNT, rid, now=now, hold_s=600)) is None
            assert await measured("pin", store.pin(pc, rid, AMOUNT, now=now))
            assert await measured("commit", store.commit(cc, rid, AMOUNT, entry(a, rid, now), now=now, once=f"tx{rid}"))
        for _ in range(n):  # apart: Redis steps Lua's garbage collector every 50 scripts, in whichever runs then
            assert await measured("evalsha", noop()) == 1
        for p in PHASES:
            assert len(usec[p]) == n, (p, len(usec[p]))
            out[p] = {"redis_us": statistics.fmean(usec[p]), "redis_us_p50": statistics.median(usec[p]),
                      "client_cpu_us": cpu[p] / n * 1e6,
                      "commands": {c: k / n for c, k in sorted(counts[p].items())},
                      "redis_calls": sum(counts[p].values()) / n}

        async def rate(fn: Any) -> float:
            deadline = time.monotonic() + seconds
            done = [0]
            agent_ids = itertools.cycle(agents)

            async def worker() -> None:
                while time.monotonic() < deadline:
                    await fn(next(agent_ids))
                    done[0] += 1

            t0 = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(conc)))
            return done[0] / (time.monotonic() - t0)

        async def floor(_: str) -> None:
            await noop()

        out["paid_call_ops_s"] = await rate(paid_call)
        out["evalsha_ops_s"] = await rate(floor)
        return out
    finally:
        await admin.aclose()
        await store.close()


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root).resolve()
    sys.path.insert(0, str(root))
    import budgets.redis_store  # before the loadtests helpers put this checkout on sys.path

    assert Path(budgets.redis_store.__file__).is_relative_to(root), budgets.redis_store.__file__
    sys.path.insert(1, str(HERE))
    from bench_budgets import RedisProc

    with tempfile.TemporaryDirectory(prefix="bench-scripts-") as tmp:
        redis = RedisProc(Path(tmp)).start()
        try:
            return asyncio.run(measure(redis.url, args.n, args.conc, args.seconds))
        finally:
            redis.stop()


def summary_rows(label: str, reps: list[dict[str, Any]]) -> list[str]:
    def med(phases: tuple[str, ...], key: str) -> float:
        return statistics.median(sum(r[p][key] for p in phases) for r in reps)

    rows = []
    for name, phases in [*((p, (p,)) for p in PHASES), ("**paid call** (reserve + pin + commit)", PHASES[:3]),
                         ("reserve + commit (without pin)", ("reserve", "commit"))]:
        rows.append(f"| {label} | {name} | {med(phases, 'redis_us'):.1f} | {med(phases, 'redis_us_p50'):.0f} "
                    f"| {med(phases, 'redis_calls'):.1f} | {med(phases, 'client_cpu_us'):.0f} |")
    return rows


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = [f"{args.n} paid calls per phase, sequential; medians of {args.reps} repetitions"
             + (" (interleaved)" if len(results) > 1 else ""), "",
             "| code | script | Redis µs per call, mean (commandstats) | sum of p50s | redis.calls per call "
             "| client CPU µs per call |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, reps in results.items():
        lines += summary_rows(label, reps)
    lines += ["", f"| code | paid calls/s (c={args.conc}) | trivial EVALSHA/s (c={args.conc}) | ratio |",
              "| --- | --- | --- | --- |"]
    for label, reps in results.items():
        paid = statistics.median(r["paid_call_ops_s"] for r in reps)
        floor = statistics.median(r["evalsha_ops_s"] for r in reps)
        ratio = statistics.median(r["paid_call_ops_s"] / r["evalsha_ops_s"] for r in reps)
        lines.append(f"| {label} | {paid:,.0f} | {floor:,.0f} | {ratio:.3f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=2000, help="paid calls per phase")
    ap.add_argument("--conc", type=int, default=64, help="concurrency of the throughput phase")
    ap.add_argument("--seconds", type=float, default=1.0, help="length of each throughput run")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--root", default=str(HERE.parent), help="checkout whose budgets package is measured")
    ap.add_argument("--compare", default=None, help="another checkout, measured in interleaved repetitions")
    ap.add_argument("--json", action="store_true", help="one repetition, printed as JSON (used by --compare)")
    args = ap.parse_args(argv)
    if args.json:
        print(json.dumps(run_once(args)))
        return 0
    roots = {"this": args.root} | ({"other": args.compare} if args.compare else {})
    labels = {k: Path(v).resolve().name for k, v in roots.items()}
    results: dict[str, list[dict[str, Any]]] = {labels[k]: [] for k in roots}
    for rep in range(args.reps):
        for k, root in (roots.items() if rep % 2 == 0 else reversed(roots.items())):
            cmd = [sys.executable, __file__, "--json", "--root", root, "--n", str(args.n), "--conc", str(args.conc),
                   "--seconds", str(args.seconds)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                return done.returncode
            results[labels[k]].append(json.loads(done.stdout))
            print(f"rep {rep + 1}/{args.reps} {labels[k]} done", file=sys.stderr)
    print(report(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
