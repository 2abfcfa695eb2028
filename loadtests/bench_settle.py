#!/usr/bin/env python
"""Settle benchmark: settlements per second on the local dev chain with our facilitator.

    .venv/bin/python loadtests/bench_settle.py [--help]

For each mode (in-process `Facilitator.settle`, and HTTP `POST /settle` to an
`x402-facilitator serve` process with 1 worker), each number of signer keys (--keys, default 1
and 3; the facilitator round-robins them, one nonce lock per key) and each concurrency (--conc,
default 1 and 16), settles --payments fresh payments (half Permit2/OPG, half EIP-3009/USDC, signed
by the official x402 client), each exactly once, --reps times. Reports settles/s and p50/p99
latency (request to response, which includes waiting for the receipt; anvil mines each
transaction on arrival), and checks the money: the payee's balance delta per token must equal
the sum of the amounts of the successful settlements, every success has its own transaction
hash, and the signer keys sent exactly that many transactions. After the timed runs a few
payments are settled a second time: they must return the first transaction and move nothing.
Every run gets a fresh anvil (same deterministic deployment, so the payments signed once are valid
on each): anvil's cost per transaction grows with the length of the chain (loadtests/README.md).
Writes loadtests/results/settle-<date>.{json,md} and LATEST-settle.md. Loads go to 127.0.0.1
only; every loop is bounded; anvil and serve processes are always stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

SYMBOLS = ("OPG", "USDC")  # Permit2, EIP-3009


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("values must be >= 1")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--payments", type=int, default=300,
                   help="payments settled per configuration and repetition (default 300, half per method)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per configuration (default 3)")
    p.add_argument("--conc", type=int_list, default=[1, 16], help="concurrencies (default 1,16)")
    p.add_argument("--keys", type=int_list, default=[1, 3], help="numbers of signer keys (default 1,3)")
    p.add_argument("--modes", default="inprocess,http", help="inprocess,http (default both)")
    p.add_argument("--agents", type=int, default=8, help="agent wallets paying (default 8)")
    p.add_argument("--seconds", type=float, default=30.0, help="time cap of one run (default 30 s)")
    p.add_argument("--store", default="memory://",
                   help="settlement store: memory:// (default) or e.g. redis://127.0.0.1:6379/0 "
                        "(a unique key prefix per run, deleted at the end)")
    p.add_argument("--resettle", type=int, default=10, help="payments settled a second time at the end (default 10)")
    p.add_argument("--no-write", action="store_true", help="print only; do not write loadtests/results/")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(args.modes) <= {"inprocess", "http"} or not args.modes:
        p.error("--modes takes inprocess and/or http")
    if args.payments < 2 or args.reps < 1 or args.agents < 1:
        p.error("--payments >= 2, --reps >= 1, --agents >= 1")
    return args


# ---------------------------------------------------------------------------------------------


def balances(rpc: Any, d: dict[str, Any], who: list[str]) -> dict[str, dict[str, int]]:
    """{symbol: {address: balance}} and {"nonce": {address: tx count}}, one JSON-RPC batch."""
    from devtools.devchain import calldata

    calls, keys = [], []
    for sym in SYMBOLS:
        for a in who:
            data = "0x" + calldata("balanceOf(address)", ["address"], [a]).hex()
            calls.append(("eth_call", [{"to": d["tokens"][sym]["address"], "data": data}, "latest"]))
            keys.append((sym, a))
    for a in who:
        calls.append(("eth_getTransactionCount", [a, "latest"]))
        keys.append(("nonce", a))
    out: dict[str, dict[str, int]] = {}
    for (group, a), value in zip(keys, rpc.batch(calls), strict=True):
        out.setdefault(group, {})[a] = int(value, 16)
    return out


class SettleRun:
    """One configuration: a facilitator (in-process or served) with k keys, at concurrency c."""

    def __init__(self, mode: str, keys: int, conc: int) -> None:
        self.mode, self.keys, self.conc = mode, keys, conc

    @property
    def label(self) -> str:
        return f"{self.mode} keys={self.keys} c={self.conc}"


async def run_config(args: argparse.Namespace, d: dict[str, Any], rpc: Any, payments: list[C.SignedPayment],
                     run: SettleRun, settle: Any, cpu: C.CpuMeter, signer_addresses: list[str]) -> dict[str, Any]:
    payee = d["accounts"]["payee"]["address"]
    before = balances(rpc, d, [payee, *signer_addresses])
    outcomes: list[tuple[C.SignedPayment, dict[str, Any]]] = []

    async def op(pay: C.SignedPayment) -> tuple[bool, str]:
        resp = await settle(pay)
        outcomes.append((pay, resp))
        return bool(resp.get("success")), resp.get("errorReason") or ""

    r = await C.run_load(op, iter(payments), concurrency=run.conc, max_ops=len(payments), max_seconds=args.seconds,
                         cpu=cpu)
    after = balances(rpc, d, [payee, *signer_addresses])
    ok = [(p, resp) for p, resp in outcomes if resp.get("success")]
    tx_hashes = {resp.get("transaction") for _, resp in ok}
    check: dict[str, Any] = {"tokens": {}}
    all_ok = True
    for sym in SYMBOLS:
        expected = sum(p.amount for p, _ in ok if p.symbol == sym)
        delta = after[sym][payee] - before[sym][payee]
        check["tokens"][sym] = {"settled": sum(1 for p, _ in ok if p.symbol == sym), "sum_amounts": expected,
                                "payee_delta": delta, "match": delta == expected}
        all_ok &= delta == expected
    txs_sent = sum(after["nonce"][a] - before["nonce"][a] for a in signer_addresses)
    per_key = {a: after["nonce"][a] - before["nonce"][a] for a in signer_addresses}
    check.update({"successes": len(ok), "distinct_tx_hashes": len(tx_hashes), "signer_txs_sent": txs_sent,
                  "signer_txs_per_key": per_key,
                  "unique_tx_per_success": len(tx_hashes) == len(ok), "txs_equal_successes": txs_sent == len(ok)})
    all_ok &= len(tx_hashes) == len(ok) and txs_sent == len(ok)
    check["ok"] = all_ok
    summary = r.summary() | {"money_check": check, "amounts_attempted": sum(p.amount for p in payments[: r.ops])}
    summary["_outcomes"] = outcomes  # removed before writing; used by the re-settle check
    return summary


def same_deployment(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two dev chains with the same contracts, tokens and accounts (only the RPC URL differs), so
    a payment signed for one is valid on the other."""
    strip = lambda d: {k: v for k, v in d.items() if k != "rpc_url"}  # noqa: E731
    return strip(a) == strip(b)


