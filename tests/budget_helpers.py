"""Helpers for the budget end-to-end tests: fresh funded agents, gateway config files with a
`budgets` section, pre-signed payments, paid calls and the admin API."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from multidict import CIMultiDictProxy
from x402 import x402Client
from x402.mechanisms.evm.exact.register import register_exact_evm_client
from x402.schemas import PaymentRequired, PaymentRequirements, ResourceInfo

from budgets.admin_client import AdminClient
from devtools.devchain import calldata
from devtools.rpc import BlockingRpc
from facilitator.x402.headers import decode_payment_required, decode_payment_response, encode_payment_payload
from facilitator.x402.types import PaymentPayload, SettleResponse
from tests.payments import send_transactions

SEED = "x402-budgets-e2e"
MAX_UINT256 = 2**256 - 1
ADMIN_TOKEN = "budgets-admin-e2e-token"
CHAT = "/v1/chat/completions"
CHAT_BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "budgeted call"}]}).encode()
CHAT_PRICE_OPG = 5 * 10**15  # gpt-4o-mini: 0.005 OPG
FAULT = "X-Devupstream-Fault"


def derived(label: str) -> LocalAccount:
    """Deterministic test key: keccak256("x402-budgets-e2e:{label}")."""
    return Account.from_key(keccak(text=f"{SEED}:{label}"))


# -- the chain ----------------------------------------------------------------------------------


def fund(devchain: dict[str, Any], *accounts: LocalAccount, opg: int = 10**21) -> None:
    """ETH (anvil_setBalance), OPG (the stand-in's open mint) and an unlimited Permit2 approval."""
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        rpc.batch([("anvil_setBalance", [a.address, hex(10**21)]) for a in accounts])
    finally:
        rpc.close()
    token = devchain["tokens"]["OPG"]["address"]
    txs = []
    for a in accounts:
        txs.append((a, token, calldata("mint(address,uint256)", ["address", "uint256"], [a.address, opg])))
        txs.append((a, token, calldata("approve(address,uint256)", ["address", "uint256"],
                                       [devchain["contracts"]["permit2"], MAX_UINT256])))
    send_transactions(devchain, txs)


def approve_permit2(devchain: dict[str, Any], account: LocalAccount, amount: int) -> None:
    token = devchain["tokens"]["OPG"]["address"]
    send_transactions(devchain, [(account, token, calldata("approve(address,uint256)", ["address", "uint256"],
                                                   [devchain["contracts"]["permit2"], amount]))])


def opg_balance(devchain: dict[str, Any], who: str) -> int:
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        data = "0x" + calldata("balanceOf(address)", ["address"], [who]).hex()
        return int(rpc.call("eth_call", {"to": devchain["tokens"]["OPG"]["address"], "data": data}, "latest"), 16)
    finally:
        rpc.close()


def receipt_statuses(devchain: dict[str, Any], tx_hashes: list[str]) -> list[int | None]:
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        receipts = rpc.batch([("eth_getTransactionReceipt", [h]) for h in tx_hashes]) if tx_hashes else []
    finally:
        rpc.close()
    return [None if r is None else int(r["status"], 16) for r in receipts]


# -- the gateway's configuration ------------------------------------------------------------------


def gateway_config(path: Path, devchain: dict[str, Any], devchain_file: str, upstream_url: str, store_url: str,
                   *, pay_to: str, budgets: dict[str, Any], **top: Any) -> str:
    """The dev configuration (devtools.devconfig) as a JSON file, paying `pay_to`, with a budgets
    section. Secrets dump as "**********", so the upstream keys are written back in clear."""
    from devtools.devconfig import dev_settings
    from gateway.settings import load_gateway_settings

    doc = dev_settings(devchain, devchain_file=devchain_file, upstream_urls=[upstream_url], upstream_auth="sk-upstream",
                       store_url=store_url).model_dump(mode="json", exclude_none=True)
    for name, up in doc["upstreams"].items():
        up["auth_value"] = "sk-upstream" if name == "anthropic" else "Bearer sk-upstream"
    doc |= {"pay_to": pay_to, "budgets": budgets, **top}
    path.write_text(json.dumps(doc, indent=1))
    load_gateway_settings(str(path), env={})  # fail here, not in a subprocess, if it is invalid
    return str(path)


def opg_policy(devchain: dict[str, Any], agent: str, daily: int, **fields: Any) -> dict[str, Any]:
    return {"agent": agent, "network": devchain["network"], "asset": devchain["tokens"]["OPG"]["address"],
            "limits": [{"period": "day", "amount": str(daily)}], **fields}


def gateway_env(devchain: dict[str, Any], signer: int, prefix: str) -> dict[str, str]:
    """One replica's environment: its own signer key; records, settlements and the admin token shared."""
    return {
        "FACILITATOR_SIGNER_KEYS": devchain["accounts"]["facilitator"][signer]["private_key"],
        "FACILITATOR_STORE_PREFIX": f"{prefix}fac:",
        "GATEWAY_STORE_PREFIX": f"{prefix}gw:",
        "BUDGETS_ADMIN_TOKEN": ADMIN_TOKEN,
    }


# -- payments and calls --------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str | None:
        try:
            doc = self.json()
        except ValueError:
            return None
        return doc.get("error") if isinstance(doc, dict) else None

    @property
    def settle(self) -> SettleResponse | None:
        value = self.headers.get("PAYMENT-RESPONSE")
        return decode_payment_response(value) if value else None

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:400]!r})"


