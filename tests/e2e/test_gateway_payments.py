"""The gateway as a real process over real HTTP: agents pay with the official x402 client (or sign
by hand to tamper), money moves on the dev chain, the stand-in provider counts what reached it."""

from __future__ import annotations

import copy
import json
import os
import uuid
from typing import Any

import pytest
from eth_account import Account
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients.httpx import x402HttpxClient
from x402.mechanisms.evm.exact.register import register_exact_evm_client

from tests.gateway_client import (
    CHAT,
    CHAT_BODY,
    CHAT_PRICE,
    Balances,
    Processes,
    b64,
    call,
    facilitator_env,
    facilitator_stats,
    offered,
    receipt_status,
    sign_for,
    upstream_stats,
)
from tests.payments import sign_async

pytestmark = pytest.mark.e2e

MESSAGES_BODY = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hello claude"}]}
INFER_BODY = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]}
EMBED_BODY = {"model": "text-embedding-3-small", "input": "paid vector"}
OTHER = "0x" + "5a" * 20




@pytest.fixture(scope="module")
def gateway(procs: Processes, upstream: Any, redis_server: Any, devchain: dict) -> Any:
    """Gateway with its facilitator in-process, records and facilitator store on Redis, and the
    payment-identifier extension on."""
    prefix = f"gwpay:{uuid.uuid4().hex[:8]}:"
    env = facilitator_env(devchain, 0, prefix) | {"GATEWAY_STORE_PREFIX": prefix + "gw:", "GATEWAY_PAYMENT_IDENTIFIER": "true"}
    return procs.gateway(upstream.url, redis_server.url, env=env)


@pytest.fixture(scope="module")
def guarded(procs: Processes, upstream: Any, redis_server: Any, devchain: dict) -> tuple[Any, Any]:
    """(gateway, hostile facilitator in proxy mode in front of a real facilitator)."""
    prefix = f"gwpay-remote:{uuid.uuid4().hex[:8]}:"
    real = procs.facilitator(redis_server.url, facilitator_env(devchain, 1, prefix))
    hostile = procs.hostile(real.url)
    env = {"GATEWAY_STORE_PREFIX": prefix + "gw:"}
    return procs.gateway(upstream.url, redis_server.url, facilitator_url=hostile.url, env=env), hostile


def official_client(devchain: dict, agent: int, symbol: str) -> x402Client:
    client = x402Client()
    register_exact_evm_client(client, Account.from_key(devchain["accounts"]["agents"][agent]["private_key"]))
    client.set_spend_controls(False)  # the dev tokens are not in the SDK's default-asset table
    asset = devchain["tokens"][symbol]["address"].lower()
    client.register_policy(lambda version, reqs: [r for r in reqs if r.asset.lower() == asset])
    return client


def chat_content(doc: dict) -> str:
    return doc["choices"][0]["message"]["content"]


# -- paid calls with the official client ------------------------------------------------------------


@pytest.mark.parametrize("symbol,agent", [("OPG", 0), ("USDC", 1)], ids=["permit2-OPG", "eip3009-USDC"])
async def test_official_client_pays_for_a_chat_completion(devchain: dict, gateway: Any, upstream: Any,
                                                          symbol: str, agent: int) -> None:
    client = official_client(devchain, agent, symbol)
    direct = await call(upstream.url + CHAT, CHAT_BODY, headers={"Authorization": "Bearer sk-agent-own"})
    assert direct.status == 401  # the provider insists on its key ...
    balances = Balances(devchain, symbol, agent)
    stats = upstream_stats(upstream)

    async with x402HttpxClient(client, timeout=30) as http:  # ... which only the gateway has
        r = await http.post(gateway.url + CHAT, json=CHAT_BODY, headers={"Authorization": "Bearer sk-agent-own"})
    assert r.status_code == 200, r.text
    assert chat_content(r.json()) == "Echo: hello paid world"

    settle = x402HTTPClient(client).get_payment_settle_response(r.headers.get)
    assert settle.success is True and settle.network == devchain["network"]
    assert settle.payer and settle.payer.lower() == devchain["accounts"]["agents"][agent]["address"].lower()
    assert receipt_status(devchain, settle.transaction) == 1
    assert balances.moved() == (CHAT_PRICE[symbol], CHAT_PRICE[symbol])

    after = upstream_stats(upstream)
    assert after["by_path"].get(CHAT, 0) - stats["by_path"].get(CHAT, 0) == 1
    assert after["saw_payment"] == 0  # the payment never reaches the provider; its key (required) did


