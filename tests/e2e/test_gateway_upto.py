"""Pay for what was used (issue 5): the `upto` scheme end to end on the dev chain, with real gateway
processes (facilitator in-process), the stand-in upstream, a real Redis and money moving on-chain.

Without sessions (one gateway, budgets on):
- the official x402 client with UptoEvmScheme pays a chat completion: the settled amount is the
  cost computed here from the response's `usage`, below the signed maximum; a free model settles 0
  with no transaction;
- a streamed call is charged what its final usage says; a stream cut by the upstream or by the
  client is charged by the route's policy (ceiling: the signed maximum); an upstream 500 nothing;
- budgets hold the maximum while a call runs and end at exactly the sum of metered costs.

Sessions (gateway replicas sharing Redis):
- 50 calls (some streamed) under one signature across two replicas settle in one transfer for
  the summed charges;
- a session whose permit deadline approaches stops serving and is settled before the deadline;
- a replica killed with an open session loses nothing, even mid-call (the surviving replica settles
  it, at the deadline rule when the dead call's hold never clears); with a signer key per replica
  the survivor leaves the session open for the key holder instead of failing it;
- a call that would cross the cap gets a 402 with a fresh PAYMENT-REQUIRED and a new permit opens
  a new session; with a cap below max_per_call, max_tokens is capped to what the session can pay;
- a call still running when its session is about to be settled is ended (not charged, or charged
  its floor if it was streaming) before the settlement.

Every test pays a fresh payee (a fresh gateway config or a module-wide one, used by one test at a
time) from a fresh agent, so balances and Transfer logs belong to the test alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as redis_sync
from x402.http import x402HTTPClient
from x402.http.clients.httpx import x402HttpxClient

from facilitator.x402.headers import decode_payment_response
from tests.budget_helpers import ADMIN_TOKEN, Admin, derived, fund, opg_balance, opg_policy
from tests.gateway_client import Processes, Reply, call
from tests.upto_helpers import (
    CHAT,
    FAULT,
    SESSION,
    SIGNED_MAX_OPG,
    block_time,
    chat,
    cost_opg,
    payment_event,
    replica_env,
    session_state,
    sign_upto,
    sse_events,
    stream_usage,
    transfers_to,
    tx_receipt,
    upto_accept,
    upto_client,
    upto_config,
    usd_to_opg,
    wait_for,
    wait_session,
)

pytestmark = pytest.mark.e2e

SEED = "upto-e2e"


def agent(label: str, devchain: dict) -> Any:
    account = derived(f"{SEED}:{label}")
    fund(devchain, account)
    return account


class Money:
    """OPG balances of a payer and a payee, and the Transfers the payee received, since creation."""

    def __init__(self, devchain: dict, payer: str, payee: str) -> None:
        self.devchain, self.payer, self.payee = devchain, payer, payee
        self.before = (opg_balance(devchain, payer), opg_balance(devchain, payee))
        self.seen = len(transfers_to(devchain, payee))

    def moved(self) -> tuple[int, int]:
        """(paid by the payer, received by the payee)."""
        return (self.before[0] - opg_balance(self.devchain, self.payer),
                opg_balance(self.devchain, self.payee) - self.before[1])

    def transfers(self) -> list[dict]:
        return transfers_to(self.devchain, self.payee)[self.seen:]


# ==================================================================================================
# Without sessions: one gateway (budgets on, so the ledger shows what was charged and why).


@pytest.fixture(scope="module")
def metered(devchain: dict, devchain_file: str, redis_server: Any, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("upto")
    procs = Processes(devchain_file, tmp)
    try:
        upstream = procs.upstream()
        prefix = f"upto-{time.time_ns()}:"
        payee = derived(f"{SEED}:payee:{prefix}").address
        budget_agent = agent("budget", devchain)
        budgets = {"store_url": redis_server.url, "store_prefix": f"{prefix}b:", "timezone": "UTC",
                   "default": "budget", "default_daily": "1000", "default_rate_per_minute": 10_000,
                   "policies": [opg_policy(devchain, budget_agent.address, 10**21)]}
        config = upto_config(tmp / "gateway.json", devchain, devchain_file, upstream.url, redis_server.url,
                             pay_to=payee, budgets=budgets)
        key = devchain["accounts"]["facilitator"][0]["private_key"]
        gateway = procs.gateway(upstream.url, redis_server.url, config=config,
                                env=replica_env(prefix, [key], BUDGETS_ADMIN_TOKEN=ADMIN_TOKEN))
        yield {"gateway": gateway, "upstream": upstream, "payee": payee, "budget_agent": budget_agent,
               "admin": Admin(gateway.url)}
    finally:
        procs.stop_all()


def settle_of(response: Any) -> Any:
    value = response.headers.get("PAYMENT-RESPONSE")
    assert value, dict(response.headers)
    return decode_payment_response(value)


async def test_official_client_pays_the_metered_cost_of_a_chat_completion(devchain: dict, metered: dict) -> None:
    gw, payee = metered["gateway"], metered["payee"]
    payer = agent("plain", devchain)
    body = chat("gpt-4o", "count the tokens of this paid upto call please")

    offer = upto_accept(await call(gw.url + CHAT, body))
    assert offer.asset.lower() == devchain["tokens"]["OPG"]["address"].lower()
    assert int(offer.amount) == SIGNED_MAX_OPG  # $0.05 at $0.10 per OPG
    assert offer.extra.get("facilitatorAddress")

    money = Money(devchain, payer.address, payee)
    client = upto_client(devchain, payer)
    async with x402HttpxClient(client, timeout=30) as http:
        r = await http.post(gw.url + CHAT, json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["choices"][0]["message"]["content"].startswith("Echo: count the tokens")
    usage = doc["usage"]
    expected = cost_opg("gpt-4o", usage)
    assert 0 < expected < SIGNED_MAX_OPG

    settle = x402HTTPClient(client).get_payment_settle_response(r.headers.get)
    assert settle.success and settle.transaction
    assert int(settle_of(r).amount) == expected
    assert int(tx_receipt(devchain, settle.transaction)["status"], 16) == 1
    assert money.moved() == (expected, expected)
    assert [(t["tx"], t["amount"]) for t in money.transfers()] == [(settle.transaction, expected)]


async def test_a_free_model_settles_nothing_and_sends_no_transaction(devchain: dict, metered: dict) -> None:
    gw, payee = metered["gateway"], metered["payee"]
    payer = agent("free", devchain)
    money = Money(devchain, payer.address, payee)
    async with x402HttpxClient(upto_client(devchain, payer), timeout=30) as http:
        r = await http.post(gw.url + CHAT, json=chat("free-model", "nothing to pay"))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] > 0
    settle = settle_of(r)
    assert settle.success and settle.amount == "0" and settle.transaction == ""
    assert money.moved() == (0, 0)
    assert money.transfers() == []


async def test_a_streamed_call_is_charged_what_its_final_usage_says(devchain: dict, metered: dict) -> None:
    gw, payee = metered["gateway"], metered["payee"]
    payer = agent("stream", devchain)
    money = Money(devchain, payer.address, payee)
    # The agent asks for stream usage, so it gets it (the gateway would have asked anyway).
    async with x402HttpxClient(upto_client(devchain, payer), timeout=30) as http:
        body = chat("gpt-4o-mini", "stream me some words", stream=True, stream_options={"include_usage": True})
        async with http.stream("POST", gw.url + CHAT, json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            text = (await r.aread()).decode()

    usage = stream_usage(text)
    assert usage is not None, text[-500:]
    event = payment_event(text)
    expected = cost_opg("gpt-4o-mini", usage)
    assert event["success"] is True and event["usage_policy"] == "metered"
    assert (event["input_tokens"], event["output_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert int(event["amount"]) == expected and 0 < expected < SIGNED_MAX_OPG
    assert decode_payment_response(event["paymentResponse"]).transaction == event["transaction"]
    assert int(tx_receipt(devchain, event["transaction"])["status"], 16) == 1
    assert money.moved() == (expected, expected)
    assert [(t["tx"], t["amount"]) for t in money.transfers()] == [(event["transaction"], expected)]


async def test_a_stream_that_did_not_ask_for_usage_gets_none_and_is_still_metered(devchain: dict, metered: dict) -> None:
    """The gateway asks the upstream for stream usage to meter the call; an agent that did not ask
    gets the stream OpenAI would send it: no `usage` field, no usage-only chunk (issue 9)."""
    gw, payee = metered["gateway"], metered["payee"]
    payer = agent("stream-no-usage", devchain)
    money = Money(devchain, payer.address, payee)
    async with x402HttpxClient(upto_client(devchain, payer), timeout=30) as http:
        async with http.stream("POST", gw.url + CHAT, json=chat("gpt-4o-mini", "stream quietly", stream=True)) as r:
            assert r.status_code == 200
            text = (await r.aread()).decode()

    chunks = [json.loads(data) for name, data in sse_events(text) if name == "message" and data != "[DONE]"]
    assert chunks and all("usage" not in c and c["choices"] for c in chunks), text[-500:]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and "[DONE]" in text
    event = payment_event(text)
    assert event["success"] is True and event["usage_policy"] == "metered" and event["output_tokens"] > 0
    expected = cost_opg("gpt-4o-mini", {"prompt_tokens": event["input_tokens"], "completion_tokens": event["output_tokens"]})
    assert int(event["amount"]) == expected and money.moved() == (expected, expected)


async def test_a_stream_cut_by_the_upstream_is_charged_by_the_policy(devchain: dict, metered: dict) -> None:
    gw, payee = metered["gateway"], metered["payee"]
    payer = agent("upstream-cut", devchain)
    money = Money(devchain, payer.address, payee)
    async with x402HttpxClient(upto_client(devchain, payer), timeout=30) as http:
        async with http.stream("POST", gw.url + CHAT, json=chat("gpt-4o", "a stream the provider drops", stream=True),
                               headers={FAULT: "cut:3"}) as r:
            assert r.status_code == 200
            text = (await r.aread()).decode()

    assert stream_usage(text) is None and "[DONE]" not in text
    event = payment_event(text)
    # missing_usage = "ceiling" (the default): the signed maximum, and the event says why.
    assert event["usage_policy"] == "ceiling" and event["reason"] == "stream cut"
    assert event["success"] is True and int(event["amount"]) == SIGNED_MAX_OPG
    assert money.moved() == (SIGNED_MAX_OPG, SIGNED_MAX_OPG)
    assert [(t["tx"], t["amount"]) for t in money.transfers()] == [(event["transaction"], SIGNED_MAX_OPG)]


async def test_a_stream_cut_by_the_client_is_charged_by_the_policy(devchain: dict, metered: dict) -> None:
    gw, payee = metered["gateway"], metered["payee"]
    payer = agent("client-cut", devchain)
    money = Money(devchain, payer.address, payee)
    chunks = 0
    async with x402HttpxClient(upto_client(devchain, payer), timeout=30) as http:
        async with http.stream("POST", gw.url + CHAT, json=chat("gpt-4o", " ".join(["word"] * 40), stream=True),
                               headers={FAULT: "drip:150"}) as r:
            assert r.status_code == 200
            async for _ in r.aiter_raw():
                chunks += 1
                if chunks == 3:
                    break  # leaving the block closes the connection mid-stream
    assert chunks == 3

    async def charged() -> bool:
        return money.moved() != (0, 0)

    await wait_for(charged, timeout_s=15, what="the client-cut stream's settlement")
    await asyncio.sleep(0.3)
    assert money.moved() == (SIGNED_MAX_OPG, SIGNED_MAX_OPG)
    [transfer] = money.transfers()
    entries = [e for e in await metered["admin"].ledger(payer.address) if e["tx_hash"] == transfer["tx"]]
    assert len(entries) == 1, entries
    assert int(entries[0]["amount"]) == SIGNED_MAX_OPG
    assert entries[0]["extra"]["usage_policy"] == "ceiling" and entries[0]["extra"]["reason"] == "stream cut"


async def test_an_upstream_failure_is_charged_nothing(devchain: dict, metered: dict) -> None:
    gw, payee = metered["gateway"], metered["payee"]
    payer = agent("upstream-500", devchain)
    money = Money(devchain, payer.address, payee)
    async with x402HttpxClient(upto_client(devchain, payer), timeout=30) as http:
        r = await http.post(gw.url + CHAT, json=chat("gpt-4o", "this one fails"), headers={FAULT: "500"})
        s = await http.post(gw.url + CHAT, json=chat("gpt-4o", "this stream fails", stream=True),
                            headers={FAULT: "500"})
    assert r.status_code == 502 and s.status_code == 502, (r.text, s.text)  # upstream_error: not charged
    assert r.json()["error"] == "upstream_error" and r.json()["upstream_status"] == 500
    assert "PAYMENT-RESPONSE" not in r.headers and "PAYMENT-RESPONSE" not in s.headers
    assert money.moved() == (0, 0)
    assert money.transfers() == []
    assert list(await metered["admin"].ledger(payer.address)) == []


async def test_budgets_reserve_the_maximum_and_commit_the_metered_cost(devchain: dict, metered: dict) -> None:
    gw, payee, admin = metered["gateway"], metered["payee"], metered["admin"]
    payer = metered["budget_agent"]
    start = await admin.usage(payer.address)
    assert (start["spent"], start["reserved"]) == (0, 0)
    money = Money(devchain, payer.address, payee)
    client = upto_client(devchain, payer)
    charged: list[int] = []
    async with x402HttpxClient(client, timeout=30) as http:
        # While a (slow) call runs, the budget holds the signed maximum.
        slow = asyncio.create_task(http.post(gw.url + CHAT, json=chat("gpt-4o", "slow budgeted call"),
                                             headers={FAULT: "slow:1500"}))
        held = await admin.wait_usage(payer.address, reserved=SIGNED_MAX_OPG, timeout_s=5)
        assert held["reserved"] == SIGNED_MAX_OPG and held["spent"] == 0, held
        r = await slow
        assert r.status_code == 200, r.text
        charged.append(cost_opg("gpt-4o", r.json()["usage"]))
        assert int(settle_of(r).amount) == charged[-1]

        for model, text in [("gpt-4o-mini", "second budgeted call"), ("claude-3-opus", "any other model"),
                            ("gpt-4o", "a longer budgeted call " * 5), ("free-model", "free")]:
            r = await http.post(gw.url + CHAT, json=chat(model, text))
            assert r.status_code == 200, r.text
            charged.append(cost_opg(model, r.json()["usage"]))
            assert int(settle_of(r).amount) == charged[-1]
        async with http.stream("POST", gw.url + CHAT, json=chat("gpt-4o", "budgeted stream", stream=True,
                                                                 stream_options={"include_usage": True})) as s:
            text = (await s.aread()).decode()
        charged.append(cost_opg("gpt-4o", stream_usage(text)))
        assert int(payment_event(text)["amount"]) == charged[-1]

    total = sum(charged)
    assert charged[-2] == 0 and all(0 < c < SIGNED_MAX_OPG for i, c in enumerate(charged) if i != 4)
    usage = await admin.wait_usage(payer.address, spent=total, reserved=0)
    assert (usage["spent"], usage["reserved"]) == (total, 0), usage
    assert usage["remaining"] == usage["limit"] - total
    assert money.moved() == (total, total)
    assert len(money.transfers()) == len(charged) - 1  # the free call sent nothing
    ledger = await admin.ledger(payer.address)
    assert sorted(int(e["amount"]) for e in ledger) == sorted(charged)


# ==================================================================================================
# Sessions: replicas sharing Redis. Each test gets its own config, payee, prefixes and processes.


def session_stack(devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
                  tmp_path: Path, label: str, *, replicas: int, sessions: dict[str, Any],
                  session_cap: str | None = None, keys: list[list[str] | None] | None = None) -> dict:
    upstream = spawn_upstream()
    prefix = f"upto-{label}-{time.time_ns()}:"
    payee = derived(f"{SEED}:payee:{prefix}").address
    config = upto_config(tmp_path / f"{label}.json", devchain, devchain_file, upstream.url, redis_server.url,
                         pay_to=payee, sessions=sessions, session_cap=session_cap)
    shared = [a["private_key"] for a in devchain["accounts"]["facilitator"][1:]]  # replicas share keys 1 and 2
    keys = keys or [shared] * replicas
    gateways = [spawn_gateway(upstream.url, redis_server.url, config=config, env=replica_env(prefix, keys[i]))
                for i in range(replicas)]
    return {"gateways": gateways, "upstream": upstream, "payee": payee, "prefix": prefix}


async def open_session(gateway_url: str, client: Any, body: dict) -> tuple[Reply, Any]:
    """402 -> sign its upto offer with the official client -> the paid call that opens a session."""
    offer = upto_accept(await call(gateway_url + CHAT, body))
    signature = await sign_upto(client, offer, gateway_url + CHAT)
    reply = await call(gateway_url + CHAT, body, headers={"PAYMENT-SIGNATURE": signature})
    assert reply.status == 200, reply
    assert reply.headers.get(SESSION, "").startswith("ses_"), dict(reply.headers)
    return reply, offer


def charge_of(reply: Reply, model: str) -> int:
    """The call's charge (X-Upto-Session-Charge), checked against the cost of its usage."""
    assert reply.status == 200, reply
    charge = int(reply.headers["X-Upto-Session-Charge"])
    assert charge == cost_opg(model, reply.json()["usage"]), (charge, reply.json()["usage"])
    return charge


