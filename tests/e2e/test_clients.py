"""Clients we did not write, used as a new user would (issue 9 §5).

- The official `x402` client installed as `x402[evm,httpx]` (no `jsonschema`) pays on a default
  gateway: its 402 declares no extensions. A gateway whose operator turned the payment-identifier
  extension on declares it, and that client then needs `jsonschema` (README: client extras).
- The `openai` SDK, its HTTP client paying through x402, reads the `PAYMENT-RESPONSE` receipt of a
  paid call and of a paid stream (settled before its first byte) from the response headers.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from typing import Any

import openai
import pytest
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients.httpx import x402HttpxClient
from x402.mechanisms.evm.exact.register import register_exact_evm_client

from tests.budget_helpers import derived, fund, opg_balance
from tests.gateway_client import CHAT, CHAT_BODY, CHAT_PRICE, Processes, call, receipt_status, sign_for
from tests.upto_helpers import SIGNED_MAX_OPG, replica_env, upto_config

pytestmark = pytest.mark.e2e

# The official client as installed with `pip install "x402[evm,httpx]"`: jsonschema (the
# `extensions` extra) cannot be imported. Prints what it got as one JSON line.
CLIENT_WITHOUT_JSONSCHEMA = r"""
import sys
sys.modules["jsonschema"] = None  # `import jsonschema` raises ImportError, as when it is not installed
import asyncio, json
from eth_account import Account
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients.httpx import x402HttpxClient
from x402.mechanisms.evm.exact.register import register_exact_evm_client

async def main(url: str, key: str, asset: str, body: str) -> None:
    client = x402Client()
    register_exact_evm_client(client, Account.from_key(key))
    client.set_spend_controls(False)  # the dev tokens are not in the SDK's default-asset table
    client.register_policy(lambda version, reqs: [r for r in reqs if r.asset.lower() == asset])
    async with x402HttpxClient(client, timeout=30) as http:
        try:
            r = await http.post(url, json=json.loads(body))
        except Exception as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
            return
    out = {"status": r.status_code, "body": r.text[:300]}
    if r.status_code == 200:
        out["transaction"] = x402HTTPClient(client).get_payment_settle_response(r.headers.get).transaction
    print(json.dumps(out))

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def stack(devchain_file: str, redis_server: Any, devchain: dict, tmp_path_factory: pytest.TempPathFactory):
    """Gateways on the dev configuration: one as shipped (defaults), one with the payment-identifier
    extension turned on, and one with metered routes (upto and exact at the per-call maximum)."""
    procs = Processes(devchain_file, tmp_path_factory.mktemp("clients"))
    try:
        upstream = procs.upstream()
        gateways = {}
        for name, extra in (("default", {}), ("ids", {"GATEWAY_PAYMENT_IDENTIFIER": "true"})):
            prefix = f"clients-{name}:{uuid.uuid4().hex[:8]}:"
            env = {"GATEWAY_STORE_PREFIX": prefix + "gw:", "FACILITATOR_STORE_PREFIX": prefix + "fac:", **extra}
            gateways[name] = procs.gateway(upstream.url, redis_server.url, env=env)
        prefix = f"clients-metered:{uuid.uuid4().hex[:8]}:"
        config = upto_config(procs.log_dir / "metered.json", devchain, devchain_file, upstream.url, redis_server.url,
                             pay_to=derived(f"clients:payee:{prefix}").address)
        gateways["metered"] = procs.gateway(upstream.url, redis_server.url, config=config,
                                            env=replica_env(prefix, None))
        yield gateways
    finally:
        procs.stop_all()


def agent(devchain: dict, label: str) -> Any:
    account = derived(f"clients:{label}:{uuid.uuid4().hex}")
    fund(devchain, account)
    return account


def required_doc(reply: Any) -> dict:
    """The PAYMENT-REQUIRED header as the JSON a client decodes (not through our models)."""
    return json.loads(base64.b64decode(reply.headers["PAYMENT-REQUIRED"]))


