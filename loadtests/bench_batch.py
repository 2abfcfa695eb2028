"""batch-settlement benchmark: paid calls per second and latency with vouchers, against a bare
aiohttp reverse proxy in the same run, and gas per paid call against per-call `exact`.

Processes (127.0.0.1, each stopped by pid at the end): a fresh anvil dev chain (DevChain, in this
process), `devtools.upstream` (the fast stand-in upstream), the bare proxy of bench_gateway.py
(Starlette + uvicorn + one aiohttp session, no payment logic), and `x402-gateway serve` with a
batch-settlement block on the chat route (its facilitator in-process, settling on anvil).

Setup (not timed): one payer per concurrent worker opens a channel with an ERC-3009 deposit made
by the official SDK's client helper (USDC), through the gateway; every voucher of the run is then
signed ahead with libsecp256k1 (one payload checked against the SDK's own signer first). Timed:
each worker pays its channel's calls one after another (a channel serves one call at a time; the
next voucher continues from what was charged), `concurrency` channels at once; the bare proxy is
loaded the same way. Added latency at concurrency 1 = gateway p50 − proxy p50.

Gas: every transaction the escrow received during the run (deposits, claims, settles), read from
the blocks, per paid call, with the manager at its claim interval (default 60 s, the shipped
default); against the gas of one `exact` settlement through the same gateway (official client).

Nothing here asserts a timing. Run: `.venv/bin/python loadtests/bench_batch.py` (~2-3 min).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CpuMeter,
    event_loop_runner,
    fmt,
    install_sigterm_handler,
    machine_info,
    md_machine,
    md_table,
    now_iso,
    percentile,
    write_results,
)
from bench_gateway import CHAT, CHAT_BODY, Proc, gateway_proc, proxy_proc, upstream_proc

PRICE = 5_000  # gpt-4o-mini: 0.005 USDC


def sign_digest(key: bytes, digest: bytes) -> str:
    import coincurve

    sig = coincurve.PrivateKey(key).sign_recoverable(digest, hasher=None)
    return "0x" + (sig[:64] + bytes([sig[64] + 27])).hex()


class Channel:
    """One payer's channel on the chat route, paid by hand after an SDK-made deposit."""

    def __init__(self, devchain: dict[str, Any], account: Any, requirement: dict[str, Any]) -> None:
        from x402.mechanisms.evm.batch_settlement.types import ChannelConfig
        from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id

        self.devchain, self.account, self.requirement = devchain, account, requirement
        extra = requirement["extra"]
        self.config = ChannelConfig(payer=account.address, payer_authorizer=account.address,
                                    receiver=requirement["payTo"], receiver_authorizer=extra["receiverAuthorizer"],
                                    token=requirement["asset"], withdraw_delay=extra["withdrawDelay"],
                                    salt="0x" + secrets.token_hex(32))
        self.id = compute_channel_id(self.config, devchain["network"])
        self.headers: collections.deque[dict[str, str]] = collections.deque()

    def deposit_header(self, amount: int) -> dict[str, str]:
        from x402.mechanisms.evm.batch_settlement.client.eip3009 import create_batch_settlement_eip3009_deposit_payload
        from x402.mechanisms.evm.signers import EthAccountSigner
        from x402.schemas import PaymentRequirements

        inner = create_batch_settlement_eip3009_deposit_payload(
            EthAccountSigner(self.account), PaymentRequirements.model_validate(self.requirement), self.config, amount,
            PRICE).to_dict()
        return self._header(inner)

    def presign(self, calls: int) -> None:
        """Vouchers for cumulative 2..calls+1 prices (the deposit's call paid the first)."""
        from facilitator.schemes.evm_batch.channel import voucher_digest

        chain_id, cid, key = self.devchain["chain_id"], bytes.fromhex(self.id[2:]), bytes(self.account.key)
        for n in range(2, calls + 2):
            signature = sign_digest(key, voucher_digest(chain_id, cid, n * PRICE))
            voucher = {"channelId": self.id, "maxClaimableAmount": str(n * PRICE), "signature": signature}
            self.headers.append(self._header({"type": "voucher", "channelConfig": self.config.to_dict(),
                                              "voucher": voucher}))

    def _header(self, inner: dict[str, Any]) -> dict[str, str]:
        import base64

        doc = {"x402Version": 2, "payload": inner, "accepted": self.requirement, "resource": {"url": "http://x" + CHAT}}
        return {"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(doc).encode()).decode(),
                "Content-Type": "application/json"}


