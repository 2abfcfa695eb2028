"""One signed payment, served at most once across gateway replicas, races and crashes.

Two gateway processes share the test Redis: their payment records and their in-process
facilitators' settlement store (each facilitator with its own signer key)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp
import pytest

from tests.gateway_client import (
    CHAT,
    CHAT_BODY,
    CHAT_PRICE,
    Balances,
    Processes,
    call,
    facilitator_env,
    facilitator_stats,
    offered,
    post_json,
    set_mode,
    sign_for,
    upstream_stats,
)
from tests.payments import facilitator_body

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def replicas(devchain: dict, devchain_file: str, redis_server: Any, tmp_path_factory: pytest.TempPathFactory):
    """(gateway A, gateway B, upstream) on one Redis."""
    procs = Processes(devchain_file, tmp_path_factory.mktemp("gateway-replicas"))
    try:
        prefix = f"gwreplay:{uuid.uuid4().hex[:8]}:"
        upstream = procs.upstream()
        records = {"GATEWAY_STORE_PREFIX": prefix + "gw:"}  # the same records for both replicas
        a = procs.gateway(upstream.url, redis_server.url, env=facilitator_env(devchain, 0, prefix) | records)
        b = procs.gateway(upstream.url, redis_server.url, env=facilitator_env(devchain, 1, prefix) | records)
        yield a, b, upstream
    finally:
        procs.stop_all()


def chat_calls(upstream: Any) -> int:
    return upstream_stats(upstream)["by_path"].get(CHAT, 0)


@pytest.mark.parametrize("symbol", ["OPG", "USDC"])
async def test_resend_to_another_replica_gets_the_recorded_result(devchain: dict, replicas: tuple, symbol: str) -> None:
    a, b, upstream = replicas
    payment = await sign_for(devchain, a.url + CHAT, CHAT_BODY, symbol=symbol, agent=0)
    balances = Balances(devchain, symbol, 0)
    calls = chat_calls(upstream)

    first = await call(a.url + CHAT, CHAT_BODY, payment=payment)
    assert first.status == 200, first
    second = await call(b.url + CHAT, CHAT_BODY, payment=payment)
    assert second.status == 200, second
    assert second.body == first.body
    assert second.headers["PAYMENT-RESPONSE"] == first.headers["PAYMENT-RESPONSE"]
    assert first.settle is not None and first.settle.success
    assert chat_calls(upstream) == calls + 1
    assert balances.moved() == (CHAT_PRICE[symbol],) * 2


async def test_concurrent_copies_of_one_payment_are_served_once(devchain: dict, replicas: tuple) -> None:
    a, b, upstream = replicas
    payment = await sign_for(devchain, a.url + CHAT, CHAT_BODY, symbol="OPG", agent=1)
    balances = Balances(devchain, "OPG", 1)
    calls = chat_calls(upstream)

    replies = await asyncio.gather(*(call(gw.url + CHAT, CHAT_BODY, payment=payment) for gw in (a, b) * 5))
    statuses = sorted(r.status for r in replies)
    served = [r for r in replies if r.status == 200]
    assert set(statuses) <= {200, 409}, replies
    assert served, replies
    for r in replies:
        if r.status == 409:
            assert r.json()["error"] == "payment_in_progress"
    assert len({r.body for r in served}) == 1  # never two distinct completions
    assert len({r.headers["PAYMENT-RESPONSE"] for r in served}) == 1
    assert chat_calls(upstream) == calls + 1
    assert balances.moved() == (CHAT_PRICE["OPG"],) * 2

    late = await call(b.url + CHAT, CHAT_BODY, payment=payment)  # once it is over: the recorded result
    assert late.status == 200 and late.body == served[0].body


async def test_served_payment_cannot_buy_another_request(devchain: dict, replicas: tuple) -> None:
    a, b, upstream = replicas
    payment = await sign_for(devchain, a.url + CHAT, CHAT_BODY, symbol="USDC", agent=2)
    balances = Balances(devchain, "USDC", 2)
    first = await call(a.url + CHAT, CHAT_BODY, payment=payment)
    assert first.status == 200, first
    tx = first.settle.transaction
    calls = upstream_stats(upstream)["requests"]

    other_body = {**CHAT_BODY, "messages": [{"role": "user", "content": "something else entirely"}]}
    # /v1/completions costs what gpt-4o-mini chat costs, so the payment binds there too
    attempts = [(b, CHAT, other_body), (a, "/v1/completions", {"model": "gpt-4o-mini", "prompt": "free lunch?"})]
    for gw, path, body in attempts:
        r = await call(gw.url + path, body, payment=payment)
        assert r.status == 402, (path, r)
        assert r.json()["error"] == "payment_already_used" and r.json()["transaction"] == tx, r
    assert upstream_stats(upstream)["requests"] == calls
    assert balances.moved() == (CHAT_PRICE["USDC"],) * 2


# -- a gateway killed while the facilitator is settling -----------------------------------------------

RECORD_LEASE_S = 4.0  # a dead gateway's claim on a payment expires after this (GATEWAY_RECORD_LEASE_S)


async def test_gateway_crash_during_settlement_never_settles_twice(
    devchain: dict, devchain_file: str, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("gateway-crash")
    procs = Processes(devchain_file, tmp)
    try:
        prefix = f"gwcrash:{uuid.uuid4().hex[:8]}:"
        upstream = procs.upstream()
        real = procs.facilitator(redis_server.url, facilitator_env(devchain, 2, prefix))
        hostile = procs.hostile(real.url)
        env = {"GATEWAY_RECORD_LEASE_S": str(RECORD_LEASE_S), "GATEWAY_STORE_PREFIX": prefix + "gw:"}
        first_gw = procs.gateway(upstream.url, redis_server.url, facilitator_url=hostile.url, env=env)

        requirement = await offered(first_gw.url + CHAT, CHAT_BODY, "OPG", devchain)
        payment = await sign_for(devchain, first_gw.url + CHAT, CHAT_BODY, symbol="OPG", agent=3)
        balances = Balances(devchain, "OPG", 3)
        set_mode(hostile, settle="proxy-then-sleep", sleep_s=5)

        started = time.monotonic()
        in_flight = asyncio.create_task(call(first_gw.url + CHAT, CHAT_BODY, payment=payment))
        deadline = started + 5
        while balances.moved() != (CHAT_PRICE["OPG"],) * 2:  # the real settlement happened ...
            assert time.monotonic() < deadline, "the settlement never reached the chain"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert not in_flight.done()  # ... and the gateway is still waiting for the answer
        first_gw.kill()
        with pytest.raises((aiohttp.ClientError, asyncio.TimeoutError)):
            await in_flight

        second_gw = procs.gateway(upstream.url, redis_server.url, facilitator_url=hostile.url, env=env)
        set_mode(hostile, settle="proxy")
        settles = facilitator_stats(hostile)["settle"]

        if time.monotonic() - started < RECORD_LEASE_S - 0.5:  # the dead gateway's lease still holds
            r = await call(second_gw.url + CHAT, CHAT_BODY, payment=payment)
            assert r.status == 409 and r.json()["error"] == "payment_in_progress", r
        await asyncio.sleep(max(0.0, started + RECORD_LEASE_S + 0.3 - time.monotonic()))

        # The facilitator itself returns the first result for this payment, without a new transfer.
        first_result = post_json(real.url + "/settle", facilitator_body(payment, requirement))
        assert first_result["success"] is True, first_result
        tx = first_result["transaction"]

        r = await call(second_gw.url + CHAT, CHAT_BODY, payment=payment)
        assert balances.moved() == (CHAT_PRICE["OPG"],) * 2  # settled exactly once
        if r.status == 200:  # the recorded result
            assert r.settle is not None and r.settle.transaction == tx
            assert r.json()["choices"][0]["message"]["content"] == "Echo: hello paid world"
        else:  # or a refusal that tells the agent where its money went
            assert r.status in (402, 409), r
            assert r.json().get("transaction") == tx, r
        assert facilitator_stats(hostile)["settle"] - settles <= 1
    finally:
        procs.stop_all()