def pay_without_jsonschema(url: str, key: str, asset: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CLIENT_WITHOUT_JSONSCHEMA, url, key, asset, json.dumps(CHAT_BODY)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


async def test_a_default_gateway_declares_no_extensions_and_a_client_without_jsonschema_pays(
        devchain: dict, stack: dict) -> None:
    gw = stack["default"]
    reply = await call(gw.url + CHAT, CHAT_BODY)
    assert reply.status == 402 and "extensions" not in required_doc(reply), required_doc(reply)

    payer = agent(devchain, "no-jsonschema")
    opg = devchain["tokens"]["OPG"]["address"].lower()
    before = opg_balance(devchain, payer.address)
    out = pay_without_jsonschema(gw.url + CHAT, "0x" + bytes(payer.key).hex(), opg)
    assert out.get("status") == 200, out
    assert receipt_status(devchain, out["transaction"]) == 1
    assert before - opg_balance(devchain, payer.address) == CHAT_PRICE["OPG"]  # paid once


async def test_where_the_operator_turns_payment_identifier_on_the_402_declares_it(devchain: dict, stack: dict) -> None:
    gw = stack["ids"]
    reply = await call(gw.url + CHAT, CHAT_BODY)
    assert reply.status == 402
    assert set(required_doc(reply)["extensions"]) == {"payment-identifier"}
    # ... and the client then needs jsonschema (the README says so): without it, nothing is paid.
    payer = agent(devchain, "ids-no-jsonschema")
    before = opg_balance(devchain, payer.address)
    out = pay_without_jsonschema(gw.url + CHAT, "0x" + bytes(payer.key).hex(), devchain["tokens"]["OPG"]["address"].lower())
    assert out.get("status") != 200 and "jsonschema" in json.dumps(out), out
    assert opg_balance(devchain, payer.address) == before


async def test_a_payment_identifier_is_ignored_where_it_is_not_declared(devchain: dict, stack: dict) -> None:
    """A client may send the extension anyway: the payment is served and charged as any other,
    and the id does not make a second payment a free replay of the first."""
    gw = stack["default"]
    pid = "pay_" + uuid.uuid4().hex
    first = await sign_for(devchain, gw.url + CHAT, CHAT_BODY, symbol="USDC", agent=2, payment_id=pid)
    second = await sign_for(devchain, gw.url + CHAT, CHAT_BODY, symbol="USDC", agent=2, payment_id=pid)
    r1 = await call(gw.url + CHAT, CHAT_BODY, payment=first)
    r2 = await call(gw.url + CHAT, CHAT_BODY, payment=second)
    assert r1.status == 200 and r2.status == 200, (r1, r2)
    assert r1.settle and r2.settle and r1.settle.transaction != r2.settle.transaction


def opg_client(devchain: dict, account: Any) -> x402Client:
    client = x402Client()
    register_exact_evm_client(client, account)
    client.set_spend_controls(False)
    asset = devchain["tokens"]["OPG"]["address"].lower()
    client.register_policy(lambda version, reqs: [r for r in reqs if r.asset.lower() == asset])
    return client


async def test_the_openai_sdk_reads_the_receipt_of_a_paid_call_and_of_a_paid_stream(devchain: dict, stack: dict) -> None:
    gw = stack["default"]
    payer = agent(devchain, "openai-sdk")
    client = opg_client(devchain, payer)
    before = opg_balance(devchain, payer.address)
    messages = [{"role": "user", "content": "hello paid world"}]
    async with x402HttpxClient(client, timeout=30) as http:
        oa = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-agent-own", http_client=http, max_retries=0)

        raw = await oa.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
        completion = raw.parse()
        assert completion.choices[0].message.content == "Echo: hello paid world"
        settled = x402HTTPClient(client).get_payment_settle_response(raw.headers.get)
        assert settled.success and receipt_status(devchain, settled.transaction) == 1

        async with oa.chat.completions.with_streaming_response.create(model="gpt-4o-mini", messages=messages,
                                                                      stream=True) as response:
            assert response.headers.get("content-type", "").startswith("text/event-stream")
            receipt = response.headers.get("PAYMENT-RESPONSE")
            assert receipt, dict(response.headers)
            text = "".join([c.choices[0].delta.content or "" async for c in await response.parse() if c.choices])
        assert text == "Echo: hello paid world"
        streamed = x402HTTPClient(client).get_payment_settle_response(response.headers.get)
        assert streamed.success and streamed.transaction != settled.transaction
        assert receipt_status(devchain, streamed.transaction) == 1
    assert before - opg_balance(devchain, payer.address) == 2 * CHAT_PRICE["OPG"]  # each call paid once


async def test_the_openai_sdk_reads_the_receipt_of_an_exact_stream_on_a_metered_route(devchain: dict,
                                                                                       stack: dict) -> None:
    """`exact` on a metered route pays the per-call maximum and settles before the first byte: the
    receipt is in the headers, and the stream has no usage the client did not ask for."""
    gw = stack["metered"]
    payer = agent(devchain, "openai-metered")
    client = opg_client(devchain, payer)  # registers `exact` only: the route's exact offer is chosen
    before = opg_balance(devchain, payer.address)
    async with x402HttpxClient(client, timeout=30) as http:
        oa = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-agent-own", http_client=http, max_retries=0)
        async with oa.chat.completions.with_streaming_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "stream it"}], stream=True) as response:
            settled = x402HTTPClient(client).get_payment_settle_response(response.headers.get)
            chunks = [c async for c in await response.parse()]
    assert settled.success and receipt_status(devchain, settled.transaction) == 1
    assert chunks and all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Echo: stream it"
    assert before - opg_balance(devchain, payer.address) == SIGNED_MAX_OPG