def fund_usdc(devchain: dict[str, Any], accounts: list[Any], amount: int) -> None:
    from devtools.devchain import calldata
    from devtools.rpc import BlockingRpc

    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        rpc.batch([("anvil_setBalance", [a.address, hex(10**21)]) for a in accounts])
        token = devchain["tokens"]["USDC"]["address"]
        raw = []
        for a in accounts:
            tx = {"to": token, "data": calldata("mint(address,uint256)", ["address", "uint256"], [a.address, amount]),
                  "gas": 100_000, "chainId": devchain["chain_id"], "type": 2, "nonce": 0, "maxFeePerGas": 10**11,
                  "maxPriorityFeePerGas": 10**9, "value": 0}
            raw.append("0x" + bytes(a.sign_transaction(tx).raw_transaction).hex())
        hashes = rpc.batch([("eth_sendRawTransaction", [r]) for r in raw])
        while not all(rpc.batch([("eth_getTransactionReceipt", [h]) for h in hashes])):
            time.sleep(0.05)
    finally:
        rpc.close()


def escrow_gas(devchain: dict[str, Any], since_block: int) -> dict[str, Any]:
    """Gas of the transactions to the escrow mined after `since_block`, by function."""
    from devtools.rpc import BlockingRpc
    from facilitator.schemes.evm_batch import calldata as bc

    names = {bc.SEL_DEPOSIT: "deposit", bc.SEL_CLAIM_WITH_SIGNATURE: "claim", bc.SEL_SETTLE: "settle",
             bc.SEL_MULTICALL: "multicall", bc.SEL_REFUND_WITH_SIGNATURE: "refund"}
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        latest = int(rpc.call("eth_blockNumber"), 16)
        blocks = rpc.batch([("eth_getBlockByNumber", [hex(n), True]) for n in range(since_block + 1, latest + 1)])
        txs = [tx for b in blocks for tx in b["transactions"]
               if (tx.get("to") or "").lower() == devchain["contracts"]["batch_settlement"].lower()]
        receipts = rpc.batch([("eth_getTransactionReceipt", [tx["hash"]]) for tx in txs]) if txs else []
    finally:
        rpc.close()
    out: dict[str, Any] = {}
    for tx, receipt in zip(txs, receipts, strict=True):
        name = names.get(bytes.fromhex(tx["input"][2:10]), "other")
        entry = out.setdefault(name, {"txs": 0, "gas": 0})
        entry["txs"] += 1
        entry["gas"] += int(receipt["gasUsed"], 16)
    return out


async def exact_gas(gateway_url: str, devchain: dict[str, Any], account: Any) -> int:
    """gasUsed of one `exact` (EIP-3009, USDC) settlement of the chat route, paid by the official client."""
    from x402 import x402Client
    from x402.http import x402HTTPClient
    from x402.http.clients.httpx import x402HttpxClient
    from x402.mechanisms.evm.exact.register import register_exact_evm_client

    from devtools.rpc import BlockingRpc

    client = x402Client()
    register_exact_evm_client(client, account)
    client.set_spend_controls(False)
    usdc = devchain["tokens"]["USDC"]["address"].lower()
    client.register_policy(lambda v, reqs: [r for r in reqs if r.scheme == "exact" and r.asset.lower() == usdc])
    async with x402HttpxClient(client, timeout=60) as http:
        r = await http.post(gateway_url + CHAT, content=CHAT_BODY, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    tx = x402HTTPClient(client).get_payment_settle_response(r.headers.get).transaction
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        return int(rpc.call("eth_getTransactionReceipt", tx)["gasUsed"], 16)
    finally:
        rpc.close()


async def load_channels(url: str, channels: list[Channel], seconds: float) -> dict[str, Any]:
    """Each channel's calls one after another, all channels at once, for `seconds` (or until a
    channel's vouchers run out)."""
    import aiohttp

    latencies: list[float] = []
    failures: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def worker(ch: Channel) -> None:
            while ch.headers and time.perf_counter() < deadline:
                headers = ch.headers[0]
                t0 = time.perf_counter()
                async with http.post(url + CHAT, data=CHAT_BODY, headers=headers) as r:
                    await r.read()
                    status = r.status
                latencies.append(time.perf_counter() - t0)
                if status == 200:
                    ch.headers.popleft()
                else:
                    failures[str(status)] = failures.get(str(status), 0) + 1
                    if len(failures) > 50:
                        return

        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in channels))
        elapsed = time.perf_counter() - started
    ok = len(latencies) - sum(failures.values())
    return {"calls": ok, "failures": failures, "elapsed_s": round(elapsed, 3), "ops_per_s": round(ok / elapsed, 1),
            "p50_ms": round(percentile(latencies, 50) * 1e3, 3), "p99_ms": round(percentile(latencies, 99) * 1e3, 3)}


