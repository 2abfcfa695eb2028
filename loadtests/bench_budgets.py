"""Budget benchmark: reservations per second through the budget stores (embedded SQLite and Redis),
how their cost grows with state, and the latency budget enforcement adds to a paid call.

1. Stores. `SQLiteBudgetStore` on a file (WAL; the embedded default) and `RedisBudgetStore` on a
   private `redis-server` this script starts on a free loopback port and stops by pid. Every
   operation is an agent + group check, built by `BudgetEnforcer.checks` exactly as the gateway
   builds it: the agent's scope (a daily limit and a rate limit) and its group's (a daily limit);
   commits count in every window (`for_commit=True`). 256 agents in 16 groups, fresh ids per run.
   - "reserve+commit": one operation = reserve, then commit (with its ledger entry);
   - "reserve": reserve alone (holds stay outstanding until the end of the run);
   - "enforcer": what the gateway does per paid call through `BudgetEnforcer`: precheck (policy
     lookups, rate limit), reserve, commit — with the policies in the store;
   - "evalsha" (Redis only): a trivial script (`return 1`) through the same client, the floor one
     round trip to Redis costs at that concurrency; the enforcer's rate is reported against it;
   - "evalsha-redis-py": the same through redis-py's own client and Script (the floor before the
     project's scripts ran on one multiplexed connection, storage/resp.py), reported too.
   Round trips per operation are counted at the client (redis-py's commands and the scripts).
   Sequential (concurrency 1) and concurrency 64 (asyncio tasks sharing one store object).
2. Scaling (sequential, one store call at a time): reserve latency as reservations accumulate in
   one group, and SQLite commit latency as the counters table grows.
3. Gateway: the same `x402-gateway serve --config FILE` with and without a `budgets` section
   (SQLite and Redis budget stores), pointed at the instant facilitator stand-in of
   bench_gateway.py so settlement costs nothing; p50/p99 at concurrency 1 and calls/s at 16.

Nothing here asserts a timing. Run: `.venv/bin/python loadtests/bench_budgets.py` (~2 min).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    HOST,
    ROOT,
    CpuMeter,
    event_loop_runner,
    fmt,
    install_sigterm_handler,
    machine_info,
    md_machine,
    md_table,
    median,
    new_run_id,
    now_iso,
    percentile,
    run_load,
    write_results,
)
from bench_gateway import (
    CHAT,
    PaymentPool,
    PaymentSigner,
    Target,
    added_latency,
    free_port,
    gateway_proc,
    measure,
    offered_requirement,
    standin_proc,
    start_chain,
    upstream_proc,
)

NET = "eip155:84532"
ASSET = "0x" + "11" * 20
HUGE = 10**30  # limits nobody reaches: every operation succeeds
AMOUNT = 5 * 10**15  # 0.005 of an 18-decimal token


# =============================================================================================
# redis-server


class RedisProc:
    """A private redis-server on a free loopback port, no persistence; stopped by pid."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.version = ""

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> RedisProc:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        self.proc = subprocess.Popen(
            [binary, "--bind", HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# =============================================================================================
# 1. Stores


def open_store(kind: str, ctx: dict[str, Any], label: str):
    from budgets.redis_store import RedisBudgetStore
    from budgets.sqlite_store import SQLiteBudgetStore

    if kind == "sqlite":
        return SQLiteBudgetStore(str(ctx["dir"] / f"budgets-{label}.sqlite3"))
    return RedisBudgetStore.from_url(ctx["redis"].url, prefix=f"bench:{ctx['run_id']}:{label}:")


def policies(group: str) -> tuple[Any, Any]:
    from budgets.models import Limit, Policy, RateLimit

    agent = Policy(network=NET, asset=ASSET, limits=[Limit(period="day", amount=HUGE)],
                   rate_limit=RateLimit(per_minute=1_000_000), group=group)
    grp = Policy(network=NET, asset=ASSET, limits=[Limit(period="day", amount=HUGE)])
    return agent, grp


def build_checks(enforcer: Any, agent: str, pol: Any, gpol: Any, now: float, *, commit: bool) -> list[Any]:
    if not commit:
        return enforcer.checks(agent, pol, gpol, NET, ASSET, now, with_rate=True)
    try:
        return enforcer.checks(agent, pol, gpol, NET, ASSET, now, with_rate=False, for_commit=True)
    except TypeError:  # an enforcer without for_commit counts the policy's windows only
        return enforcer.checks(agent, pol, gpol, NET, ASSET, now, with_rate=False)


class Workload:
    """256 agents in 16 groups, ids unique to this run; checks resolved once per run."""

    def __init__(self, enforcer: Any, label: str, *, agents: int = 256, groups: int = 16) -> None:
        now = time.time()
        self.label = label
        self.agents = [f"0x{abs(hash(label)) % 16**8:08x}{i:032x}" for i in range(agents)]
        self.groups = [f"g-{label}-{g}" for g in range(groups)]
        self.group_of = {a: self.groups[i % groups] for i, a in enumerate(self.agents)}
        self.pol = {g: policies(g) for g in self.groups}
        self.reserve_checks = {a: build_checks(enforcer, a, *self.pol[self.group_of[a]], now, commit=False)
                               for a in self.agents}
        self.commit_checks = {a: build_checks(enforcer, a, *self.pol[self.group_of[a]], now, commit=True)
                              for a in self.agents}
        self.windows_per_commit = sum(len(c.windows) for c in self.commit_checks[self.agents[0]])
        self.windows_per_reserve = sum(len(c.windows) for c in self.reserve_checks[self.agents[0]])
        self._ids = itertools.count()

    def items(self) -> Iterator[tuple[str, str]]:
        for i in self._ids:
            yield self.agents[i % len(self.agents)], f"{self.label}-{i}"


async def redis_stats(ctx: dict[str, Any], *, reset: bool = False) -> dict[str, dict[str, float]]:
    """Redis' own execution time per command (INFO commandstats), without the network I/O."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(ctx["redis"].url)
    try:
        if reset:
            await client.config_resetstat()
            return {}
        info = await client.info("commandstats")
    finally:
        await client.aclose()
    out = {}
    for name, v in info.items():
        cmd = name.removeprefix("cmdstat_")
        if cmd in ("config", "info", "ping", "hello", "client"):
            continue
        out[cmd] = {"calls": int(v["calls"]), "usec": float(v["usec"]), "usec_per_call": float(v["usec_per_call"])}
    return out


def ledger_entry(agent: str, group: str, rid: str, now: float) -> Any:
    from budgets.models import LedgerEntry

    return LedgerEntry(ts=now, agent=agent, group=group, route="POST /v1/chat/completions", model="gpt-4o-mini",
                       amount=AMOUNT, asset=ASSET, network=NET, tx_hash="0x" + "ab" * 32, request_id=rid)


async def store_run(kind: str, op: str, conc: int, ctx: dict[str, Any], rep: int, args: argparse.Namespace) -> dict[str, Any]:
    from budgets.enforcer import BudgetEnforcer

    label = f"{op.replace('+', '_')}-{conc}-{rep}"
    store = open_store(kind, ctx, label)
    try:
        leased = op == "enforcer-leases"
        enforcer = BudgetEnforcer(store, timezone="UTC", lease_calls=args.lease_calls if leased else 0)
        wl = Workload(enforcer, f"{kind}-{label}")
        if op.startswith("enforcer"):
            for g, (_pol, gpol) in wl.pol.items():
                await store.put_policy("group", g, gpol)
            for a in wl.agents:
                await store.put_policy("agent", a, wl.pol[wl.group_of[a]][0])

        async def reserve(item: tuple[str, str]) -> tuple[bool, str]:
            agent, rid = item
            refused = await store.reserve(wl.reserve_checks[agent], AMOUNT, rid, now=time.time(), hold_s=600)
            return (refused is None, "" if refused is None else refused.reason)

        async def pair(item: tuple[str, str]) -> tuple[bool, str]:
            agent, rid = item
            now = time.time()
            refused = await store.reserve(wl.reserve_checks[agent], AMOUNT, rid, now=now, hold_s=600)
            if refused is not None:
                return False, refused.reason
            ok = await store.commit(wl.commit_checks[agent], rid, AMOUNT, ledger_entry(agent, wl.group_of[agent], rid, now),
                                    now=now)
            return ok, "" if ok else "commit_not_applied"

        noop = store._r.register_script("return 1") if kind == "redis" else None
        # The same trivial script through redis-py's own client and Script (pooled connections),
        # what the project used before storage/resp.py and what the floor was measured with.
        import redis.asyncio as aioredis

        plain = aioredis.Redis.from_url(ctx["redis"].url, max_connections=64) if op == "evalsha-redis-py" else None
        plain_noop = plain.register_script("return 1") if plain is not None else None

        async def floor(item: tuple[str, str]) -> tuple[bool, str]:
            assert noop is not None
            return await noop() == 1, ""

        async def floor_redis_py(item: tuple[str, str]) -> tuple[bool, str]:
            assert plain_noop is not None
            return await plain_noop() == 1, ""

        async def enforced(item: tuple[str, str]) -> tuple[bool, str]:
            agent, rid = item
            route, model = "POST /v1/chat/completions", "gpt-4o-mini"
            await enforcer.precheck(agent, NET, ASSET, route, model)
            hold = await enforcer.reserve(agent, NET, ASSET, AMOUNT, route, model, rid)
            await enforcer.commit(hold, AMOUNT, "0x" + "ab" * 32, rid)
            return True, ""

        fns = {"reserve": reserve, "reserve+commit": pair, "enforcer": enforced, "enforcer-leases": enforced,
               "evalsha": floor, "evalsha-redis-py": floor_redis_py}
        fn = fns[op]
        max_ops = args.store_max_ops if op != "reserve" else args.reserve_max_ops
        # warm-up (connections, statement cache), on other ids
        warm = Workload(enforcer, f"{kind}-{label}-warm", agents=16, groups=1)
        if op.startswith("enforcer"):
            for a in warm.agents:
                await store.put_policy("agent", a, warm.pol[warm.group_of[a]][0])
            await store.put_policy("group", warm.groups[0], warm.pol[warm.groups[0]][1])
        wfn = fns[op]
        saved = wl
        wl = warm
        await asyncio.gather(*(wfn(i) for i in itertools.islice(warm.items(), 64)))
        wl = saved
        pids = {"client": None} | ({"redis": ctx["redis"].pid} if kind == "redis" else {})
        sent = [0]
        if kind == "redis":
            await redis_stats(ctx, reset=True)
            send = store._r.execute_command

            async def counted(*a: Any, **kw: Any) -> Any:
                sent[0] += 1
                return await send(*a, **kw)

            store._r.execute_command = counted  # type: ignore[method-assign]
            if hasattr(store._r, "script_connection"):  # scripts on the multiplexed connection (storage/resp.py)
                mux = store._r.script_connection()
                call = mux.call

                async def counted_script(packed: bytes) -> Any:
                    sent[0] += 1
                    return await call(packed)

                mux.call = counted_script  # type: ignore[method-assign]
        res = await run_load(fn, wl.items(), concurrency=conc, max_ops=max_ops, max_seconds=args.store_seconds,
                             cpu=CpuMeter(pids))
        row = {"rep": rep, "store": kind, "op": op, "concurrency": conc, **res.summary(),
               "windows_per_reserve": wl.windows_per_reserve, "windows_per_commit": wl.windows_per_commit}
        if kind == "redis":
            stats = await redis_stats(ctx)
            row["redis_commandstats"] = stats
            # EVALSHA's time includes the commands its script runs (also listed on their own: not summed)
            top = [stats[c] for c in ("evalsha", "eval") if c in stats]  # a script's commands are in its time
            n = res.ops or float("nan")
            row["redis_usec_per_op"] = sum(v["usec"] for v in top) / n
            row["redis_scripts_per_op"] = sum(stats[c]["calls"] for c in ("evalsha", "eval") if c in stats) / n
            row["redis_sadd_per_op"] = stats.get("sadd", {}).get("calls", 0) / n
            row["round_trips_per_op"] = sent[0] / n
            row["redis_commands_per_op"] = sum(v["calls"] for c, v in stats.items() if c not in ("evalsha", "eval")) / n
            row["redis_usec_per_script"] = (sum(stats[c]["usec"] for c in ("evalsha", "eval") if c in stats)
                                            / max(1, sum(stats[c]["calls"] for c in ("evalsha", "eval") if c in stats)))
        return row
    finally:
        if plain is not None:
            await plain.aclose()
        await enforcer.close()
        await store.close()


# =============================================================================================
# 2. Scaling


async def holds_scaling(kind: str, ctx: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Reserve alone, sequentially, for distinct agents of ONE group: the group's outstanding holds
    grow by one per call. p50 reserve latency per window of 100 calls."""
    from budgets.enforcer import BudgetEnforcer

    store = open_store(kind, ctx, "scale-holds")
    try:
        enforcer = BudgetEnforcer(store, timezone="UTC")
        wl = Workload(enforcer, f"{kind}-scale-holds", agents=args.scale_holds, groups=1)
        lat: list[float] = []
        deadline = time.perf_counter() + args.scale_seconds
        for agent, rid in itertools.islice(wl.items(), args.scale_holds):
            t0 = time.perf_counter()
            await store.reserve(wl.reserve_checks[agent], AMOUNT, rid, now=time.time(), hold_s=600)
            lat.append(time.perf_counter() - t0)
            if time.perf_counter() > deadline:
                break
        out = []
        for lo in sorted({0, 500, 1000, 1500, 2000, 3000, args.scale_holds - 100}):
            window = lat[lo:lo + 100]
            if lo >= 0 and len(window) >= 50:
                out.append({"store": kind, "outstanding_holds": lo, "reserve_p50_ms": percentile(window, 50) * 1e3,
                            "reserve_p99_ms": percentile(window, 99) * 1e3})
        return out
    finally:
        await store.close()


async def counters_scaling(ctx: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """SQLite commit latency as the counters table grows: rows of other agents' windows (not yet
    expired) are inserted directly, as if that many windows had spend; then 200 reserve+commit
    pairs of fresh agents are timed. Repeated on a scratch copy with an index on counters(expires),
    created by this benchmark on its own file (the project's schema is not changed)."""
    from budgets.enforcer import BudgetEnforcer
    from budgets.sqlite_store import SQLiteBudgetStore

    out = []
    for indexed in (False, True):
        store = SQLiteBudgetStore(str(ctx["dir"] / f"budgets-counters-{int(indexed)}.sqlite3"))
        try:
            if indexed:
                store._db.execute("CREATE INDEX IF NOT EXISTS bench_counters_expires ON counters (expires)")
            enforcer = BudgetEnforcer(store, timezone="UTC")
            filled = 0
            for target in args.counter_rows:
                now = time.time()
                store._db.execute("BEGIN")
                store._db.executemany(
                    "INSERT OR REPLACE INTO counters (scope, wkey, bucket, amount, expires) VALUES (?, ?, ?, ?, ?)",
                    [(f"agent:0xfill{i:036x}:{NET}:{ASSET}", "day:fill", 0, "1", now + 86400)
                     for i in range(filled, target)])
                store._db.execute("COMMIT")
                filled = max(filled, target)
                wl = Workload(enforcer, f"counters-{int(indexed)}-{target}", agents=200, groups=4)
                commit_lat = []
                for agent, rid in itertools.islice(wl.items(), 200):
                    now = time.time()
                    await store.reserve(wl.reserve_checks[agent], AMOUNT, rid, now=now, hold_s=600)
                    t0 = time.perf_counter()
                    await store.commit(wl.commit_checks[agent], rid, AMOUNT,
                                       ledger_entry(agent, wl.group_of[agent], rid, now), now=now)
                    commit_lat.append(time.perf_counter() - t0)
                rows = store._db.execute("SELECT count(*) FROM counters").fetchone()[0]
                out.append({"indexed_expires": indexed, "counter_rows": rows,
                            "commit_p50_ms": percentile(commit_lat, 50) * 1e3,
                            "commit_p99_ms": percentile(commit_lat, 99) * 1e3})
        finally:
            await store.close()
    return out


# =============================================================================================
# 3. The gateway with and without budgets


def write_gateway_config(path: Path, devchain: dict[str, Any], dc_file: str, upstream_url: str, facilitator_url: str,
                         budgets: dict[str, Any] | None, log_level: str) -> str:
    from devtools.devconfig import dev_settings
    from gateway.settings import load_gateway_settings

    doc = dev_settings(devchain, devchain_file=dc_file, upstream_urls=[upstream_url], store_url="memory://",
                       facilitator_url=facilitator_url).model_dump(mode="json", exclude_none=True)
    # No upstream or facilitator auth in this setup, so no SecretStr dumped as "**********".
    if "**********" in json.dumps(doc):
        raise RuntimeError("a secret was dumped masked; restore it before writing the config")
    doc["log_level"] = log_level
    if budgets is not None:
        doc["budgets"] = budgets
    path.write_text(json.dumps(doc, indent=1))
    load_gateway_settings(str(path), env={})  # invalid: fail here, not in the subprocess
    return str(path)


def budgets_section(devchain: dict[str, Any], store_url: str, prefix: str) -> dict[str, Any]:
    asset = devchain["tokens"]["OPG"]["address"]
    net = devchain["network"]
    agents = [{"agent": a["address"], "network": net, "asset": asset,
               "limits": [{"period": "day", "amount": str(HUGE)}], "rate_limit": {"per_minute": 1_000_000},
               "group": "bench-team"} for a in devchain["accounts"]["agents"]]
    group = {"group_name": "bench-team", "network": net, "asset": asset,
             "limits": [{"period": "day", "amount": str(HUGE)}]}
    return {"store_url": store_url, "store_prefix": prefix, "timezone": "UTC", "default": "deny",
            "policies": agents + [group]}


async def gateway_part(args: argparse.Namespace, ctx: dict[str, Any], stack: contextlib.ExitStack) -> dict[str, Any]:
    log_dir: Path = ctx["dir"]
    chain = start_chain(args.agents)
    stack.callback(chain.stop)
    devchain = chain.description
    dc_file = str(log_dir / "devchain.json")
    Path(dc_file).write_text(json.dumps(devchain))
    up = upstream_proc(log_dir).start()
    stack.callback(up.stop)
    fac = standin_proc(log_dir).start()
    stack.callback(fac.stop)
    env = {"BUDGETS_ADMIN_TOKEN": "bench-" + ctx["run_id"]}
    configs = {
        "no budgets": None,
        "budgets, SQLite": budgets_section(devchain, f"sqlite://{log_dir}/gw-budgets.sqlite3", f"bench:{ctx['run_id']}:"),
        "budgets, Redis": budgets_section(devchain, ctx["redis"].url, f"bench:{ctx['run_id']}:gw:"),
        "budgets, Redis, leases": budgets_section(devchain, ctx["redis"].url, f"bench:{ctx['run_id']}:gwl:")
        | {"lease_calls": args.lease_calls},
    }
    gws = {}
    for i, (name, section) in enumerate(configs.items()):
        cfg = write_gateway_config(log_dir / f"gateway-{i}.json", devchain, dc_file, up.url, fac.url, section,
                                   args.log_level)
        gws[name] = gateway_proc(log_dir, f"gateway-{i}", dc_file, config=cfg, env=env).start()
        stack.callback(gws[name].stop)
    first = next(iter(gws.values()))
    accepted, resource = offered_requirement(first.url, devchain["tokens"]["OPG"]["address"])
    keys = [a["private_key"] for a in devchain["accounts"]["agents"]]
    pools = {name: PaymentPool(PaymentSigner(devchain, accepted, resource, keys)) for name in gws}
    runs = []
    names = list(gws)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for conc in (1, args.gw_conc):
            for name in order:
                gw = gws[name]
                n = args.gw_lat_n if conc == 1 else args.gw_tp_max
                warm = 10 if conc == 1 else 2 * conc
                pools[name].ensure(n + warm)
                pids = {"client": None, "gateway": gw.pid, "upstream": up.pid, "facilitator_standin": fac.pid}
                if "Redis" in name:
                    pids["redis"] = ctx["redis"].pid
                if "Redis" in name:
                    await redis_stats(ctx, reset=True)
                out = await measure(Target(name, gw.url + CHAT, True, pools[name], pids), conc, max_ops=n,
                                    max_seconds=args.gw_seconds if conc > 1 else args.gw_seconds * 3, warmup=warm)
                row = {"rep": rep, "gateway": name, "concurrency": conc, **out.summary}
                if "Redis" in name:  # the gateway's only Redis work here is budgets (records: memory://)
                    stats = await redis_stats(ctx)
                    calls = out.summary["ops"] + warm
                    row["redis_script_usec_per_call"] = sum(stats[c]["usec"] for c in ("evalsha", "eval")
                                                            if c in stats) / calls
                    row["redis_scripts_per_call"] = sum(stats[c]["calls"] for c in ("evalsha", "eval")
                                                        if c in stats) / calls
                if out.first_errors:
                    row["first_errors"] = out.first_errors
                if conc == 1:
                    row["added"] = added_latency(out.samples)
                runs.append(row)
                print(f"gateway rep {rep} c={conc:<3} {name:<16} {row['ops_per_s']:>8,.1f}/s p50 {row['p50_ms']:.3f} ms "
                      f"p99 {row['p99_ms']:.3f} ms ok {row['ok']}/{row['ops']}"
                      + (f" {row['failures']}" if row["failures"] else ""), flush=True)
    for gw in gws.values():
        gw.stop()
    return {"runs": runs, "payments_used": {k: p.used for k, p in pools.items()}}


# =============================================================================================


async def run_benchmark(args: argparse.Namespace, ctx: dict[str, Any], stack: contextlib.ExitStack) -> dict[str, Any]:
    t0 = time.monotonic()
    stores = args.stores.split(",")
    ops = args.ops.split(",")
    concs = [int(c) for c in args.conc.split(",")]
    store_runs = []
    for rep in range(args.reps):
        for kind in (stores if rep % 2 == 0 else stores[::-1]):
            for op in ops:
                for conc in concs:
                    if op in ("evalsha", "evalsha-redis-py", "enforcer-leases") and kind != "redis":
                        continue
                    row = await store_run(kind, op, conc, ctx, rep, args)
                    store_runs.append(row)
                    print(f"store rep {rep} {kind:<6} {op:<15} c={conc:<3} {row['ops_per_s']:>9,.0f}/s "
                          f"p50 {row['p50_ms']:.3f} ms p99 {row['p99_ms']:.3f} ms ok {row['ok']}/{row['ops']}"
                          + (f" {row['failures']}" if row["failures"] else ""), flush=True)
    scaling_holds: list[dict[str, Any]] = []
    scaling_counters: list[dict[str, Any]] = []
    if not args.skip_scaling:
        for kind in stores:
            scaling_holds += await holds_scaling(kind, ctx, args)
        if "sqlite" in stores:
            scaling_counters = await counters_scaling(ctx, args)
        for r in scaling_holds + scaling_counters:
            print("scaling", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    gateway = None if args.skip_gateway else await gateway_part(args, ctx, stack)
    return {"store_runs": store_runs, "scaling_holds": scaling_holds, "scaling_counters": scaling_counters,
            "gateway": gateway, "redis_version": ctx["redis"].version, "elapsed_s": time.monotonic() - t0}


# =============================================================================================
# Report


def _vs_floor(row: dict[str, Any], runs: list[dict[str, Any]], floor: str = "evalsha") -> float:
    """ops/s of `row` over the trivial EVALSHA's at the same concurrency in the same repetition."""
    base = [r for r in runs if r["store"] == "redis" and r["op"] == floor and r["rep"] == row["rep"]
            and r["concurrency"] == row["concurrency"]]
    return row["ops_per_s"] / base[0]["ops_per_s"] if base and base[0]["ops_per_s"] else float("nan")


def summarize(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    sr = res["store_runs"]
    keys = sorted({(r["store"], r["op"], r["concurrency"]) for r in sr},
                  key=lambda k: (args.stores.split(",").index(k[0]), args.ops.split(",").index(k[1]), k[2]))
    for store, op, conc in keys:
        sel = [r for r in sr if (r["store"], r["op"], r["concurrency"]) == (store, op, conc)]
        rows.append({"store": store, "op": op, "concurrency": conc, "reps": len(sel),
                     "ops_per_s": median(r["ops_per_s"] for r in sel), "p50_ms": median(r["p50_ms"] for r in sel),
                     "p99_ms": median(r["p99_ms"] for r in sel), "ok": sum(r["ok"] for r in sel),
                     "ops": sum(r["ops"] for r in sel),
                     "client_cpu_us": median(r["cpu_us_per_op"].get("client") or float("nan") for r in sel),
                     "redis_cpu_us": median((r["cpu_us_per_op"].get("redis") or float("nan")) for r in sel)
                     if store == "redis" else None,
                     "redis_usec_per_op": median(r.get("redis_usec_per_op", float("nan")) for r in sel)
                     if store == "redis" else None,
                     "redis_scripts_per_op": median(r.get("redis_scripts_per_op", float("nan")) for r in sel)
                     if store == "redis" else None,
                     "redis_sadd_per_op": median(r.get("redis_sadd_per_op", float("nan")) for r in sel)
                     if store == "redis" else None,
                     "round_trips_per_op": median(r.get("round_trips_per_op", float("nan")) for r in sel)
                     if store == "redis" else None,
                     "redis_commands_per_op": median(r.get("redis_commands_per_op", float("nan")) for r in sel)
                     if store == "redis" else None,
                     "vs_evalsha": median(_vs_floor(r, sr) for r in sel) if store == "redis" else None,
                     "vs_evalsha_redis_py": median(_vs_floor(r, sr, "evalsha-redis-py") for r in sel)
                     if store == "redis" else None,
                     "windows": f"{sel[0]['windows_per_reserve']} / {sel[0]['windows_per_commit']}"})
    out: dict[str, Any] = {"stores": rows}
    g = res.get("gateway")
    if g:
        runs = g["runs"]
        names = list(dict.fromkeys(r["gateway"] for r in runs))
        table = []
        for name in names:
            lat = [r for r in runs if r["gateway"] == name and r["concurrency"] == 1]
            tp = [r for r in runs if r["gateway"] == name and r["concurrency"] == args.gw_conc]
            d50, d99, dset, dtp, dver = [], [], [], [], []
            for r in lat:
                base = [b for b in runs if b["gateway"] == "no budgets" and b["concurrency"] == 1 and b["rep"] == r["rep"]]
                if base:
                    d50.append(r["p50_ms"] - base[0]["p50_ms"])
                    d99.append(r["p99_ms"] - base[0]["p99_ms"])
                    dset.append(r["added"]["settle_p50_ms"] - base[0]["added"]["settle_p50_ms"])
                    dver.append(r["added"]["added_p50_ms"] - base[0]["added"]["added_p50_ms"])
            for r in tp:
                base = [b for b in runs if b["gateway"] == "no budgets" and b["concurrency"] == args.gw_conc
                        and b["rep"] == r["rep"]]
                if base and base[0]["ops_per_s"]:
                    dtp.append(r["ops_per_s"] / base[0]["ops_per_s"])
            table.append({
                "gateway": name,
                "p50_ms": median(r["p50_ms"] for r in lat), "p99_ms": median(r["p99_ms"] for r in lat),
                "d_p50_ms": median(d50), "d_p99_ms": median(d99), "d_p50_per_rep": d50,
                "d_settle_p50_ms": median(dset), "d_added_p50_ms": median(dver),
                "tp": median(r["ops_per_s"] for r in tp), "tp_ratio": median(dtp), "tp_ratio_per_rep": dtp,
                "tp_p50_ms": median(r["p50_ms"] for r in tp),
                "gw_cpu_us": median(r["cpu_us_per_op"].get("gateway") or float("nan") for r in tp),
                "redis_cpu_us": (median((r["cpu_us_per_op"].get("redis") or float("nan")) for r in tp)
                                 if "Redis" in name else None),
                "redis_script_us": (median(r.get("redis_script_usec_per_call", float("nan")) for r in tp)
                                    if "Redis" in name else None),
                "redis_scripts": (median(r.get("redis_scripts_per_call", float("nan")) for r in tp)
                                  if "Redis" in name else None),
                "ok": sum(r["ok"] for r in lat + tp), "ops": sum(r["ops"] for r in lat + tp),
            })
        out["gateway"] = table
    return out


def render(data: dict[str, Any], args: argparse.Namespace) -> str:
    s, m, res = data["summary"], data["machine"], data["result"]
    label = {"reserve+commit": "reserve + commit", "reserve": "reserve alone",
             "enforcer": "enforcer: precheck + reserve + commit",
             "enforcer-leases": "enforcer with leases (budgets/leases.py)", "evalsha": "trivial EVALSHA (floor)",
             "evalsha-redis-py": "trivial EVALSHA, redis-py's client (the floor before storage/resp.py)"}
    rows = []
    for r in s["stores"]:
        cpu = f"client {fmt(r['client_cpu_us'])}" + (f", redis {fmt(r['redis_cpu_us'])}" if r["redis_cpu_us"] is not None else "")
        rs = ("—" if r["redis_usec_per_op"] is None else
              f"{fmt(r['redis_usec_per_op'])} µs: {r['redis_scripts_per_op']:.1f} scripts")
        redis_row = r["store"] == "redis"
        rows.append([r["store"], label[r["op"]], r["concurrency"], fmt(r["ops_per_s"]),
                     f"{r['vs_evalsha']:.3f}×" if redis_row else "—",
                     f"{r['vs_evalsha_redis_py']:.3f}×" if redis_row else "—", fmt(r["p50_ms"], 3),
                     fmt(r["p99_ms"], 3), f"{r['ok']}/{r['ops']}", cpu, rs,
                     f"{r['round_trips_per_op']:.2f}" if redis_row else "—",
                     f"{r['redis_commands_per_op']:.1f}" if redis_row else "—", r["windows"]])
    lines = [
        f"### Budgets benchmark — {data['finished']}", "",
        f"`loadtests/bench_budgets.py {' '.join(sys.argv[1:])}` — {data['elapsed_s']:.0f} s. {args.reps} repetitions, "
        f"medians shown. SQLite: a WAL file in a temporary directory (the embedded store). Redis: {res['redis_version']}, "
        "a private server on a free loopback port (`--save \"\" --appendonly no`); the project's client "
        "(storage/redis_client.py: scripts on one multiplexed connection with hiredis, storage/resp.py; "
        "other commands redis-py asyncio, pool of 64). "
        "Event loop uvloop.", "",
        "#### Machine", "", md_machine(m), "",
        "#### Budget store operations", "",
        "Every operation is an agent + group check built by `BudgetEnforcer.checks` (agent: daily limit + rate "
        "limit; group: daily limit; commits count in every window, as the enforcer does). 256 agents in 16 groups, "
        f"fresh ids per run; each run bounded by {args.store_seconds:g} s and {args.store_max_ops:,} operations "
        f"({args.reserve_max_ops:,} for reserve alone, whose holds stay outstanding until the run ends: at most "
        f"{args.reserve_max_ops // 16} per group). Concurrency 64 = 64 asyncio tasks sharing one store object (the "
        "SQLite store runs each transaction synchronously on the event loop, so its concurrency is nominal). "
        "\"enforcer\" is the gateway's whole per-call budget work through `BudgetEnforcer` with the policies in the "
        "store (cached 1 s). Windows = windows checked at reserve / counted at commit. CPU is µs per operation "
        "of the benchmark process (client: the store's Python side) and of redis-server; Redis execution is its own "
        "time running the Lua scripts (EVALSHA) and the other top-level commands per operation (INFO "
        "commandstats), without network I/O. \"vs trivial EVALSHA\": ops/s over a `return 1` script's "
        "through the same client at the same concurrency (same repetition); \"vs redis-py EVALSHA\": over the same script "
        "through redis-py's own client and Script (the floor as the issue measured it, before the project's scripts "
        "ran on one multiplexed connection: storage/resp.py). Round trips: commands sent per operation (counted at "
        "the client: redis-py's and the multiplexed scripts').", "",
        md_table(["store", "operation", "concurrency", "ops/s", "vs trivial EVALSHA", "vs redis-py EVALSHA", "p50 ms",
                  "p99 ms", "ok",
                  "CPU µs/op", "Redis execution per op (commandstats)", "round trips per op",
                  "Redis commands per op (in scripts + top level)", "windows"], rows), "",
    ]
    if res["scaling_holds"]:
        lines += ["#### Reserve latency as reservations accumulate in one group", "",
                  "Reserve alone, sequentially, for distinct agents of one group: every call leaves one more "
                  "outstanding hold in the group (holds live until commit, release or `hold_s`, 600 s by default). "
                  "p50/p99 over the 100 calls starting at the given number of outstanding holds.", "",
                  md_table(["store", "outstanding holds in the group", "reserve p50 ms", "reserve p99 ms"],
                           [[r["store"], f"{r['outstanding_holds']:,}", fmt(r["reserve_p50_ms"], 3),
                             fmt(r["reserve_p99_ms"], 3)] for r in res["scaling_holds"]]), ""]
    if res["scaling_counters"]:
        lines += ["#### SQLite commit latency as the counters table grows", "",
                  "Rows of other agents' (unexpired) window counters inserted directly into a scratch store, then 200 "
                  "reserve + commit pairs of fresh agents, commit timed. The second half repeats it on a scratch file "
                  "with an index on `counters(expires)` that this benchmark creates (the project's schema is unchanged).",
                  "",
                  md_table(["index on counters(expires)", "counter rows", "commit p50 ms", "commit p99 ms"],
                           [["yes" if r["indexed_expires"] else "no (project schema)", f"{r['counter_rows']:,}",
                             fmt(r["commit_p50_ms"], 3), fmt(r["commit_p99_ms"], 3)] for r in res["scaling_counters"]]),
                  ""]
    g = s.get("gateway")
    if g:
        lines += ["#### Added latency of budget enforcement on a paid call", "",
                  "`x402-gateway serve --config FILE` (a JSON file from `dev_settings(...).model_dump(mode=\"json\")`), "
                  "identical but for the `budgets` section: none, SQLite, Redis (per-call holds, and leases of "
                  f"{args.lease_calls} calls: budgets/leases.py); each of the dev chain's "
                  f"{args.agents} agents listed with a daily limit, a rate limit and the group `bench-team` (which has "
                  "its own daily limit), so a call does the agent + group check. The facilitator is the instant "
                  "stand-in of bench_gateway.py (answers verify and settle without work), so the differences are "
                  f"the budget work. Concurrency 1: {args.gw_lat_n} calls back to back; concurrency {args.gw_conc}: "
                  f"{args.gw_seconds:g} s or {args.gw_tp_max:,} calls. Δ = difference from \"no budgets\" in the same "
                  "repetition (median over repetitions). The budget commit runs inside the settle phase "
                  "(Server-Timing `settle`), precheck and reserve outside it.", ""]
        grow = []
        for r in g:
            base = r["gateway"] == "no budgets"
            grow.append([r["gateway"], fmt(r["p50_ms"], 3), fmt(r["p99_ms"], 3),
                         "—" if base else f"{r['d_p50_ms']:+.3f}", "—" if base else f"{r['d_p99_ms']:+.3f}",
                         "—" if base else f"{r['d_added_p50_ms']:+.3f} / {r['d_settle_p50_ms']:+.3f}",
                         fmt(r["tp"]), "—" if base else f"{r['tp_ratio'] * 100:.0f} %",
                         fmt(r["gw_cpu_us"]) + (f" (+ redis {fmt(r['redis_cpu_us'])})" if r["redis_cpu_us"] else ""),
                         "—" if r.get("redis_script_us") is None else
                         f"{fmt(r['redis_script_us'])} µs: {r['redis_scripts']:.2f} scripts",
                         f"{r['ok']}/{r['ops']}"])
        lines += [md_table(["gateway", "p50 ms (c=1)", "p99 ms (c=1)", "Δ p50 ms", "Δ p99 ms",
                            "Δ p50 outside / inside settle ms", f"calls/s (c={args.gw_conc})", "vs no budgets",
                            f"gateway CPU µs/call (c={args.gw_conc})",
                            f"Redis script time per call (c={args.gw_conc}, commandstats)", "ok"], grow), ""]
        pu = res["gateway"]["payments_used"]
        lines += [f"Payments: {sum(pu.values()):,} distinct Permit2 payloads signed before timing.", ""]
    return "\n".join(lines)


# =============================================================================================


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--stores", default="sqlite,redis")
    p.add_argument("--ops", default="reserve+commit,reserve,enforcer,enforcer-leases,evalsha,evalsha-redis-py")
    p.add_argument("--lease-calls", type=int, default=16, help="calls per lease in the leased rows")
    p.add_argument("--conc", default="1,64")
    p.add_argument("--store-seconds", type=float, default=1.5, help="time bound of each store run")
    p.add_argument("--store-max-ops", type=int, default=3000)
    p.add_argument("--reserve-max-ops", type=int, default=1600, help="count bound of reserve-alone runs")
    p.add_argument("--scale-holds", type=int, default=1600, help="outstanding holds reached by the scaling run")
    p.add_argument("--scale-seconds", type=float, default=10.0, help="time bound of each holds-scaling run")
    p.add_argument("--counter-rows", default="0,20000,100000", help="counters table sizes for the SQLite commit scaling")
    p.add_argument("--gw-conc", type=int, default=16)
    p.add_argument("--gw-lat-n", type=int, default=300)
    p.add_argument("--gw-tp-max", type=int, default=5000)
    p.add_argument("--gw-seconds", type=float, default=3.0)
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--log-level", default="info", help="gateway log level (info is the default of `serve`)")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--skip-gateway", action="store_true")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    args.counter_rows = [int(x) for x in str(args.counter_rows).split(",")]

    install_sigterm_handler()
    machine = machine_info()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="x402-bench-budgets-") as tmp, contextlib.ExitStack() as stack:
        redis = RedisProc(Path(tmp)).start()
        stack.callback(redis.stop)
        ctx = {"dir": Path(tmp), "redis": redis, "run_id": new_run_id()}
        with event_loop_runner() as runner:
            result = runner.run(run_benchmark(args, ctx, stack))
        stack.close()
    machine["loadavg_end"] = list(os.getloadavg())
    machine["redis_server"] = result["redis_version"]
    data = {"kind": "budgets", "finished": now_iso(), "elapsed_s": time.monotonic() - started,
            "args": dict(vars(args)), "machine": machine, "result": result}
    data["summary"] = summarize(result, args)
    md = render(data, args)
    print(md)
    if not args.no_write:
        for path in write_results("budgets", data, md + "\n"):
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