async def streamed_session_call(gateway_url: str, session_id: str, body: dict) -> int:
    r = await call(gateway_url + CHAT, body, headers={SESSION: session_id})
    assert r.status == 200 and r.headers.get(SESSION) == session_id, r
    text = r.body.decode()
    event, usage = payment_event(text), stream_usage(text)
    assert usage is not None and "[DONE]" in text
    assert event["session"] == session_id and event["settlement"] == "deferred" and event["usage_policy"] == "metered"
    assert int(event["charged"]) == cost_opg(body["model"], usage), (event, usage)
    return int(event["charged"])


async def test_fifty_calls_across_two_replicas_settle_once_for_the_sum(
        devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
        tmp_path: Path) -> None:
    stack = session_stack(devchain, devchain_file, redis_server, spawn_upstream, spawn_gateway, tmp_path, "fifty",
                          replicas=2, sessions={"idle_s": 2})
    g = [gw.url for gw in stack["gateways"]]
    payer = agent("fifty", devchain)
    money = Money(devchain, payer.address, stack["payee"])
    client = upto_client(devchain, payer)

    first, offer = await open_session(g[0], client, chat("gpt-4o", "call 0"))
    assert int(offer.amount) == usd_to_opg(Decimal("1"))  # the session cap: $1 = 10 OPG
    sid = first.headers[SESSION]
    charges = [charge_of(first, "gpt-4o")]
    assert int(first.headers["X-Upto-Session-Accrued"]) == charges[0]

    async def one(i: int) -> int:
        if i % 10 == 5:  # some calls stream: charged by their final usage, reported in the last event
            return await streamed_session_call(g[i % 2], sid, chat("gpt-4o", f"stream {i}", stream=True,
                                                                   stream_options={"include_usage": True}))
        r = await call(g[i % 2] + CHAT, chat("gpt-4o", f"call {i} " + "more " * (i % 7)), headers={SESSION: sid})
        assert r.headers.get(SESSION) == sid
        return charge_of(r, "gpt-4o")

    for batch in range(1, 50, 10):  # 49 more, ten at a time, alternating replicas
        charges += await asyncio.gather(*(one(i) for i in range(batch, min(batch + 10, 50))))
    assert len(charges) == 50
    total = sum(charges)
    mid = await session_state(g[1], sid)
    assert (mid["state"], mid["calls"], int(mid["accrued"]), mid["held"]) == ("open", 50, total, "0")
    assert money.moved() == (0, 0)  # nothing settled per call

    done = await wait_session(g[0], sid, timeout_s=20)
    assert done["state"] == "settled" and done["calls"] == 50 and int(done["accrued"]) == total, done
    assert money.moved() == (total, total)
    transfers = money.transfers()
    assert [(t["tx"], t["amount"]) for t in transfers] == [(done["transaction"], total)]
    assert int(tx_receipt(devchain, done["transaction"])["status"], 16) == 1
    assert (await session_state(g[1], sid))["state"] == "settled"
    after = await call(g[1] + CHAT, chat("gpt-4o", "too late"), headers={SESSION: sid})
    assert after.status == 402 and after.required is not None and json.loads(after.body)["error"] == "session_closed"