@contextlib.asynccontextmanager
async def facilitator_for(mode: str, d: dict[str, Any], keys: list[str], store_url: str, store_prefix: str,
                          anvil_pid: int | None, conc: int) -> AsyncIterator[tuple[Any, C.CpuMeter]]:
    """(settle(payment) -> wire SettleResponse dict, CPU meter) for a fresh facilitator."""
    import aiohttp
    import orjson

    from facilitator.app import build_facilitator
    from facilitator.settings import devchain_overlay, load_settings
    from facilitator.x402.types import SettleRequest

    if mode == "inprocess":
        fac = build_facilitator(load_settings(None, env={}, overrides=devchain_overlay(d) | {
            "store_url": store_url, "store_prefix": store_prefix, "signer_keys": keys}))

        async def settle(pay: C.SignedPayment) -> dict[str, Any]:
            resp = await fac.settle(SettleRequest.model_validate(pay.body))
            return resp.model_dump(by_alias=True, exclude_none=True)

        try:
            yield settle, C.CpuMeter({"bench process": None, "anvil": anvil_pid})
        finally:
            await fac.close()
        return
    with C.ServeProcess(d, store_url=store_url, store_prefix=store_prefix, signer_keys=keys) as serve:
        url = serve.url + "/settle"
        headers = {"Content-Type": "application/json"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc),
                                         timeout=aiohttp.ClientTimeout(total=60)) as session:

            async def settle(pay: C.SignedPayment) -> dict[str, Any]:
                async with session.post(url, data=pay.body_bytes, headers=headers) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        return {"success": False, "errorReason": f"http_{resp.status}"}
                return orjson.loads(raw)

            yield settle, C.CpuMeter({"client (bench process)": None,
                                      "serve": serve.proc.pid if serve.proc else None, "anvil": anvil_pid})


