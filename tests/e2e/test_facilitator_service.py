"""The facilitator as a real process over real HTTP, paid by the official x402 client, on the dev
chain with the real Permit2."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from devtools.rpc import BlockingRpc
from tests.payments import balance_of, facilitator_body, requirements_for, sign_async

pytestmark = pytest.mark.e2e


async def post(url: str, body: Any, *, raw: bytes | None = None, headers: dict | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        data = raw if raw is not None else json.dumps(body).encode()
        async with http.post(url, data=data, headers=headers or {"Content-Type": "application/json"}) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except json.JSONDecodeError:
                return r.status, text


def receipt(devchain: dict, tx_hash: str) -> dict:
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        return rpc.call("eth_getTransactionReceipt", tx_hash)
    finally:
        rpc.close()


@pytest.fixture
def facilitator(spawn_facilitator: Any, redis_server: Any, redis_prefix: str) -> Any:
    return spawn_facilitator(redis_server.url, extra_env={"FACILITATOR_STORE_PREFIX": redis_prefix})


@pytest.mark.parametrize("symbol", ["OPG", "USDC"], ids=["permit2", "eip3009"])
async def test_official_client_payment_verifies_and_settles_exactly(devchain: dict, facilitator: Any, symbol: str) -> None:
    amount = 1_234_567 if symbol == "USDC" else 3 * 10**17
    req = requirements_for(devchain, symbol, amount)
    payload = await sign_async(devchain, req, agent=1)
    body = facilitator_body(payload, req)
    payer = devchain["accounts"]["agents"][1]["address"]
    payee = devchain["accounts"]["payee"]["address"]
    before = balance_of(devchain, symbol, payer), balance_of(devchain, symbol, payee)

    status, verify = await post(facilitator.url + "/verify", body)
    assert status == 200 and verify == {"isValid": True, "payer": payer}

    status, settle = await post(facilitator.url + "/settle", body)
    assert status == 200 and settle["success"] is True, settle
    assert settle["payer"] == payer and settle["network"] == devchain["network"] and settle["amount"] == str(amount)
    rec = receipt(devchain, settle["transaction"])
    assert rec is not None and int(rec["status"], 16) == 1

    after = balance_of(devchain, symbol, payer), balance_of(devchain, symbol, payee)
    assert before[0] - after[0] == amount and after[1] - before[1] == amount

    # presented again: the first result, and no second transfer
    status, again = await post(facilitator.url + "/settle", body)
    assert status == 200 and again == settle
    status, reverify = await post(facilitator.url + "/verify", body)
    assert status == 200 and reverify["isValid"] is False
    assert reverify["invalidReason"] in ("permit2_invalid_nonce", "invalid_exact_evm_nonce_already_used")
    assert balance_of(devchain, symbol, payee) == after[1]


def other_form(signature: str, form: str) -> str:
    """The same 65-byte r || s || v (v 27/28) EOA signature as EIP-2098 64 bytes (r || yParity·2**255
    + s), or with v as 0/1: both forms recover to the same signer."""
    raw = bytes.fromhex(signature[2:])
    y_parity = raw[64] - 27
    if form == "v01":
        return "0x" + (raw[:64] + bytes((y_parity,))).hex()
    vs = int.from_bytes(raw[32:64], "big") | (y_parity << 255)
    return "0x" + raw[:32].hex() + vs.to_bytes(32, "big").hex()


@pytest.mark.parametrize("form", ["eip2098", "v01"])
@pytest.mark.parametrize("symbol", ["OPG", "USDC"], ids=["permit2", "eip3009"])
async def test_a_signature_form_that_verifies_also_settles(devchain: dict, facilitator: Any, symbol: str, form: str) -> None:
    """Verify accepts an EOA's signature as 64 bytes (EIP-2098) or with v 0/1; settle must then not
    revert: Permit2 and the tokens' `bytes signature` overload read r || s || v with v 27/28, so
    the settlement sends that form."""
    amount = 4_321 if symbol == "USDC" else 10**15
    req = requirements_for(devchain, symbol, amount)
    payload = await sign_async(devchain, req, agent=1)
    payload["payload"]["signature"] = other_form(payload["payload"]["signature"], form)
    body = facilitator_body(payload, req)
    payee = devchain["accounts"]["payee"]["address"]
    before = balance_of(devchain, symbol, payee)

    status, verify = await post(facilitator.url + "/verify", body)
    assert status == 200 and verify["isValid"] is True, verify
    status, settle = await post(facilitator.url + "/settle", body)
    assert status == 200 and settle["success"] is True, settle
    assert int(receipt(devchain, settle["transaction"])["status"], 16) == 1
    assert balance_of(devchain, symbol, payee) - before == amount


@pytest.mark.parametrize("symbol", ["OPG", "USDC"], ids=["permit2", "eip3009"])
async def test_same_payment_to_two_processes_settles_once(
    devchain: dict, spawn_facilitator: Any, redis_server: Any, redis_prefix: str, symbol: str
) -> None:
    env = {"FACILITATOR_STORE_PREFIX": redis_prefix}
    a = spawn_facilitator(redis_server.url, extra_env=env)
    b = spawn_facilitator(redis_server.url, extra_env=env)
    amount = 777_000 if symbol == "USDC" else 7 * 10**16
    req = requirements_for(devchain, symbol, amount)
    body = facilitator_body(await sign_async(devchain, req, agent=2), req)
    payee = devchain["accounts"]["payee"]["address"]
    before = balance_of(devchain, symbol, payee)

    results = await asyncio.gather(*(post(p.url + "/settle", body) for p in (a, b) * 6))
    assert all(status == 200 for status, _ in results)
    hashes = {r["transaction"] for _, r in results}
    assert all(r["success"] for _, r in results), results
    assert len(hashes) == 1
    assert balance_of(devchain, symbol, payee) - before == amount


MALFORMED: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not-json", b"{not json"),
    ("array", b"[1,2,3]"),
    ("string", b'"hello"'),
    ("missing-fields", b'{"x402Version": 2}'),
    ("wrong-types", b'{"x402Version": "2", "paymentPayload": 5, "paymentRequirements": []}'),
    ("amount-number", None),  # filled below from a valid body
    ("deep-nesting", b'{"a":' * 200 + b"1" + b"}" * 200),
    ("oversized", b'{"x": "' + b"a" * 200_000 + b'"}'),
    ("binary", bytes(range(256))),
]


@pytest.mark.parametrize("name,raw", MALFORMED, ids=[m[0] for m in MALFORMED])
@pytest.mark.parametrize("endpoint", ["/verify", "/settle"])
async def test_malformed_requests_get_structured_400(
    devchain: dict, facilitator: Any, endpoint: str, name: str, raw: bytes | None
) -> None:
    if raw is None:
        req = requirements_for(devchain, "USDC", 10)
        body = facilitator_body({"x402Version": 2, "payload": {}, "accepted": req}, req)
        body["paymentRequirements"]["amount"] = 10
        raw = json.dumps(body).encode()
    status, resp = await post(facilitator.url + endpoint, None, raw=raw)
    assert status == 400, resp
    assert isinstance(resp, dict) and resp["error"] in ("invalid_payload", "invalid_x402_version") and resp["message"]


async def test_business_failures_answer_200_with_a_reason(devchain: dict, facilitator: Any) -> None:
    req = requirements_for(devchain, "USDC", 500)
    body = facilitator_body(await sign_async(devchain, req, agent=3), req)
    body["paymentRequirements"]["network"] = "eip155:1"
    body["paymentPayload"]["accepted"]["network"] = "eip155:1"
    status, resp = await post(facilitator.url + "/verify", body)
    assert status == 200 and resp["isValid"] is False and resp["invalidReason"] == "invalid_network"
    status, resp = await post(facilitator.url + "/settle", body)
    assert status == 200 and resp["success"] is False and resp["errorReason"] == "invalid_network"
    assert resp["network"] and resp["transaction"] == ""


async def test_supported_health_and_metrics(devchain: dict, facilitator: Any) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(facilitator.url + "/supported") as r:
            supported = await r.json()
        async with http.get(facilitator.url + "/readyz") as r:
            assert r.status == 200
        async with http.get(facilitator.url + "/metrics") as r:
            metrics = await r.text()
    kinds = {(k["x402Version"], k["scheme"], k["network"]) for k in supported["kinds"]}
    assert (2, "exact", devchain["network"]) in kinds and (1, "exact", "base-sepolia") in kinds
    upto = [k for k in supported["kinds"] if k["scheme"] == "upto"]
    signers = [a["address"] for a in devchain["accounts"]["facilitator"]]
    assert upto and upto[0]["extra"]["facilitatorAddress"] in signers
    assert supported["signers"] == {"eip155:*": signers}
    assert "x402_facilitator_verify_seconds" in metrics and "x402_facilitator_signer_balance_wei" in metrics
    for account in devchain["accounts"]["facilitator"]:
        assert account["private_key"][2:] not in metrics


async def test_crash_with_a_transaction_in_flight_settles_once(
    devchain: dict, spawn_facilitator: Any, redis_server: Any, redis_prefix: str
) -> None:
    """kill -9 after broadcast, before the receipt: a new process finishes the same transaction."""
    env = {"FACILITATOR_STORE_PREFIX": redis_prefix, "FACILITATOR_RECEIPT_TIMEOUT_S": "1"}
    first = spawn_facilitator(redis_server.url, extra_env=env)
    req = requirements_for(devchain, "OPG", 5 * 10**16)
    body = facilitator_body(await sign_async(devchain, req, agent=0), req)
    payee = devchain["accounts"]["payee"]["address"]
    before = balance_of(devchain, "OPG", payee)
    rpc = BlockingRpc(devchain["rpc_url"])
    rpc.call("evm_setAutomine", False)
    try:
        status, pending = await post(first.url + "/settle", body)
        assert status == 200 and pending["success"] is False and pending["errorReason"] == "settlement_pending"
        tx_hash = pending["transaction"]
        assert tx_hash.startswith("0x") and len(tx_hash) == 66
        first.kill()
        rpc.call("evm_mine")
    finally:
        rpc.call("evm_setAutomine", True)
        rpc.close()
    second = spawn_facilitator(redis_server.url, extra_env=env)
    status, done = await post(second.url + "/settle", body)
    assert status == 200 and done["success"] is True and done["transaction"] == tx_hash
    assert balance_of(devchain, "OPG", payee) - before == 5 * 10**16


async def test_two_processes_sharing_signer_keys_never_collide_on_nonces(
    devchain: dict, spawn_facilitator: Any, redis_server: Any, redis_prefix: str
) -> None:
    """Replicas share the signer keys; the per-signer lock and counter in Redis keep their
    account nonces apart, so every distinct payment settles."""
    env = {"FACILITATOR_STORE_PREFIX": redis_prefix}
    a = spawn_facilitator(redis_server.url, extra_env=env)
    b = spawn_facilitator(redis_server.url, extra_env=env)
    payee = devchain["accounts"]["payee"]["address"]
    amount = 1_000
    bodies = []
    for i in range(40):
        req = requirements_for(devchain, "USDC" if i % 2 else "OPG", amount)
        bodies.append(facilitator_body(await sign_async(devchain, req, agent=i % 4), req))
    before = balance_of(devchain, "USDC", payee) + balance_of(devchain, "OPG", payee)
    results = await asyncio.gather(*(post((a, b)[i % 2].url + "/settle", body) for i, body in enumerate(bodies)))
    failures = [r for status, r in results if status != 200 or not r.get("success")]
    assert not failures, failures[:3]
    assert len({r["transaction"] for _, r in results}) == 40
    after = balance_of(devchain, "USDC", payee) + balance_of(devchain, "OPG", payee)
    assert after - before == 40 * amount