async def test_a_session_near_its_permit_deadline_stops_serving_and_settles_in_time(
        devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
        tmp_path: Path) -> None:
    # max_timeout_s has a floor of 60: the permit lives 60 s; serve until deadline-55, settle at deadline-48.
    stack = session_stack(devchain, devchain_file, redis_server, spawn_upstream, spawn_gateway, tmp_path, "deadline",
                          replicas=1, sessions={"idle_s": 3600, "max_timeout_s": 60, "serve_margin_s": 55,
                                                "settle_margin_s": 48})
    g = stack["gateways"][0].url
    payer = agent("deadline", devchain)
    money = Money(devchain, payer.address, stack["payee"])
    first, offer = await open_session(g, upto_client(devchain, payer), chat("gpt-4o", "deadline 0"))
    assert offer.max_timeout_seconds == 60
    sid = first.headers[SESSION]
    charges = [charge_of(first, "gpt-4o")]
    for i in range(1, 4):
        r = await call(g + CHAT, chat("gpt-4o", f"deadline {i}"), headers={SESSION: sid})
        charges.append(charge_of(r, "gpt-4o"))
    deadline = (await session_state(g, sid))["deadline"]

    await asyncio.sleep(max(0.0, deadline - 55 - time.time()) + 0.5)  # past serve_until, before settlement
    late = await call(g + CHAT, chat("gpt-4o", "after serve_until"), headers={SESSION: sid})
    assert late.status == 402, late
    assert json.loads(late.body)["error"] == "session_expired"
    assert upto_accept(late).scheme == "upto"  # a fresh offer to sign
    assert (await session_state(g, sid))["state"] == "open"  # not settled yet: idle_s is an hour

    done = await wait_session(g, sid, timeout_s=20)
    assert done["state"] == "settled", done
    receipt = tx_receipt(devchain, done["transaction"])
    assert int(receipt["status"], 16) == 1
    mined_at = block_time(devchain, int(receipt["blockNumber"], 16))
    assert mined_at < deadline - 6, (mined_at, deadline)  # in time, with the facilitator's own margin
    total = sum(charges)
    assert int(done["accrued"]) == total and done["calls"] == 4
    assert money.moved() == (total, total)
    assert [(t["tx"], t["amount"]) for t in money.transfers()] == [(done["transaction"], total)]


