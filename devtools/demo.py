"""`x402-gateway demo` (what `make demo` runs): the whole paid flow on the embedded defaults.

The dev chain (anvil + real Permit2 + x402 proxies + OPG/USDC stand-ins), the facilitator
in-process, the embedded store, a local stand-in upstream speaking the OpenAI protocol, the
gateway, and an agent paying with the official `x402` Python client: the 402 challenge, the
payment, the settlement transaction, balances before and after, a stream, and a tampered
payment refused. Exits 0 when every check holds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import uvicorn

from devtools.devchain import DevChain, calldata, write_description
from devtools.devconfig import dev_settings
from devtools.upstream import create_upstream_app
from facilitator.x402.headers import decode_payment_required, decode_payment_response
from gateway.app import create_app

PROVIDER_KEY = "sk-demo-provider-key"


def _units(value: int, decimals: int) -> str:
    whole, frac = divmod(value, 10**decimals)
    return f"{whole:,}.{frac:0{decimals}d}".rstrip("0").rstrip(".")


async def _serve(app: Any) -> tuple[uvicorn.Server, asyncio.Task, int]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn.Server has a `started` flag, no event
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, port


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, ok: bool, what: str) -> None:
        print(f"   {'ok ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failed.append(what)


async def run_demo() -> int:
    from eth_account import Account
    from x402 import x402Client
    from x402.http import x402HTTPClient
    from x402.http.clients.httpx import x402HttpxClient
    from x402.mechanisms.evm.exact.register import register_exact_evm_client

    check = Checks()
    print("== 1. dev chain: anvil, the real Permit2, x402's proxies, OPG (Permit2) and USDC (EIP-3009) stand-ins")
    with DevChain(agents=1, facilitators=1) as chain, tempfile.TemporaryDirectory() as tmp:
        d = chain.description
        devfile = str(Path(tmp) / "devchain.json")
        write_description(d, devfile)
        print(f"   {d['network']} at {d['rpc_url']}")
        up_server, up_task, up_port = await _serve(create_upstream_app(name="demo-upstream", require_auth=PROVIDER_KEY))
        settings = dev_settings(d, devchain_file=devfile, upstream_urls=[f"http://127.0.0.1:{up_port}"],
                                upstream_auth=PROVIDER_KEY, store_url=f"sqlite://{tmp}/gateway.sqlite3")
        import os

        os.environ.setdefault("FACILITATOR_STORE_URL", f"sqlite://{tmp}/facilitator.sqlite3")
        gw_server, gw_task, gw_port = await _serve(create_app(settings))
        gateway = f"http://127.0.0.1:{gw_port}"
        print(f"== 2. stand-in upstream (OpenAI protocol) on :{up_port}; gateway on {gateway} "
              "(facilitator in-process, embedded store)")

        agent = Account.from_key(d["accounts"]["agents"][0]["private_key"])
        payee = d["accounts"]["payee"]["address"]
        opg, usdc = d["tokens"]["OPG"], d["tokens"]["USDC"]
        chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "What does x402 do for agents?"}]}
        chat_bytes = json.dumps(chat).encode()  # a resend must be the same request, byte for byte
        as_json = {"Content-Type": "application/json"}

        def balance(token: dict, who: str) -> int:
            data = "0x" + calldata("balanceOf(address)", ["address"], [who]).hex()
            return int(chain.rpc.call("eth_call", {"to": token["address"], "data": data}, "latest"), 16)

        async with aiohttp.ClientSession() as http:
            print("\n== 3. the agent calls without paying")
            async with http.post(gateway + "/v1/chat/completions", json=chat) as unpaid:
                challenge = decode_payment_required(unpaid.headers["PAYMENT-REQUIRED"])
                body = await unpaid.json()
                print(f"   HTTP {unpaid.status}: {body['message']}")
                for a in challenge.accepts:
                    token = opg if a.asset.lower() == opg["address"].lower() else usdc
                    sym = "OPG" if token is opg else "USDC"
                    print(f"   accepts: {a.scheme} {_units(int(a.amount), token['decimals'])} {sym} on {a.network} "
                          f"to {a.pay_to} via {a.extra.get('assetTransferMethod', 'eip3009')}")
                check(unpaid.status == 402 and len(challenge.accepts) == 2, "402 with PAYMENT-REQUIRED listing OPG and USDC")

        captured: list[dict] = []
        client = x402Client()
        register_exact_evm_client(client, agent)
        client.set_spend_controls(False)  # our test tokens are not in the SDK's default-asset table
        client.on_after_payment_creation(
            lambda ctx: captured.append(ctx.payment_payload.model_dump(by_alias=True, exclude_none=True)))
        price = 2 * 10**16  # gpt-4o: 0.02 OPG

        print("\n== 4. the agent pays with the official x402 client (OPG through Permit2)")
        before = balance(opg, agent.address), balance(opg, payee)
        async with x402HttpxClient(client, timeout=60) as paid:
            r = await paid.post(gateway + "/v1/chat/completions", content=chat_bytes, headers=as_json)
        auth = captured[-1]["payload"]["permit2Authorization"]
        print(f"   signed: Permit2 witness transfer of {_units(int(auth['permitted']['amount']), 18)} OPG to "
              f"{auth['witness']['to']}, spender {auth['spender']}, nonce {auth['nonce'][:12]}…, deadline {auth['deadline']}")
        settle = x402HTTPClient(client).get_payment_settle_response(r.headers.get)
        answer = r.json()["choices"][0]["message"]["content"]
        print(f"   HTTP {r.status_code}: {answer!r}")
        print(f"   settlement: {settle.transaction} on {settle.network}")
        receipt = chain.rpc.call("eth_getTransactionReceipt", settle.transaction)
        after = balance(opg, agent.address), balance(opg, payee)
        print(f"   agent {_units(before[0], 18)} -> {_units(after[0], 18)} OPG; payee {_units(before[1], 18)} -> "
              f"{_units(after[1], 18)} OPG (block {int(receipt['blockNumber'], 16)}, gas {int(receipt['gasUsed'], 16):,})")
        check(r.status_code == 200 and settle.success and int(receipt["status"], 16) == 1, "served, settled, receipt status 1")
        check(before[0] - after[0] == price and after[1] - before[1] == price, "balances moved by exactly the price")

        print("\n== 5. a streamed completion (settled before the first byte, then streamed through)")
        async with x402HttpxClient(client, timeout=60) as paid:
            async with paid.stream("POST", gateway + "/v1/chat/completions",
                                   json=chat | {"stream": True, "stream_options": {"include_usage": True}}) as r:
                words = []
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"]
                        if delta and delta[0]["delta"].get("content"):
                            words.append(delta[0]["delta"]["content"])
                stream_settle = decode_payment_response(r.headers["PAYMENT-RESPONSE"])
        print(f"   streamed {len(words)} chunks: {''.join(words)[:60]!r}…; settled in {stream_settle.transaction[:18]}…")
        check(r.status_code == 200 and stream_settle.success and len(words) > 3, "stream paid and delivered")

        print("\n== 6. the same agent pays in USDC (EIP-3009 transferWithAuthorization)")
        usdc_client = x402Client()
        register_exact_evm_client(usdc_client, agent)
        usdc_client.set_spend_controls(False)
        usdc_client.register_policy(lambda v, reqs: [q for q in reqs if q.asset.lower() == usdc["address"].lower()])
        before_u = balance(usdc, payee)
        async with x402HttpxClient(usdc_client, timeout=60) as paid:
            r = await paid.post(gateway + "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "hello"})
        s = x402HTTPClient(usdc_client).get_payment_settle_response(r.headers.get)
        moved = balance(usdc, payee) - before_u
        dims = len(r.json()["data"][0]["embedding"])
        print(f"   HTTP {r.status_code}: {dims}-dim embedding; payee +{_units(moved, 6)} USDC; tx {s.transaction[:18]}…")
        check(r.status_code == 200 and s.success and moved == 1000, "USDC payment of exactly 0.001 settled")

        print("\n== 7. a tampered payment: the agent's signed payment redirected to another payTo")
        forged = json.loads(json.dumps(captured[0]))
        forged["accepted"]["payTo"] = agent.address
        forged["payload"]["permit2Authorization"]["witness"]["to"] = agent.address
        header = base64.b64encode(json.dumps(forged).encode()).decode()
        async with aiohttp.ClientSession() as http:
            async with http.post(gateway + "/v1/chat/completions", json=chat, headers={"PAYMENT-SIGNATURE": header}) as resp:
                refused = await resp.json()
        print(f"   HTTP {resp.status}: {refused['error']}: {refused['message']}")
        check(resp.status == 402 and refused["error"] == "invalid_payment_requirements",
              "tampered payment refused, nothing charged")

        print("\n== 8. the first payment presented again")
        replay = base64.b64encode(json.dumps(captured[0]).encode()).decode()
        paid_before = balance(opg, payee)
        async with aiohttp.ClientSession() as http:
            async with http.post(gateway + "/v1/chat/completions", data=chat_bytes,
                                 headers=as_json | {"PAYMENT-SIGNATURE": replay}) as resp:
                replay_status = resp.status
                same = (resp.headers.get("PAYMENT-RESPONSE")
                        and decode_payment_response(resp.headers["PAYMENT-RESPONSE"]).transaction == settle.transaction)
        print(f"   HTTP {replay_status}: the recorded result (same settlement {settle.transaction[:18]}…), not charged again")
        check(replay_status == 200 and bool(same) and balance(opg, payee) == paid_before,
              "replay served from the record, no second charge")

        for server in (gw_server, up_server):
            server.should_exit = True
        for task in (gw_task, up_task):
            with contextlib.suppress(asyncio.CancelledError):
                await task
    print("\n== demo", "passed" if not check.failed else f"FAILED: {check.failed}")
    return 1 if check.failed else 0


def main() -> int:
    return asyncio.run(run_demo())


if __name__ == "__main__":
    sys.exit(main())
