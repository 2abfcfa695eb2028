"""Helpers for the `upto` end-to-end tests (tests/e2e/test_gateway_upto.py): metered gateway
configurations, the official client's UptoEvmScheme, costs computed independently of the gateway,
on-chain transfers to the payee, SSE parsing and upto sessions driven by hand."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from x402 import x402Client
from x402.mechanisms.evm.upto import UptoEvmScheme
from x402.schemas import PaymentRequired, PaymentRequirements, ResourceInfo

from devtools.rpc import BlockingRpc
from facilitator.x402.headers import encode_payment_payload
from facilitator.x402.types import PaymentPayload
from tests.gateway_client import Reply, call

CHAT = "/v1/chat/completions"
FAULT = "X-Devupstream-Fault"
SESSION = "X-Upto-Session"

# What the dev configuration (devtools.devconfig, metered=True) charges, restated here so the tests
# compute costs without the gateway's code: USD per input token, per output token, per call.
PRICES: dict[str, tuple[str, str, str]] = {
    "gpt-4o": ("0.0000025", "0.00001", "0"),
    "gpt-4o-mini": ("0.00000015", "0.0000006", "0"),
    "claude-haiku-4-5": ("0.000001", "0.000005", "0"),
    "free-model": ("0", "0", "0"),
    "*": ("0.000001", "0.000002", "0.0001"),
}
OPG_USD = Decimal("0.10")
MAX_PER_CALL_USD = Decimal("0.05")
TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()


def usd_to_opg(usd: Decimal) -> int:
    """USD -> OPG base units (18 decimals), rounded up."""
    return int((usd / OPG_USD * Decimal(10) ** 18).to_integral_value(rounding=ROUND_CEILING))


SIGNED_MAX_OPG = usd_to_opg(MAX_PER_CALL_USD)  # 0.5 OPG: the upto ceiling of one call


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int) -> Decimal:
    i, o, per_call = (Decimal(x) for x in PRICES.get(model, PRICES["*"]))
    return prompt_tokens * i + completion_tokens * o + per_call


def cost_opg(model: str, usage: dict[str, int]) -> int:
    """What a call with this OpenAI `usage` costs in OPG base units."""
    return usd_to_opg(cost_usd(model, usage["prompt_tokens"], usage["completion_tokens"]))


def chat(model: str, text: str = "hello metered world", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


# -- configuration ----------------------------------------------------------------------------------


def upto_config(path: Path, devchain: dict[str, Any], devchain_file: str, upstream_url: str, store_url: str, *,
                pay_to: str, sessions: dict[str, Any] | None = None, session_cap: str | None = None,
                budgets: dict[str, Any] | None = None) -> str:
    """dev_settings(metered=True, sessions=...) as a JSON file paying `pay_to`. Secrets dump as
    "**********": the upstream keys are written back in clear. `session_cap` (USD) replaces the
    chat route's session cap."""
    from devtools.devconfig import dev_settings
    from gateway.settings import load_gateway_settings

    doc = dev_settings(devchain, devchain_file=devchain_file, upstream_urls=[upstream_url], upstream_auth="sk-upstream",
                       store_url=store_url, metered=True, sessions=sessions).model_dump(mode="json", exclude_none=True)
    for name, up in doc["upstreams"].items():
        up["auth_value"] = "sk-upstream" if name == "anthropic" else "Bearer sk-upstream"
    doc["pay_to"] = pay_to
    if session_cap is not None:
        doc["routes"][0]["sessions"]["cap"] = session_cap
    if budgets is not None:
        doc["budgets"] = budgets
    path.write_text(json.dumps(doc, indent=1))
    load_gateway_settings(str(path), env={})  # invalid: fail here, not in a subprocess
    return str(path)


def replica_env(prefix: str, signer_keys: list[str] | None, **extra: str) -> dict[str, str]:
    """A gateway replica's environment: shared record/session/settlement prefixes in Redis;
    `signer_keys` (None: the dev chain's facilitator keys, all of them)."""
    env = {"GATEWAY_STORE_PREFIX": f"{prefix}gw:", "FACILITATOR_STORE_PREFIX": f"{prefix}fac:", **extra}
    if signer_keys is not None:
        env["FACILITATOR_SIGNER_KEYS"] = ",".join(signer_keys)
    return env


# -- the official client --------------------------------------------------------------------------