async def post(http: aiohttp.ClientSession, url: str, body: bytes = CHAT_BODY, *, payment: str | None = None,
               fault: str | None = None, request_id: str | None = None) -> Reply:
    headers = {"Content-Type": "application/json"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    if payment is not None:
        headers["PAYMENT-SIGNATURE"] = payment
    if fault is not None:
        headers[FAULT] = fault
    async with http.post(url, data=body, headers=headers) as r:
        return Reply(r.status, r.headers, await r.read())


async def opg_requirement(url: str, devchain: dict[str, Any], body: bytes = CHAT_BODY) -> dict[str, Any]:
    """What the gateway's 402 asks for `body` at `url`, in OPG (Permit2)."""
    async with aiohttp.ClientSession() as http:
        reply = await post(http, url, body)
    assert reply.status == 402, reply
    required = decode_payment_required(reply.headers["PAYMENT-REQUIRED"])
    asset = devchain["tokens"]["OPG"]["address"].lower()
    for accept in required.accepts:
        if accept.asset.lower() == asset:
            return accept.model_dump(by_alias=True, exclude_none=True)
    raise AssertionError(f"no OPG offer in {required}")


async def sign_payments(account: LocalAccount, requirement: dict[str, Any], n: int, url: str) -> list[str]:
    """`n` PAYMENT-SIGNATURE values from the official client, each with its own Permit2 nonce."""
    client = x402Client()
    register_exact_evm_client(client, account)
    client.set_spend_controls(False)  # the dev tokens are not in the SDK's default-asset table
    required = PaymentRequired(accepts=[PaymentRequirements.model_validate(requirement)], resource=ResourceInfo(url=url))
    out = []
    for _ in range(n):
        payload = await client.create_payment_payload(required)
        out.append(encode_payment_payload(PaymentPayload.model_validate(payload.model_dump(by_alias=True, exclude_none=True))))
    return out


# -- the admin API ----------------------------------------------------------------------------------


class Admin:
    """A gateway's admin API through AdminClient, with the reads the budget tests assert on."""

    def __init__(self, gateway_url: str, token: str = ADMIN_TOKEN, prefix: str = "/admin") -> None:
        self.base = gateway_url + prefix
        self.token = token

    async def get(self, path: str, **params: str) -> Any:
        """GET with the token; a 503 (the budget store briefly unreachable, e.g. a pooled connection
        gone stale across a Redis restart) is retried a few times."""
        async with AdminClient(self.base, self.token, timeout_s=10) as client:
            for attempt in range(10):
                reply = await client.request("GET", path, query=params, check=False)
                if reply.status != 503 or attempt == 9:
                    break
                await asyncio.sleep(0.2)
        assert reply.status == 200, (reply.status, reply.raw[:400])
        return reply.json()

    async def usage(self, agent: str) -> dict[str, Any]:
        """The agent's own daily budget row: limit, spent, reserved, remaining as ints."""
        doc = await self.get(f"/v1/agents/{agent}/usage")
        rows = [b for b in doc["budgets"] if b["scope"] == "agent" and b["period"] == "day"]
        assert len(rows) == 1, doc
        return {k: int(rows[0][k]) for k in ("limit", "spent", "reserved", "remaining")} | {"resets_at": rows[0]["resets_at"]}

    async def ledger(self, agent: str) -> list[dict[str, Any]]:
        doc = await self.get("/v1/ledger", agent=agent, format="json", start=str(time.time() - 3600),
                             end=str(time.time() + 60), limit="100000")
        return doc["entries"]

    async def wait_usage(self, agent: str, *, timeout_s: float = 10.0, **want: int) -> dict[str, Any]:
        """Poll usage until every field in `want` has its value; the last usage otherwise (for the assert)."""
        end = time.monotonic() + timeout_s
        while True:
            u = await self.usage(agent)
            if all(u[k] == v for k, v in want.items()) or time.monotonic() > end:
                return u
            await asyncio.sleep(0.05)


def chat_count(upstream: Any) -> int:
    """Chat completions the stand-in provider has answered (its /_stats)."""
    with urllib.request.urlopen(upstream.url + "/_stats", timeout=5) as r:
        return json.loads(r.read())["by_path"].get(CHAT, 0)


def set_hostile_mode(hostile: Any, **mode: Any) -> None:
    req = urllib.request.Request(hostile.url + "/_mode", data=json.dumps(mode).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()


def unique_prefix(label: str) -> str:
    return f"bud-{label}-{os.urandom(4).hex()}:"
