"""Gas and transactions per paid call: upto sessions against one settlement per call.

The same metered chat completions (same prompts, same usage, same prices) are paid two ways on
the dev chain, in the same run: (a) `upto` per call — every call signs a permit and is settled on
its own; (b) `upto` sessions — one permit opens a session, later calls present `X-Upto-Session`,
and the session is settled once when idle. Counted from the chain: settlement transactions, gas
used, and the amount moved to the payee (which must equal the sum of the metered charges).

    .venv/bin/python loadtests/bench_sessions.py [--calls 50] [--concurrency 4]

Writes loadtests/results/sessions-<date>.{md,json} and LATEST-sessions.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import uvicorn
from eth_account import Account

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.devchain import DevChain, calldata, write_description
from devtools.devconfig import dev_settings
from devtools.upstream import create_upstream_app
from facilitator.x402.headers import decode_payment_required, encode_payment_payload
from facilitator.x402.types import PaymentPayload
from gateway.app import create_app

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "summarise the settlement model in a sentence"}]}


async def serve(app) -> tuple[uvicorn.Server, asyncio.Task, int]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn.Server has a `started` flag, no event
        await asyncio.sleep(0.01)
    return server, task, server.servers[0].sockets[0].getsockname()[1]


async def sign_upto(agent, accept, url: str) -> str:
    from x402 import x402Client
    from x402.mechanisms.evm.upto import UptoEvmScheme
    from x402.schemas import PaymentRequired, PaymentRequirements, ResourceInfo

    client = x402Client()
    client.register(accept.network, UptoEvmScheme(agent))
    client.set_spend_controls(False)
    req = PaymentRequirements.model_validate(accept.model_dump(by_alias=True))
    payload = await client.create_payment_payload(PaymentRequired(accepts=[req], resource=ResourceInfo(url=url)))
    return encode_payment_payload(PaymentPayload.model_validate(payload.model_dump(by_alias=True, exclude_none=True)))


def settlements(chain: DevChain, from_block: int, proxy: str) -> list[dict]:
    """Receipts of the upto proxy's settle transactions since `from_block`."""
    latest = int(chain.rpc.call("eth_blockNumber"), 16)
    out = []
    for n in range(from_block + 1, latest + 1):
        block = chain.rpc.call("eth_getBlockByNumber", hex(n), True)
        for tx in block["transactions"]:
            if (tx.get("to") or "").lower() == proxy.lower():
                out.append(chain.rpc.call("eth_getTransactionReceipt", tx["hash"]))
    return out