async def main_async(args: argparse.Namespace, data: dict[str, Any]) -> None:
    from devtools.devchain import DevChain
    from devtools.rpc import BlockingRpc

    n_keys = max(args.keys)
    with DevChain(agents=args.agents, facilitators=n_keys) as ref:
        d0 = ref.description
    n_total = args.payments * len(args.modes) * len(args.keys) * len(args.conc) * args.reps
    t0 = time.perf_counter()
    signed: dict[str, list[C.SignedPayment]] = {}
    for i, sym in enumerate(SYMBOLS):
        # distinct amounts so a wrong transfer cannot hide in a sum of equal values
        signed[sym] = await C.sign_payments(d0, sym, (n_total + 1) // 2 + 1, agents=args.agents,
                                            amount=lambda j, i=i: 1000 + 2 * j + i)
    print(f"signed {sum(map(len, signed.values()))} payments in {time.perf_counter() - t0:.1f} s", flush=True)
    pools = {sym: iter(v) for sym, v in signed.items()}

    def take(n: int) -> list[C.SignedPayment]:
        return [next(pools[SYMBOLS[j % 2]]) for j in range(n)]

    results: dict[str, list[dict[str, Any]]] = {}
    data["runs"] = results
    all_keys = [a["private_key"] for a in d0["accounts"]["facilitator"]]
    all_addrs = [a["address"] for a in d0["accounts"]["facilitator"]]
    for rep in range(args.reps):
        for mode in args.modes:
            for k in args.keys:
                for c in args.conc:
                    run = SettleRun(mode, k, c)
                    # A fresh chain per run: anvil's cost per transaction grows with the chain's length
                    # (README), so runs made later on one chain would be slower for that reason alone.
                    with DevChain(agents=args.agents, facilitators=n_keys) as chain:
                        d = chain.description
                        if not same_deployment(d, d0):
                            raise RuntimeError("a fresh dev chain differs from the one the payments were signed for")
                        store_url, store_prefix = C.store_for_run(args.store, f"{data['run_id']}:{mode}:{k}:{c}:{rep}")
                        rpc = BlockingRpc(d["rpc_url"])
                        try:
                            async with facilitator_for(mode, d, all_keys[:k], store_url, store_prefix, chain.pid,
                                                       c) as (settle, cpu):
                                s = await run_config(args, d, rpc, take(args.payments), run, settle, cpu,
                                                     all_addrs[:k])
                                report_line(rep, run, s)
                                outcomes = [(run.label, p, r) for p, r in s.pop("_outcomes") if r.get("success")]
                                results.setdefault(run.label, []).append(s)
                                if (args.resettle and rep == args.reps - 1 and k == n_keys and c == max(args.conc)
                                        and outcomes):
                                    step = max(1, len(outcomes) // args.resettle)
                                    data.setdefault("resettle", {})[mode] = await resettle_check(
                                        d, rpc, outcomes[::step][: args.resettle], settle, all_addrs, mode)
                        finally:
                            rpc.close()
                            await C.purge_redis_prefix(store_url, store_prefix)


async def resettle_check(d: dict[str, Any], rpc: Any, pool: list[tuple[str, C.SignedPayment, dict[str, Any]]],
                         settle: Any, signer_addresses: list[str], mode: str) -> dict[str, Any]:
    """Settle already-settled payments again (through the same service, same store): the answer
    must carry the first transaction hash, and neither the payee nor the signers may move."""
    payee = d["accounts"]["payee"]["address"]
    before = balances(rpc, d, [payee, *signer_addresses])
    same = 0
    for _, pay, first in pool:
        again = await settle(pay)
        same += bool(again.get("success")) and again.get("transaction") == first.get("transaction")
    after = balances(rpc, d, [payee, *signer_addresses])
    moved = {sym: after[sym][payee] - before[sym][payee] for sym in SYMBOLS}
    txs = sum(after["nonce"][a] - before["nonce"][a] for a in signer_addresses)
    out = {"payments": len(pool), "same_transaction_returned": same, "payee_delta": moved, "signer_txs_sent": txs,
           "ok": same == len(pool) and not any(moved.values()) and txs == 0}
    print(f"  {mode}: re-settle {len(pool)} settled payments: same tx {same}/{len(pool)}, payee moved {moved}, "
          f"new txs {txs} -> {'OK' if out['ok'] else 'FAILED'}", flush=True)
    return out


def report_line(rep: int, run: SettleRun, s: dict[str, Any]) -> None:
    mc = s["money_check"]
    cpu_txt = " ".join(f"{k.split()[0]} {v:.0f}" for k, v in s["cpu_us_per_op"].items() if v is not None)
    print(f"  rep {rep + 1} {run.label:26s} {s['ops_per_s']:8.1f}/s p50 {s['p50_ms']:7.2f} ms "
          f"p99 {s['p99_ms']:7.2f} ms ok {s['ok']}/{s['ops']} cpu µs/op [{cpu_txt}] "
          f"money {'OK' if mc['ok'] else 'MISMATCH ' + str(mc)}"
          f"{' FAIL ' + str(s['failures']) if s['failures'] else ''}", flush=True)


def build_report(data: dict[str, Any]) -> str:
    a = data["args"]
    runs = data.get("runs", {})
    lines = [f"# Settle benchmark — {data['finished']}", "",
             f"`{data['command']}` — {data['duration_s']:.0f} s. Anvil {data['machine']['anvil']} on 127.0.0.1 "
             "(automine: each transaction is mined when it arrives), "
             f"{a['payments']} fresh payments per configuration and repetition (alternating Permit2/OPG and "
             f"EIP-3009/USDC, signed by the official x402 client over {a['agents']} agents), each settled once; "
             f"median of {a['reps']} repetitions. Every run gets a fresh anvil (see Notes). "
             f"Store `{a['store']}` (a fresh key space per configuration). "
             f"Event loop {data['event_loop']}.", "",
             "## Machine", "", C.md_machine(data["machine"]), "",
             "## Settlements", "",
             "Latency is request → response, which includes signing, broadcasting and waiting for the receipt. "
             "CPU columns are CPU time per settlement of each process during the run (client = the benchmark's "
             "aiohttp client in HTTP mode).", ""]
    rows = []
    for label, reps in runs.items():
        mode, keys, conc = label.split(" ")
        procs = list(reps[0]["cpu_us_per_op"])
        cpu_txt = ", ".join(
            f"{p.split()[0]} {C.fmt(C.median((r['cpu_us_per_op'] or {}).get(p) or float('nan') for r in reps))}"
            for p in procs)
        per_key: dict[str, int] = {}
        for r in reps:
            for addr, n in r["money_check"]["signer_txs_per_key"].items():
                per_key[addr] = per_key.get(addr, 0) + n
        rows.append([mode, keys.split("=")[1], conc.split("=")[1],
                     C.fmt(C.median(r["ops_per_s"] for r in reps), 1),
                     C.fmt(C.median(r["p50_ms"] for r in reps), 2), C.fmt(C.median(r["p99_ms"] for r in reps), 2),
                     f"{sum(r['ok'] for r in reps)}/{sum(r['ops'] for r in reps)}", "/".join(map(str, per_key.values())),
                     cpu_txt,
                     "yes" if all(r["money_check"]["ok"] for r in reps) else "**NO**"])
    lines += [C.md_table(["mode", "signer keys", "concurrency", "settles/s", "p50 ms", "p99 ms", "succeeded",
                          "txs per key", "CPU µs/settle", "money check"], rows), ""]
    # money totals
    tot: dict[str, dict[str, int]] = {}
    for reps in runs.values():
        for r in reps:
            for sym, t in r["money_check"]["tokens"].items():
                x = tot.setdefault(sym, {"settled": 0, "sum_amounts": 0, "payee_delta": 0})
                for key in x:
                    x[key] += t[key]
    txs = sum(r["money_check"]["signer_txs_sent"] for reps in runs.values() for r in reps)
    succ = sum(r["money_check"]["successes"] for reps in runs.values() for r in reps)
    lines += ["## Money check (all runs)", "",
              "Payee balance deltas, read on-chain before and after every run, against the sum of the amounts of "
              "the settlements that answered `success: true` (every payment has a distinct amount).", "",
              C.md_table(["token", "settled", "sum of settled amounts", "payee balance delta", "equal"],
                         [[sym, t["settled"], f"{t['sum_amounts']:,}", f"{t['payee_delta']:,}",
                           "yes" if t["sum_amounts"] == t["payee_delta"] else "**NO**"] for sym, t in tot.items()]),
              "", f"Transactions sent by the signer keys: {txs:,} for {succ:,} successful settlements "
              f"({'equal' if txs == succ else '**not equal**'}); every success has its own transaction hash: "
              f"{'yes' if all(r['money_check']['unique_tx_per_success'] for reps in runs.values() for r in reps) else '**no**'}.",
              ""]
    for mode, rs in (data.get("resettle") or {}).items():
        lines += [f"Re-settling {rs['payments']} already-settled payments ({mode}, same facilitator and store) "
                  f"returned the first transaction for {rs['same_transaction_returned']}, moved "
                  f"{rs['payee_delta']} to the payee and sent {rs['signer_txs_sent']} transactions: "
                  f"{'OK' if rs['ok'] else '**FAILED**'}.", ""]
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    C.install_sigterm_handler()
    t_start = time.perf_counter()
    data: dict[str, Any] = {
        "kind": "settle", "run_id": C.new_run_id(), "started": C.now_iso(),
        "command": "loadtests/bench_settle.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args), "machine": C.machine_info(), "event_loop": C.loop_name(), "notes": [
            "Every run starts on a fresh anvil: anvil's CPU cost per transaction grows with the chain's length "
            "(automine, one block per transaction), so later runs on a shared chain would look slower for that "
            "reason alone (loadtests/README.md).",
            "The dev chain mines each transaction as it arrives, so these numbers measure the facilitator's own "
            "cost per settlement (claim, re-check, sign, broadcast, receipt, record) plus anvil's, not a real "
            "network's block time.",
        ],
    }
    print(f"bench_settle: run {data['run_id']}, store {args.store}", flush=True)
    with C.event_loop_runner() as runner:
        runner.run(main_async(args, data))
    data["machine"]["loadavg_end"] = list(__import__("os").getloadavg())
    data["finished"] = C.now_iso()
    data["duration_s"] = time.perf_counter() - t_start
    ok = all(r["money_check"]["ok"] for reps in data.get("runs", {}).values() for r in reps)
    ok &= all(rs["ok"] for rs in (data.get("resettle") or {}).values())
    if not ok:
        data["notes"].append("A MONEY CHECK FAILED: see the JSON file for the run.")
    report = build_report(data)
    print()
    print(report)
    if not args.no_write:
        paths = C.write_results("settle", data, report)
        print("wrote " + ", ".join(str(p.relative_to(C.ROOT)) for p in paths))
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every process this benchmark started has been stopped", file=sys.stderr)
        sys.exit(130)