async def test_a_call_running_across_the_forced_settlement_is_paid_or_not_served(
        devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
        tmp_path: Path) -> None:
    # serve until deadline-55, settle at deadline-51: a call started in time and lasting 9 s ends after it.
    stack = session_stack(devchain, devchain_file, redis_server, spawn_upstream, spawn_gateway, tmp_path, "overrun",
                          replicas=1, sessions={"idle_s": 3600, "max_timeout_s": 60, "serve_margin_s": 55,
                                                "settle_margin_s": 51})
    g = stack["gateways"][0].url
    payer = agent("overrun", devchain)
    money = Money(devchain, payer.address, stack["payee"])
    first, _ = await open_session(g, upto_client(devchain, payer), chat("gpt-4o", "overrun 0"))
    sid = first.headers[SESSION]
    charges = [charge_of(first, "gpt-4o")]
    slow = await call(g + CHAT, chat("gpt-4o", "a long call"), headers={SESSION: sid, FAULT: "slow:9000"})
    done = await wait_session(g, sid, timeout_s=20)
    assert done["state"] == "settled", done
    if slow.status == 200:  # served: it must have been paid for
        charges.append(charge_of(slow, "gpt-4o"))
    after = await session_state(g, sid)  # what the gateway says the session accrued, after the fact
    seen = {k: after[k] for k in ("state", "accrued", "calls", "held")}
    assert money.moved() == (sum(charges), sum(charges)), (money.moved(), charges, seen)