async def test_streaming_chat_completion_is_paid_once(devchain: dict, gateway: Any, upstream: Any) -> None:
    client = official_client(devchain, 2, "OPG")
    balances = Balances(devchain, "OPG", 2)
    stats = upstream_stats(upstream)
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}

    async with x402HttpxClient(client, timeout=30) as http:
        async with http.stream("POST", gateway.url + CHAT, json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            settle = x402HTTPClient(client).get_payment_settle_response(r.headers.get)
            text = (await r.aread()).decode()

    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    pieces = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1] if json.loads(e)["choices"]]
    assert "".join(pieces) == "Echo: hello paid world"
    assert settle.success is True and receipt_status(devchain, settle.transaction) == 1
    assert balances.moved() == (CHAT_PRICE["OPG"],) * 2
    assert upstream_stats(upstream)["by_path"][CHAT] - stats["by_path"].get(CHAT, 0) == 1


@pytest.mark.parametrize(
    "path,body,price_usdc",
    [("/v1/messages", MESSAGES_BODY, 15_000), ("/v2/models/m1/infer", INFER_BODY, 2_000)],
    ids=["anthropic-messages", "kserve-infer"],
)
async def test_official_client_pays_other_protocols(devchain: dict, gateway: Any, upstream: Any,
                                                    path: str, body: dict, price_usdc: int) -> None:
    client = official_client(devchain, 3, "USDC")
    balances = Balances(devchain, "USDC", 3)
    stats = upstream_stats(upstream)
    async with x402HttpxClient(client, timeout=30) as http:
        r = await http.post(gateway.url + path, json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    if path == "/v1/messages":
        assert doc["type"] == "message" and doc["content"][0]["text"] == "Echo: hello claude"
    else:
        assert doc["model_name"] == "m1" and doc["outputs"][0]["data"] == [2.0, 4.0, 6.0]
    settle = x402HTTPClient(client).get_payment_settle_response(r.headers.get)
    assert settle.success and receipt_status(devchain, settle.transaction) == 1
    assert balances.moved() == (price_usdc, price_usdc)
    after = upstream_stats(upstream)
    assert after["by_path"][path] - stats["by_path"].get(path, 0) == 1 and after["saw_payment"] == 0


# -- binding: a payment is for exactly what was offered ---------------------------------------------


async def test_payment_for_a_cheaper_route_is_refused(devchain: dict, gateway: Any, upstream: Any) -> None:
    payment = await sign_for(devchain, gateway.url + "/v1/embeddings", EMBED_BODY, symbol="USDC", agent=0)
    balances = Balances(devchain, "USDC", 0)
    stats = upstream_stats(upstream)

    r = await call(gateway.url + CHAT, CHAT_BODY, payment=payment)
    assert r.status == 402, r
    assert r.json()["error"] == "invalid_payment_requirements" and "amount" in r.json()["message"]
    assert r.required is not None and r.required.error == "invalid_payment_requirements"
    assert balances.moved() == (0, 0)
    assert upstream_stats(upstream)["requests"] == stats["requests"]


def _alter(payment: dict, field: str) -> None:
    value = {"payTo": OTHER, "asset": OTHER, "network": "eip155:1"}[field]
    payment["accepted"][field] = value


@pytest.mark.parametrize("how", ["signed", "accepted-only"])
@pytest.mark.parametrize("field", ["payTo", "asset", "network"])
async def test_altered_payment_is_refused_before_the_facilitator(devchain: dict, guarded: tuple[Any, Any],
                                                                 upstream: Any, field: str, how: str) -> None:
    gw, hostile = guarded
    requirement = await offered(gw.url + CHAT, CHAT_BODY, "USDC", devchain)
    if how == "signed":  # the agent signed the altered terms: accepted and the signed data agree
        altered = copy.deepcopy(requirement)
        _alter({"accepted": altered}, field)
        payment = await sign_async(devchain, altered, agent=1, url=gw.url + CHAT)
        assert payment["accepted"][field] == altered[field]
    else:  # a valid signature, then only `accepted` rewritten
        payment = await sign_async(devchain, requirement, agent=1, url=gw.url + CHAT)
        _alter(payment, field)
    balances = Balances(devchain, "USDC", 1)
    verifies = facilitator_stats(hostile)["verify"]
    stats = upstream_stats(upstream)

    r = await call(gw.url + CHAT, CHAT_BODY, payment=payment)
    assert r.status == 402, r
    assert r.json()["error"] == "invalid_payment_requirements" and field in r.json()["message"]
    assert facilitator_stats(hostile)["verify"] == verifies  # never asked
    assert upstream_stats(upstream)["requests"] == stats["requests"]
    assert balances.moved() == (0, 0)


# -- not charged when the provider fails ------------------------------------------------------------


@pytest.mark.parametrize("fault,status", [("500", 502), ("503", 502), ("cut:20", 502), ("400", 400), ("429", 429)])
async def test_upstream_failure_is_not_charged_and_the_payment_stays_usable(
    devchain: dict, gateway: Any, upstream: Any, fault: str, status: int
) -> None:
    payment = await sign_for(devchain, gateway.url + CHAT, CHAT_BODY, symbol="OPG", agent=1)
    balances = Balances(devchain, "OPG", 1)
    stats = upstream_stats(upstream)

    r = await call(gateway.url + CHAT, CHAT_BODY, payment=payment, headers={"X-Devupstream-Fault": fault})
    assert r.status == status, r  # a failed provider (5xx, a cut body) is the gateway's 502; a 4xx passes through
    if status == 502:
        assert r.json()["error"] == "upstream_error" and "not charged" in r.json()["message"]
        if fault != "cut:20":
            assert r.json()["upstream_status"] == int(fault) and f"injected fault {fault}" in r.json()["upstream_body"]
    else:
        assert r.json()["error"]["message"] == f"injected fault {fault}"
    assert "PAYMENT-RESPONSE" not in r.headers and b"Echo:" not in r.body
    assert balances.moved() == (0, 0)

    r = await call(gateway.url + CHAT, CHAT_BODY, payment=payment)
    assert r.status == 200, r
    assert chat_content(r.json()) == "Echo: hello paid world"
    assert r.settle is not None and r.settle.success
    assert balances.moved() == (CHAT_PRICE["OPG"],) * 2
    assert upstream_stats(upstream)["by_path"][CHAT] - stats["by_path"].get(CHAT, 0) == 2


# -- challenges, free and unpriced paths ------------------------------------------------------------


@pytest.mark.parametrize("path,body", [
    ("/v1/embeddings", None),
    (CHAT, CHAT_BODY),
    (CHAT, None),
], ids=["embeddings", "chat-with-body", "chat-no-body"])
async def test_head_is_challenged_and_never_charged(devchain: dict, gateway: Any, upstream: Any,
                                                    path: str, body: dict | None) -> None:
    sign_body = body or (EMBED_BODY if path == "/v1/embeddings" else CHAT_BODY)
    payment = await sign_for(devchain, gateway.url + path, sign_body, symbol="USDC", agent=2)
    balances = Balances(devchain, "USDC", 2)
    stats = upstream_stats(upstream)

    for attached in (None, payment):
        r = await call(gateway.url + path, body, method="HEAD", payment=attached)
        assert r.status == 402, (attached is not None, r.status, dict(r.headers))
        assert r.required is not None and len(r.required.accepts) == 2
        assert "PAYMENT-RESPONSE" not in r.headers
    assert balances.moved() == (0, 0)
    assert upstream_stats(upstream)["requests"] == stats["requests"]


def _malformed(devchain: dict, valid: dict) -> dict[str, str]:
    wrong_types = copy.deepcopy(valid)
    wrong_types["accepted"]["amount"] = int(wrong_types["accepted"]["amount"])
    return {
        "not-base64": "%%% this is not base64 %%%",
        "base64-not-json": b64("hello, I am not JSON"),
        "json-array": b64(json.dumps([1, 2, 3])),
        "wrong-types": b64(json.dumps(wrong_types)),
        "oversized-20KB": b64(json.dumps({**valid, "padding": "a" * 15_000})),
    }


MALFORMED_CASES = ["not-base64", "base64-not-json", "json-array", "wrong-types", "oversized-20KB"]


@pytest.fixture(scope="module")
async def valid_payment(devchain: dict, gateway: Any) -> dict:
    return await sign_for(devchain, gateway.url + CHAT, CHAT_BODY, symbol="USDC", agent=3)


@pytest.mark.parametrize("case", MALFORMED_CASES)
async def test_malformed_payment_header_gets_a_structured_refusal(devchain: dict, gateway: Any, upstream: Any,
                                                                  valid_payment: dict, case: str) -> None:
    value = _malformed(devchain, valid_payment)[case]
    if case == "oversized-20KB":
        assert len(value) > 20_000
    stats = upstream_stats(upstream)
    r = await call(gateway.url + CHAT, CHAT_BODY, payment=value)
    assert r.status in (400, 402), r
    doc = r.json()
    assert isinstance(doc.get("error"), str) and doc["error"] and isinstance(doc.get("message"), str) and doc["message"]
    assert upstream_stats(upstream)["requests"] == stats["requests"]


async def test_no_payment_gets_a_v2_header_and_a_v1_body(devchain: dict, gateway: Any, upstream: Any) -> None:
    stats = upstream_stats(upstream)
    r = await call(gateway.url + CHAT, {**CHAT_BODY, "model": "gpt-4o"})
    assert r.status == 402
    required = r.required
    assert required is not None and required.x402_version == 2 and required.error == "payment_required"
    assert required.resource.url == gateway.url + CHAT
    payee = devchain["accounts"]["payee"]["address"].lower()
    by_asset = {a.asset.lower(): a for a in required.accepts}
    opg, usdc = (devchain["tokens"][s]["address"].lower() for s in ("OPG", "USDC"))
    assert by_asset[opg].amount == str(2 * 10**16) and by_asset[usdc].amount == "20000"  # gpt-4o: 0.02
    assert by_asset[opg].extra.get("assetTransferMethod") == "permit2"
    assert all(a.pay_to.lower() == payee and a.network == devchain["network"] for a in required.accepts)

    doc = r.json()
    assert doc["x402Version"] == 1 and doc["message"] and "0.02" in doc["message"]
    v1 = {a["asset"].lower(): a for a in doc["accepts"]}
    assert v1[opg]["maxAmountRequired"] == str(2 * 10**16) and v1[usdc]["maxAmountRequired"] == "20000"
    assert all(a["network"] == "base-sepolia" and a["resource"] == gateway.url + CHAT for a in doc["accepts"])
    assert upstream_stats(upstream)["requests"] == stats["requests"]


async def test_models_list_is_free_and_names_prices(devchain: dict, gateway: Any, upstream: Any) -> None:
    stats = upstream_stats(upstream)
    r = await call(gateway.url + "/v1/models", method="GET")
    assert r.status == 200 and "PAYMENT-REQUIRED" not in r.headers
    rows = {(row["route"], row["model"]): row for row in r.json()["data"]}
    gpt4o = {p["display"]: p["amount"] for p in rows[("POST /v1/chat/completions", "gpt-4o")]["price"]}
    assert gpt4o == {"0.02 OPG": str(2 * 10**16), "0.02 USDC": "20000"}
    infer = {p["display"] for p in rows[("POST /v2/models/{name}/infer", "*")]["price"]}
    assert infer == {"0.002 OPG", "0.002 USDC"}
    assert upstream_stats(upstream)["requests"] == stats["requests"]


@pytest.mark.parametrize("method,path,status", [
    ("POST", "/v1/secret", 404), ("GET", "/admin", 404), ("GET", "/_stats", 404),
    ("GET", "/v1/chat/completions", 405),
])
async def test_unpriced_paths_are_not_proxied(gateway: Any, upstream: Any, method: str, path: str, status: int) -> None:
    stats = upstream_stats(upstream)
    r = await call(gateway.url + path, {"x": 1} if method == "POST" else None, method=method)
    assert r.status == status, r
    assert r.json()["error"] in ("not_found", "method_not_allowed")
    assert upstream_stats(upstream)["requests"] == stats["requests"]


# -- payment-identifier: a retry is not a second charge ---------------------------------------------


async def test_payment_identifier_retry_is_not_charged_twice(devchain: dict, gateway: Any, upstream: Any) -> None:
    pid = "pay_" + os.urandom(16).hex()
    first = await sign_for(devchain, gateway.url + CHAT, CHAT_BODY, symbol="USDC", agent=0, payment_id=pid)
    second = await sign_for(devchain, gateway.url + CHAT, CHAT_BODY, symbol="USDC", agent=0, payment_id=pid)
    assert first["payload"] != second["payload"]  # freshly signed: another nonce
    balances = Balances(devchain, "USDC", 0)
    stats = upstream_stats(upstream)

    r1 = await call(gateway.url + CHAT, CHAT_BODY, payment=first)
    assert r1.status == 200, r1
    r2 = await call(gateway.url + CHAT, CHAT_BODY, payment=second)
    assert r2.status == 200, r2
    assert r2.body == r1.body
    assert r2.settle is not None and r2.settle.transaction == r1.settle.transaction
    assert balances.moved() == (CHAT_PRICE["USDC"],) * 2
    assert upstream_stats(upstream)["by_path"][CHAT] - stats["by_path"].get(CHAT, 0) == 1


@pytest.mark.parametrize("who", ["another-wallet", "forged-signature"])
async def test_payment_identifier_is_not_a_voucher(devchain: dict, gateway: Any, upstream: Any, who: str) -> None:
    """The id keys one payer's retries: a payment from another wallet, or one whose signature is
    garbage, sent under someone else's id must not get the paid response for free."""
    pid = "pay_" + os.urandom(16).hex()
    owner = await sign_for(devchain, gateway.url + CHAT, CHAT_BODY, symbol="USDC", agent=0, payment_id=pid)
    r1 = await call(gateway.url + CHAT, CHAT_BODY, payment=owner)
    assert r1.status == 200, r1

    if who == "another-wallet":
        other = await sign_for(devchain, gateway.url + CHAT, CHAT_BODY, symbol="USDC", agent=1, payment_id=pid)
    else:
        other = copy.deepcopy(owner)
        other["payload"]["authorization"]["from"] = devchain["accounts"]["agents"][1]["address"]
        other["payload"]["authorization"]["nonce"] = "0x" + os.urandom(32).hex()
        other["payload"]["signature"] = "0x" + "11" * 65
    balances = Balances(devchain, "USDC", 1)
    calls = upstream_stats(upstream)["by_path"][CHAT]
    r2 = await call(gateway.url + CHAT, CHAT_BODY, payment=other)
    assert balances.moved() == (0, 0) and upstream_stats(upstream)["by_path"][CHAT] == calls
    assert r2.status in (400, 402, 409), f"served without paying: {r2}"