async def run_mode(chain: DevChain, d: dict, tmp: str, sessions: bool, calls: int, concurrency: int) -> dict:
    up_server, up_task, up_port = await serve(create_upstream_app(require_auth="bench"))
    store = f"sqlite://{tmp}/gateway-{'sessions' if sessions else 'per-call'}.sqlite3"
    settings = dev_settings(d, devchain_file=f"{tmp}/devchain.json", upstream_urls=[f"http://127.0.0.1:{up_port}"],
                            upstream_auth="bench", metered=True, store_url=store,
                            sessions={"idle_s": 1.0} if sessions else None)
    gw_server, gw_task, gw_port = await serve(create_app(settings))
    url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
    body = json.dumps(PROMPT).encode()
    opg = d["tokens"]["OPG"]["address"]
    payee = d["accounts"]["payee"]["address"]
    agents = [Account.from_key(a["private_key"]) for a in d["accounts"]["agents"]]

    def balance() -> int:
        data = "0x" + calldata("balanceOf(address)", ["address"], [payee]).hex()
        return int(chain.rpc.call("eth_call", {"to": opg, "data": data}, "latest"), 16)

    start_block = int(chain.rpc.call("eth_blockNumber"), 16)
    before = balance()
    charged = 0
    started = time.perf_counter()
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers=headers) as r:
            challenge = decode_payment_required(r.headers["PAYMENT-REQUIRED"])
        accept = next(a for a in challenge.accepts if a.scheme == "upto" and a.asset.lower() == opg.lower())
        if sessions:  # one session per concurrent agent, `calls` calls in all
            per_agent = calls // concurrency

            async def agent_calls(i: int) -> int:
                total = 0
                pay = await sign_upto(agents[i], accept, url)
                async with http.post(url, data=body, headers=headers | {"PAYMENT-SIGNATURE": pay}) as r:
                    sid = r.headers["X-Upto-Session"]
                    total += int(r.headers["X-Upto-Session-Charge"])
                for _ in range(per_agent - 1):
                    async with http.post(url, data=body, headers=headers | {"X-Upto-Session": sid}) as r:
                        assert r.status == 200, await r.text()
                        total += int(r.headers["X-Upto-Session-Charge"])
                return total

            charged = sum(await asyncio.gather(*(agent_calls(i) for i in range(concurrency))))
            await asyncio.sleep(settings.routes[0].sessions.idle_s + 2.0)  # the reaper settles idle sessions
        else:
            payments = [await sign_upto(agents[i % len(agents)], accept, url) for i in range(calls)]
            sem = asyncio.Semaphore(concurrency)

            async def one(pay: str) -> int:
                async with sem:
                    async with http.post(url, data=body, headers=headers | {"PAYMENT-SIGNATURE": pay}) as r:
                        assert r.status == 200, await r.text()
                        from facilitator.x402.headers import decode_payment_response

                        return int(decode_payment_response(r.headers["PAYMENT-RESPONSE"]).amount or 0)

            charged = sum(await asyncio.gather(*(one(p) for p in payments)))
    elapsed = time.perf_counter() - started
    receipts = settlements(chain, start_block, d["contracts"]["upto_proxy"])
    moved = balance() - before
    for server in (gw_server, up_server):
        server.should_exit = True
    await asyncio.gather(gw_task, up_task, return_exceptions=True)
    gas = sum(int(r["gasUsed"], 16) for r in receipts)
    n = calls if not sessions else (calls // concurrency) * concurrency
    return {
        "mode": "upto sessions" if sessions else "upto, one settlement per call",
        "paid_calls": n,
        "settlement_txs": len(receipts),
        "txs_per_call": len(receipts) / n,
        "gas_total": gas,
        "gas_per_call": gas / n,
        "charged": charged,
        "moved_to_payee": moved,
        "exact": charged == moved,
        "seconds": round(elapsed, 2),
    }


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args()
    with DevChain(agents=max(4, args.concurrency)) as chain, tempfile.TemporaryDirectory() as tmp:
        d = chain.description
        write_description(d, f"{tmp}/devchain.json")
        os.environ["FACILITATOR_STORE_URL"] = f"sqlite://{tmp}/facilitator.sqlite3"
        rows = [await run_mode(chain, d, tmp, False, args.calls, args.concurrency),
                await run_mode(chain, d, tmp, True, args.calls, args.concurrency)]
    ratio = rows[0]["gas_per_call"] / rows[1]["gas_per_call"] if rows[1]["gas_per_call"] else float("inf")
    stamp = time.strftime("%Y-%m-%d")
    lines = [
        "# Gas and transactions per paid call, upto sessions vs one settlement per call — "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
        "",
        f"`loadtests/bench_sessions.py --calls {args.calls} --concurrency {args.concurrency}` on the dev chain (anvil),"
        f" the same metered chat completion (gpt-4o, per-token USD prices, OPG at $0.10) paid both ways; {os.cpu_count()} CPUs,"
        f" Python {platform.python_version()}.",
        "",
        "| mode | paid calls | settlement txs | txs per call | gas per call | charged = moved to payee |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['paid_calls']} | {r['settlement_txs']} | {r['txs_per_call']:.3f} | "
                     f"{r['gas_per_call']:,.0f} | {r['charged']} = {r['moved_to_payee']} "
                     f"({'exact' if r['exact'] else 'MISMATCH'}) |")
    lines += ["", f"Sessions use {ratio:.0f}× less gas per paid call at this load "
                  f"({args.calls // args.concurrency} calls per session)."]
    report = "\n".join(lines) + "\n"
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sessions-{stamp}.md").write_text(report)
    (RESULTS / f"sessions-{stamp}.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "LATEST-sessions.md").write_text(report)
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