async def _killed_replica(devchain: dict, stack: dict, label: str) -> tuple[dict, int, Money]:
    a, b = stack["gateways"]
    payer = agent(label, devchain)
    money = Money(devchain, payer.address, stack["payee"])
    first, _ = await open_session(a.url, upto_client(devchain, payer), chat("gpt-4o", "on A"))
    sid = first.headers[SESSION]
    stack["last_session"] = sid
    charges = [charge_of(first, "gpt-4o")]
    for i in range(4):
        url = (a if i % 2 else b).url
        charges.append(charge_of(await call(url + CHAT, chat("gpt-4o", f"call {i}"), headers={SESSION: sid}), "gpt-4o"))
    a.kill()  # a crash: no cleanup, its reaper is gone
    done = await wait_session(b.url, sid, timeout_s=20)
    return done, sum(charges), money


async def test_a_replica_killed_with_an_open_session_loses_nothing(
        devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
        tmp_path: Path) -> None:
    stack = session_stack(devchain, devchain_file, redis_server, spawn_upstream, spawn_gateway, tmp_path, "kill",
                          replicas=2, sessions={"idle_s": 2})
    done, total, money = await _killed_replica(devchain, stack, "kill")
    assert done["state"] == "settled" and int(done["accrued"]) == total and done["calls"] == 5, done
    assert money.moved() == (total, total)
    assert [(t["tx"], t["amount"]) for t in money.transfers()] == [(done["transaction"], total)]