def upto_client(devchain: dict[str, Any], account: LocalAccount) -> x402Client:
    client = x402Client()
    client.register(devchain["network"], UptoEvmScheme(account))
    client.set_spend_controls(False)  # the dev tokens are not in the SDK's default-asset table
    return client


async def sign_upto(client: x402Client, accept: Any, url: str) -> str:
    """A PAYMENT-SIGNATURE value for one offered requirement (a facilitator-side model)."""
    req = PaymentRequirements.model_validate(accept.model_dump(by_alias=True, exclude_none=True))
    payload = await client.create_payment_payload(PaymentRequired(accepts=[req], resource=ResourceInfo(url=url)))
    return encode_payment_payload(PaymentPayload.model_validate(payload.model_dump(by_alias=True, exclude_none=True)))


def upto_accept(reply: Reply) -> Any:
    """The `upto` requirement of a 402's PAYMENT-REQUIRED (it is listed first)."""
    assert reply.status == 402, reply
    required = reply.required
    assert required is not None, reply.headers
    assert required.accepts[0].scheme == "upto", required.accepts
    return required.accepts[0]


# -- the chain ------------------------------------------------------------------------------------


def _rpc(devchain: dict[str, Any], method: str, *params: Any) -> Any:
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        return rpc.call(method, *params)
    finally:
        rpc.close()


def transfers_to(devchain: dict[str, Any], payee: str, symbol: str = "OPG") -> list[dict[str, Any]]:
    """Every token Transfer to `payee` on the dev chain: [{tx, from, amount, block}]."""
    logs = _rpc(devchain, "eth_getLogs", {
        "fromBlock": "0x0", "toBlock": "latest", "address": devchain["tokens"][symbol]["address"],
        "topics": [TRANSFER_TOPIC, None, "0x" + "00" * 12 + payee.lower().removeprefix("0x")],
    })  # fmt: skip
    return [{"tx": log["transactionHash"], "from": "0x" + log["topics"][1][-40:], "amount": int(log["data"], 16),
             "block": int(log["blockNumber"], 16)} for log in logs]


def tx_receipt(devchain: dict[str, Any], tx: str) -> dict[str, Any]:
    return _rpc(devchain, "eth_getTransactionReceipt", tx)


def block_time(devchain: dict[str, Any], block: int) -> int:
    return int(_rpc(devchain, "eth_getBlockByNumber", hex(block), False)["timestamp"], 16)


# -- SSE ------------------------------------------------------------------------------------------


def sse_events(text: str) -> list[tuple[str, str]]:
    """(event name or "message", data) of each server-sent event."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            out.append((name, "\n".join(data)))
    return out


def payment_event(text: str) -> dict[str, Any]:
    """The gateway's final `x402.payment` event (it must be the last event of the stream)."""
    events = sse_events(text)
    assert events and events[-1][0] == "x402.payment", events[-3:]
    assert sum(1 for name, _ in events if name == "x402.payment") == 1
    return json.loads(events[-1][1])


def stream_usage(text: str) -> dict[str, int] | None:
    """The usage the upstream reported in its final OpenAI chunk."""
    usage = None
    for name, data in sse_events(text):
        if name == "message" and data != "[DONE]":
            doc = json.loads(data)
            if doc.get("usage"):
                usage = doc["usage"]
    return usage


# -- sessions -------------------------------------------------------------------------------------


async def session_state(gateway_url: str, session_id: str) -> dict[str, Any]:
    r = await call(gateway_url + f"/v1/upto/sessions/{session_id}", method="GET")
    assert r.status == 200, r
    return r.json()


async def wait_for(check: Callable[[], Awaitable[Any]], *, timeout_s: float, interval_s: float = 0.1,
                   what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy; its last value otherwise fails the test."""
    end = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not reached within {timeout_s}s")
        await asyncio.sleep(interval_s)


async def wait_session(gateway_url: str, session_id: str, states: tuple[str, ...] = ("settled", "failed"), *,
                       timeout_s: float = 20.0) -> dict[str, Any]:
    last: dict[str, Any] = {}

    async def done() -> dict[str, Any] | None:
        nonlocal last
        last = await session_state(gateway_url, session_id)
        return last if last["state"] in states else None

    try:
        return await wait_for(done, timeout_s=timeout_s, interval_s=0.1, what=f"session {session_id} {states}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {last}") from None