async def load_proxy(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async def worker() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with http.post(url + CHAT, data=CHAT_BODY, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"calls": len(latencies), "elapsed_s": round(elapsed, 3), "ops_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(percentile(latencies, 50) * 1e3, 3), "p99_ms": round(percentile(latencies, 99) * 1e3, 3)}


async def with_cpu(pid: int | None, load: Any) -> dict[str, Any]:
    """The load's result plus the server process's CPU per call (µs) while it ran."""
    cpu = CpuMeter({"server": pid})
    cpu.start()
    result = await load
    used = cpu.stop()["server"]
    return result | {"cpu_us_per_call": round(used / max(result["calls"], 1) * 1e6, 1)}


def batch_config(path: Path, devchain: dict[str, Any], devchain_file: str, upstream_url: str, authorizer_key: str,
                 claim_interval_s: float) -> str:
    from devtools.devconfig import dev_settings

    doc = dev_settings(devchain, devchain_file=devchain_file, upstream_urls=[upstream_url]).model_dump(
        mode="json", exclude_none=True)
    doc["routes"][0]["batch"] = {"receiver_authorizer_key": authorizer_key, "withdraw_delay_s": 900,
                                 "min_deposit": "10", "claim_interval_s": claim_interval_s,
                                 "settle_interval_s": claim_interval_s, "sync_interval_s": 30.0}
    path.write_text(json.dumps(doc))
    return str(path)


async def run(args: argparse.Namespace, log_dir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    import httpx
    from eth_account import Account

    from devtools.devchain import DevChain, write_description

    chain = DevChain(agents=1, facilitators=2)
    chain.start()
    stack.callback(chain.stop)
    devchain = chain.description
    devchain_file = str(log_dir / "devchain.json")
    write_description(devchain, devchain_file)
    upstream = upstream_proc(log_dir).start()
    stack.callback(upstream.stop)
    proxy = proxy_proc(log_dir, upstream.url).start()
    stack.callback(proxy.stop)
    config = batch_config(log_dir / "batch.json", devchain, devchain_file, upstream.url,
                          "0x" + secrets.token_hex(32), args.claim_interval)
    gateway: Proc = gateway_proc(log_dir, "gateway-batch", devchain_file, config=config, log_level="warning").start()
    stack.callback(gateway.stop)

    async with httpx.AsyncClient(timeout=30) as http:
        unpaid = await http.post(gateway.url + CHAT, content=CHAT_BODY, headers={"Content-Type": "application/json"})
    import base64

    accepts = json.loads(base64.b64decode(unpaid.headers["PAYMENT-REQUIRED"]))["accepts"]
    usdc = devchain["tokens"]["USDC"]["address"].lower()
    requirement = next(q for q in accepts if q["scheme"] == "batch-settlement" and q["asset"].lower() == usdc)

    payers = [Account.create() for _ in range(args.concurrency)]
    deposit = 50 * 10**6  # 50 USDC: 10,000 calls
    fund_usdc(devchain, payers, deposit * 2)
    channels = [Channel(devchain, p, requirement) for p in payers]
    since = int(chain.rpc.call("eth_blockNumber"), 16)
    async with httpx.AsyncClient(timeout=60) as http:
        opened = await asyncio.gather(*(http.post(gateway.url + CHAT, content=CHAT_BODY, headers=c.deposit_header(deposit))
                                        for c in channels))
    assert all(r.status_code == 200 for r in opened), [r.text for r in opened if r.status_code != 200][:2]
    # channel 0 carries the concurrency-1 run (and then joins the others): vouchers for all it can pay
    channels[0].presign(deposit // PRICE - 1)
    for c in channels[1:]:
        c.presign(args.per_channel)

    reps: list[dict[str, Any]] = []
    for _ in range(args.reps):  # interleaved, so a noisy spell of the VM hits both sides of a ratio
        rep: dict[str, Any] = {}
        rep["proxy_c1"] = await with_cpu(proxy.pid, load_proxy(proxy.url, 1, args.seconds))
        rep["batch_c1"] = await with_cpu(gateway.pid, load_channels(gateway.url, channels[:1], args.seconds))
        rep["proxy_c32"] = await with_cpu(proxy.pid, load_proxy(proxy.url, args.concurrency, args.seconds))
        rep["batch_c32"] = await with_cpu(gateway.pid, load_channels(gateway.url, channels, args.seconds))
        rep["ratio_c32"] = round(rep["batch_c32"]["ops_per_s"] / rep["proxy_c32"]["ops_per_s"], 3)
        rep["cpu_ratio_c32"] = round(rep["batch_c32"]["cpu_us_per_call"] / rep["proxy_c32"]["cpu_us_per_call"], 3)
        rep["added_p50_ms_c1"] = round(rep["batch_c1"]["p50_ms"] - rep["proxy_c1"]["p50_ms"], 3)
        reps.append(rep)
    paid = sum(r["batch_c1"]["calls"] + r["batch_c32"]["calls"] for r in reps) + len(channels)  # + the deposits' calls

    # gas: wait for the manager's next claim and settle (its interval), then read the blocks
    deadline = time.monotonic() + args.claim_interval * 2 + 30
    while time.monotonic() < deadline:
        gas = escrow_gas(devchain, since)
        if "claim" in gas and "settle" in gas:
            break
        await asyncio.sleep(1.0)
    await asyncio.sleep(2.0)
    gas = escrow_gas(devchain, since)
    exact = await exact_gas(gateway.url, devchain, Account.from_key(devchain["accounts"]["agents"][0]["private_key"]))
    total = sum(v["gas"] for v in gas.values())
    claims_settles = sum(v["gas"] for k, v in gas.items() if k in ("claim", "settle"))
    return {"reps": reps, "results": reps[len(reps) // 2], "paid_calls": paid,
            "ratio_c32_median": statistics.median(r["ratio_c32"] for r in reps),
            "added_p50_ms_c1_median": statistics.median(r["added_p50_ms_c1"] for r in reps),
            "cpu_ratio_c32_median": statistics.median(r["cpu_ratio_c32"] for r in reps), "gas": gas, "gas_total": total,
            "gas_per_call": round(total / paid, 1), "gas_per_call_claims_settles": round(claims_settles / paid, 1),
            "exact_gas_per_call": exact, "channels": len(channels), "deposit_usdc": deposit / 1e6}


def render(data: dict[str, Any]) -> str:
    rows = [(f"{n + 1}: {name}", fmt(v["ops_per_s"], 1), fmt(v["p50_ms"], 3), fmt(v["p99_ms"], 3), v["calls"],
             fmt(v["cpu_us_per_call"], 0))
            for n, rep in enumerate(data["reps"]) for name, v in rep.items() if isinstance(v, dict)]
    ratio, added = data["ratio_c32_median"], data["added_p50_ms_c1_median"]
    each = ", ".join(f"{r['ratio_c32']:.2f}×" for r in data["reps"])
    each_added = ", ".join(f"{r['added_p50_ms_c1']:.3f}" for r in data["reps"])
    gas_rows = [(k, v["txs"], f"{v['gas']:,}") for k, v in sorted(data["gas"].items())]
    return "\n".join([
        f"# batch-settlement benchmark ({data['when']})", "",
        md_machine(data["machine"]), "",
        f"Claim interval {data['args']['claim_interval']} s; {data['channels']} channels of "
        f"{data['deposit_usdc']} USDC each; {data['args']['seconds']} s per measurement, {len(data['reps'])} "
        "repetitions, each measuring the proxy and the gateway in turn. Gas per call counts the deposits (one per "
        "channel, amortised over this short run's calls only).", "",
        md_table(["repetition: target", "calls/s", "p50 ms", "p99 ms", "calls", "server CPU µs/call"], rows), "",
        f"- vouchers at concurrency {data['args']['concurrency']}: **{ratio:.2f}×** the bare aiohttp proxy's throughput "
        f"(median; each repetition: {each})",
        f"- added p50 at concurrency 1 (gateway − bare proxy): **{added:.3f} ms** (median; each: {each_added} ms)",
        f"- the gateway's CPU per voucher call at concurrency {data['args']['concurrency']}: "
        f"**{data['cpu_ratio_c32_median']:.2f}×** the bare proxy's per call (median; each: "
        + ", ".join(f"{r['cpu_ratio_c32']:.2f}×" for r in data["reps"]) + ")", "",
        md_table(["escrow function", "transactions", "gas"], gas_rows), "",
        f"- paid calls: {data['paid_calls']:,}; escrow gas per paid call: **{data['gas_per_call']:,}** "
        f"(claims + settles only: {data['gas_per_call_claims_settles']:,})",
        f"- one `exact` settlement (EIP-3009): {data['exact_gas_per_call']:,} gas per call: "
        f"**{data['exact_gas_per_call'] / max(data['gas_per_call'], 1e-9):,.0f}×** more than a voucher call", "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--claim-interval", type=float, default=60.0, help="the manager's claim/settle interval")
    p.add_argument("--per-channel", type=int, default=1500, help="vouchers signed ahead per channel (concurrency run)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (medians are reported)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    install_sigterm_handler()
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp, contextlib.ExitStack() as stack:
        machine = machine_info()
        with event_loop_runner() as runner:
            data = runner.run(run(args, Path(tmp), stack))
        machine["loadavg_end"] = list(__import__("os").getloadavg())
        data |= {"when": now_iso(), "machine": machine, "args": vars(args)}
        text = render(data)
        print(text)
        if not args.no_write:
            for path in write_results("batch", data, text):
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