async def test_a_replica_killed_mid_call_loses_nothing_the_session_settles_before_its_deadline(
        devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
        tmp_path: Path) -> None:
    """A call in flight holds part of the cap, so the idle settlement waits for it; when its
    replica dies the hold is never released, and the session is settled by the deadline rule
    (forced, before the permit expires) on the surviving replica, for the calls that completed."""
    stack = session_stack(devchain, devchain_file, redis_server, spawn_upstream, spawn_gateway, tmp_path, "kill-mid",
                          replicas=2, sessions={"idle_s": 2, "max_timeout_s": 60, "serve_margin_s": 55,
                                                "settle_margin_s": 48})
    a, b = stack["gateways"]
    payer = agent("kill-mid", devchain)
    money = Money(devchain, payer.address, stack["payee"])
    first, _ = await open_session(a.url, upto_client(devchain, payer), chat("gpt-4o", "mid 0"))
    sid = first.headers[SESSION]
    charges = [charge_of(first, "gpt-4o")]
    charges.append(charge_of(await call(b.url + CHAT, chat("gpt-4o", "mid 1"), headers={SESSION: sid}), "gpt-4o"))
    in_flight = asyncio.create_task(call(a.url + CHAT, chat("gpt-4o", "never finishes"),
                                         headers={SESSION: sid, FAULT: "hang"}))

    async def held() -> bool:
        return (await session_state(b.url, sid))["held"] != "0"

    await wait_for(held, timeout_s=5, what="the in-flight call's hold")
    a.kill()
    with pytest.raises(aiohttp.ClientError):
        await in_flight  # the client sees the connection drop
    deadline = (await session_state(b.url, sid))["deadline"]
    await asyncio.sleep(3)  # past idle_s: not settled while the dead call's hold remains
    assert (await session_state(b.url, sid))["state"] == "open"

    done = await wait_session(b.url, sid, timeout_s=20)
    total = sum(charges)
    assert (done["state"], int(done["accrued"]), done["calls"]) == ("settled", total, 2), done
    receipt = tx_receipt(devchain, done["transaction"])
    assert block_time(devchain, int(receipt["blockNumber"], 16)) < deadline - 6
    assert money.moved() == (total, total)
    assert [(t["tx"], t["amount"]) for t in money.transfers()] == [(done["transaction"], total)]


async def test_with_a_key_per_replica_the_survivor_never_fails_a_session_it_cannot_sign(
        devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
        tmp_path: Path) -> None:
    """A session's permit names one signer. With a key per replica, when the replica holding it
    dies, the survivor cannot settle that session; it must leave it open (accrued intact, the permit
    still valid) for the key holder to settle when it returns, never mark it failed. Deployments
    share signer keys across replicas (README, deploy/README.md), so any replica can settle."""
    keys = [[a["private_key"]] for a in devchain["accounts"]["facilitator"][1:3]]
    stack = session_stack(devchain, devchain_file, redis_server, spawn_upstream, spawn_gateway, tmp_path, "kill-keys",
                          replicas=2, sessions={"idle_s": 2}, keys=keys)
    with pytest.raises(AssertionError, match="not reached within"):
        await _killed_replica(devchain, stack, "kill-keys")  # never settled nor failed by the survivor
    _, survivor = stack["gateways"]
    async with aiohttp.ClientSession() as http:
        async with http.get(survivor.url + "/v1/upto/sessions/" + stack["last_session"]) as r:
            state = await r.json()
    assert state["state"] == "open" and int(state["accrued"]) > 0 and state["transaction"] == ""


