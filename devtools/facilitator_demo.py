"""`x402-facilitator demo`: one paid settlement end to end, told step by step.

Starts the dev chain and the facilitator service (real HTTP on loopback), has an agent sign
payments with the official `x402` client, and shows verify, settle, the balances moving by
exactly the price, a replay refused and a tampered payment refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from typing import Any

import aiohttp
import uvicorn

from devtools.devchain import DevChain, calldata
from facilitator.app import create_app
from facilitator.settings import devchain_overlay, load_settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _units(value: int, decimals: int) -> str:
    whole, frac = divmod(value, 10**decimals)
    return f"{whole:,}.{frac:0{decimals}d}".rstrip("0").rstrip(".")


async def _balance(chain: DevChain, token: str, who: str) -> int:
    data = "0x" + calldata("balanceOf(address)", ["address"], [who]).hex()
    return int(chain.rpc.call("eth_call", {"to": token, "data": data}, "latest"), 16)


async def run_demo() -> int:
    from eth_account import Account
    from x402 import x402Client
    from x402.mechanisms.evm.exact.register import register_exact_evm_client
    from x402.schemas import PaymentRequired, PaymentRequirements, ResourceInfo

    print("== starting the dev chain (anvil + Permit2 + x402 proxies + OPG/USDC test tokens)")
    with DevChain(agents=1, facilitators=1) as chain:
        d = chain.description
        settings = load_settings(None, env={}, overrides=devchain_overlay(d) | {"store_url": "memory://", "port": _free_port()})
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning"))
        serve = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 - uvicorn.Server has a `started` flag, no event
            await asyncio.sleep(0.01)
        base = f"http://127.0.0.1:{settings.port}"
        print(f"   chain {d['network']} at {d['rpc_url']}; facilitator at {base}")
        agent = Account.from_key(d["accounts"]["agents"][0]["private_key"])
        payee = d["accounts"]["payee"]["address"]
        client = x402Client()
        register_exact_evm_client(client, agent)
        client.set_spend_controls(False)  # our test tokens are not in the SDK's default-asset table
        failures = 0
        async with aiohttp.ClientSession() as http:
            supported = await (await http.get(f"{base}/supported")).json()
            kinds = [f"{k['scheme']}@{k['network']}" for k in supported["kinds"] if k["x402Version"] == 2]
            print("== GET /supported:", ", ".join(kinds))
            for symbol, price in (("OPG", 25 * 10**16), ("USDC", 250_000)):
                t = d["tokens"][symbol]
                extra = {"name": t["eip712_name"], "version": t["eip712_version"]}
                if t["transfer_method"] == "permit2":
                    extra["assetTransferMethod"] = "permit2"
                req = PaymentRequirements(scheme="exact", network=d["network"], asset=t["address"], amount=str(price),
                                          pay_to=payee, max_timeout_seconds=300, extra=extra)
                print(f"\n== {symbol} ({t['transfer_method']}): the resource asks {_units(price, t['decimals'])} {symbol}")
                payload = await client.create_payment_payload(PaymentRequired(accepts=[req], resource=ResourceInfo(url="http://demo/v1/chat/completions")))
                body: dict[str, Any] = {"x402Version": 2, "paymentPayload": payload.model_dump(by_alias=True, exclude_none=True),
                        "paymentRequirements": req.model_dump(by_alias=True, exclude_none=True)}
                signed = {k: v for k, v in body["paymentPayload"]["payload"].items() if k != "signature"}
                print("   agent signed:", json.dumps(signed)[:160] + "…")
                before = (await _balance(chain, t["address"], agent.address), await _balance(chain, t["address"], payee))
                verify = await (await http.post(f"{base}/verify", json=body)).json()
                print("   POST /verify ->", verify)
                settle = await (await http.post(f"{base}/settle", json=body)).json()
                print("   POST /settle ->", settle)
                after = (await _balance(chain, t["address"], agent.address), await _balance(chain, t["address"], payee))
                moved = (before[0] - after[0], after[1] - before[1])
                print(f"   agent {_units(before[0], t['decimals'])} -> {_units(after[0], t['decimals'])} {symbol}; "
                      f"payee +{_units(moved[1], t['decimals'])} {symbol}")
                ok = verify.get("isValid") and settle.get("success") and moved == (price, price)
                replay = await (await http.post(f"{base}/verify", json=body)).json()
                print("   the same payment again ->", replay.get("invalidReason"))
                tampered = json.loads(json.dumps(body))
                tampered["paymentRequirements"]["payTo"] = agent.address
                tampered["paymentPayload"]["accepted"]["payTo"] = agent.address
                bad = await (await http.post(f"{base}/verify", json=tampered)).json()
                print("   a payment redirected to another payTo ->", bad.get("invalidReason"))
                ok = ok and not replay.get("isValid") and not bad.get("isValid")
                print("   OK" if ok else "   FAILED")
                failures += not ok
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await serve
    print("\n== demo", "passed" if not failures else f"FAILED ({failures})")
    return 1 if failures else 0


def main() -> int:
    return asyncio.run(run_demo())


if __name__ == "__main__":
    sys.exit(main())