async def test_a_call_that_would_cross_the_cap_gets_a_402_and_a_new_permit_opens_a_new_session(
        devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
        tmp_path: Path) -> None:
    # Cap $0.0503: each call holds its worst case ($0.05, max_per_call) and costs ~$0.000108
    # (the "*" model: $0.0001 per call plus tokens), so three calls fit and the fourth would not.
    stack = session_stack(devchain, devchain_file, redis_server, spawn_upstream, spawn_gateway, tmp_path, "cap",
                          replicas=1, sessions={"idle_s": 2}, session_cap="0.0503")
    g = stack["gateways"][0].url
    payer = agent("cap", devchain)
    money = Money(devchain, payer.address, stack["payee"])
    client = upto_client(devchain, payer)
    model = "llama-3-8b"
    cap = usd_to_opg(Decimal("0.0503"))

    first, offer = await open_session(g, client, chat(model, "cap 0"))
    assert int(offer.amount) == cap
    sid = first.headers[SESSION]
    charges = [charge_of(first, model)]
    while True:
        accrued = sum(charges)
        r = await call(g + CHAT, chat(model, f"cap {len(charges)}"), headers={SESSION: sid})
        if r.status != 200:
            break
        assert accrued + SIGNED_MAX_OPG <= cap  # it had room for the worst case
        charges.append(charge_of(r, model))
    assert len(charges) == 3
    assert accrued + SIGNED_MAX_OPG > cap  # refused exactly when the worst case would cross the cap
    assert r.status == 402 and json.loads(r.body)["error"] in ("session_exhausted", "session_closed"), r
    fresh = upto_accept(r)  # PAYMENT-REQUIRED: sign a new permit

    signature = await sign_upto(client, fresh, g + CHAT)
    second = await call(g + CHAT, chat(model, "cap, new session"), headers={"PAYMENT-SIGNATURE": signature})
    assert second.status == 200, second
    sid2 = second.headers[SESSION]
    assert sid2 != sid
    charge2 = charge_of(second, model)

    one = await wait_session(g, sid, timeout_s=20)
    two = await wait_session(g, sid2, timeout_s=20)
    assert (one["state"], int(one["accrued"]), one["calls"]) == ("settled", sum(charges), 3), one
    assert (two["state"], int(two["accrued"]), two["calls"]) == ("settled", charge2, 1), two
    assert money.moved() == (sum(charges) + charge2,) * 2
    assert sorted((t["tx"], t["amount"]) for t in money.transfers()) == sorted(
        [(one["transaction"], sum(charges)), (two["transaction"], charge2)])


@pytest.fixture
def small_cap(devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
              tmp_path: Path) -> dict:
    """Sessions capped at $0.001, below max_per_call ($0.05)."""
    return session_stack(devchain, devchain_file, redis_server, spawn_upstream, spawn_gateway, tmp_path, "small-cap",
                         replicas=1, sessions={"idle_s": 2}, session_cap="0.001")


async def test_a_cap_below_max_per_call_serves_one_call_per_session(devchain: dict, small_cap: dict) -> None:
    """What the code does: the per-call worst case is clipped to the cap, so a session serves one
    call, is due at once, and the next call gets a 402 asking for a new permit."""
    g = small_cap["gateways"][0].url
    payer = agent("small-cap", devchain)
    money = Money(devchain, payer.address, small_cap["payee"])
    first, offer = await open_session(g, upto_client(devchain, payer), chat("gpt-4o-mini", "tiny"))
    assert int(offer.amount) == usd_to_opg(Decimal("0.001"))
    sid = first.headers[SESSION]
    charge = charge_of(first, "gpt-4o-mini")
    again = await call(g + CHAT, chat("gpt-4o-mini", "tiny again"), headers={SESSION: sid})
    assert again.status == 402 and json.loads(again.body)["error"] in ("session_exhausted", "session_closed"), again
    assert upto_accept(again).scheme == "upto"
    done = await wait_session(g, sid, timeout_s=10)
    assert (done["state"], int(done["accrued"]), done["calls"]) == ("settled", charge, 1), done
    assert money.moved() == (charge, charge)


async def test_a_session_call_is_never_charged_less_than_its_usage_costs(devchain: dict, small_cap: dict) -> None:
    g = small_cap["gateways"][0].url
    payer = agent("small-cap-bug", devchain)
    money = Money(devchain, payer.address, small_cap["payee"])
    body = chat("gpt-4o", " ".join(["token"] * 600))  # the prompt alone: 600 x $0.0000025 = $0.0015
    offer = upto_accept(await call(g + CHAT, body))
    signature = await sign_upto(upto_client(devchain, payer), offer, g + CHAT)
    r = await call(g + CHAT, body, headers={"PAYMENT-SIGNATURE": signature})
    if r.status != 200:
        return  # refused: nothing was served for less than it cost
    cost = cost_opg("gpt-4o", r.json()["usage"])
    charge = int(r.headers["X-Upto-Session-Charge"])
    done = await wait_session(g, r.headers[SESSION], timeout_s=10)
    assert done["state"] == "settled" and money.moved()[1] == charge
    assert charge == cost, f"served a call costing {cost} for {charge} (cap {offer.amount})"


async def test_readyz_checks_the_session_store(small_cap: dict) -> None:
    r = await call(small_cap["gateways"][0].url + "/readyz", method="GET")
    assert r.status == 200 and r.json()["checks"]["sessions"] == "ok", r


# ==================================================================================================
# A session serves on a promise: its funds are watched, and what is unsettled stays bounded.


def move_opg(devchain: dict, account: Any, amount: int) -> None:
    """The agent sends `amount` of its OPG to a wallet of its own (what an attacker would do)."""
    from devtools.devchain import calldata
    from tests.payments import send_transactions

    sink = derived(f"{SEED}:sink").address
    send_transactions(devchain, [(account, devchain["tokens"]["OPG"]["address"],
                                  calldata("transfer(address,uint256)", ["address", "uint256"], [sink, amount]))])


async def test_a_payer_who_moves_its_tokens_mid_session_is_settled_at_once_and_loses_us_at_most_the_exposure(
        devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
        tmp_path: Path) -> None:
    stack = session_stack(devchain, devchain_file, redis_server, spawn_upstream, spawn_gateway, tmp_path, "drain",
                          replicas=1, sessions={"idle_s": 3600})
    g = stack["gateways"][0].url
    cap = usd_to_opg(Decimal("1"))  # a session never accrues more (max_exposure unset: twice that, per payer)
    careful, thief = agent("drain-careful", devchain), agent("drain-thief", devchain)
    money = Money(devchain, careful.address, stack["payee"])
    sessions, accrued = {}, {}
    for a in (careful, thief):
        first, _ = await open_session(g, upto_client(devchain, a), chat("gpt-4o", f"{a.address} 0"))
        sid = first.headers[SESSION]
        charges = [charge_of(first, "gpt-4o")]
        for i in range(1, 3):
            charges.append(charge_of(await call(g + CHAT, chat("gpt-4o", f"{a.address} {i}"), headers={SESSION: sid}),
                                     "gpt-4o"))
        sessions[a.address], accrued[a.address] = sid, sum(charges)
    # One keeps exactly what it owes, the other keeps nothing: neither covers another call.
    move_opg(devchain, careful, opg_balance(devchain, careful.address) - accrued[careful.address])
    move_opg(devchain, thief, opg_balance(devchain, thief.address))

    for a in (careful, thief):  # drained on the next block: no call served, settled at once (idle_s is an hour)
        done = await wait_session(g, sessions[a.address], timeout_s=20)
        after = await call(g + CHAT, chat("gpt-4o", "one more"), headers={SESSION: sessions[a.address]})
        assert after.status == 402 and json.loads(after.body)["error"] == "session_closed", after
        assert int(done["accrued"]) == accrued[a.address] and done["calls"] == 3
        # the careful one is settled while its funds are there; the thief left nothing to settle
        # from: its loss is what it accrued, within the exposure bound
        assert done["state"] == ("settled" if a is careful else "failed"), done
    assert money.moved()[1] == accrued[careful.address]  # the payee received the careful one's, all of it
    assert opg_balance(devchain, careful.address) == 0
    assert accrued[thief.address] <= cap
    metrics = await call(g + "/metrics", method="GET")
    assert 'x402_gateway_session_drains_total{network="' + devchain["network"] + '",reason="balance"} 2.0' \
        in metrics.body.decode(), [ln for ln in metrics.body.decode().splitlines() if "drains" in ln]


async def test_a_payers_unsettled_exposure_never_passes_the_operators_limit(
        devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
        tmp_path: Path) -> None:
    # max_per_call $0.05 is each call's worst case; the limit $0.051 lets one call run with a little accrued
    stack = session_stack(devchain, devchain_file, redis_server, spawn_upstream, spawn_gateway, tmp_path, "exposure",
                          replicas=2, sessions={"idle_s": 3600, "max_exposure": "0.051"})
    g = [gw.url for gw in stack["gateways"]]
    limit, worst = usd_to_opg(Decimal("0.051")), usd_to_opg(Decimal("0.05"))
    payer = agent("exposure", devchain)
    money = Money(devchain, payer.address, stack["payee"])
    client = upto_client(devchain, payer)
    # a replica that died between its exposure update and its session's left a ghost: forgotten
    # (it names no session) as soon as it is in the way
    opg = devchain["tokens"]["OPG"]["address"].lower()
    ghost_key = f"{stack['prefix']}gw:exposure:{{{payer.address.lower()}|{devchain['network']}|{opg}}}"
    with redis_sync.Redis.from_url(redis_server.url) as r:
        r.hset(ghost_key, "ses_ghost", str(limit))
    first, _ = await open_session(g[0], client, chat("gpt-4o", "exposure 0"))
    sid = first.headers[SESSION]
    charges = [charge_of(first, "gpt-4o")]
    refused = None
    for i in range(1, 40):  # both replicas count one exposure: calls stop once accrued + worst passes the limit
        r = await call(g[i % 2] + CHAT, chat("gpt-4o", f"exposure {i} " + "more " * 20), headers={SESSION: sid})
        if r.status != 200:
            refused = r
            break
        charges.append(charge_of(r, "gpt-4o"))
    assert refused is not None and refused.status == 402, refused
    body = json.loads(refused.body)
    assert body["error"] == "session_exhausted" and "exposure" in body["message"], body
    assert refused.required is not None  # a fresh offer to sign
    assert sum(charges) + worst > limit >= sum(charges[:-1]) + worst  # refused exactly when the next would pass
    done = await wait_session(g[1], sid, timeout_s=20)  # drained and settled at once (idle_s is an hour)
    assert done["state"] == "settled" and int(done["accrued"]) == sum(charges), done
    assert money.moved() == (sum(charges), sum(charges))
    again, _ = await open_session(g[1], client, chat("gpt-4o", "a new permit"))  # the exposure was freed
    assert again.headers[SESSION] != sid
