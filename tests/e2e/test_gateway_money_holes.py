"""The money holes found by attackers and crashes (issue 9), each driven over HTTP against running
processes: a forged copy of a settled payment, a replica killed after settling, a stream cut after
settling, a resend of a pending payment."""

from __future__ import annotations

import asyncio
import copy
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
    encode_payment,
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

ECHO = "Echo: hello paid world"




@pytest.fixture(scope="module")
def pair(procs: Processes, upstream: Any, redis_server: Any, devchain: dict) -> tuple[Any, Any]:
    """Two gateways on one facilitator store (in-process facilitators, one signer key each) whose
    payment records are separate: B has lost every record A wrote."""
    prefix = f"holes:{uuid.uuid4().hex[:8]}:"
    a = procs.gateway(upstream.url, redis_server.url, env=facilitator_env(devchain, 0, prefix)
                      | {"GATEWAY_STORE_PREFIX": prefix + "gw-a:"})
    b = procs.gateway(upstream.url, redis_server.url, env=facilitator_env(devchain, 1, prefix)
                      | {"GATEWAY_STORE_PREFIX": prefix + "gw-b:"})
    return a, b


def chat_calls(upstream: Any) -> int:
    return upstream_stats(upstream)["by_path"].get(CHAT, 0)


def forged(payment: dict, how: str) -> dict:
    copy_ = copy.deepcopy(payment)
    sig = copy_["payload"]["signature"]
    if how == "repeated-byte":
        copy_["payload"]["signature"] = "0x" + "11" * 65
    else:  # one byte of r flipped
        copy_["payload"]["signature"] = sig[:10] + ("00" if sig[10:12] != "00" else "01") + sig[12:]
    return copy_


# -- 2. a forged header never gets someone else's paid content ------------------------------------


@pytest.mark.parametrize("symbol", ["OPG", "USDC"])
@pytest.mark.parametrize("how", ["repeated-byte", "flipped-byte"])
async def test_forged_copy_of_a_settled_payment_gets_nothing(devchain: dict, pair: tuple, upstream: Any,
                                                             symbol: str, how: str) -> None:
    a, b = pair
    payment = await sign_for(devchain, a.url + CHAT, CHAT_BODY, symbol=symbol, agent=0)
    balances = Balances(devchain, symbol, 0)
    first = await call(a.url + CHAT, CHAT_BODY, payment=payment)
    assert first.status == 200 and first.settle is not None and first.settle.success, first
    calls = chat_calls(upstream)

    fake = forged(payment, how)
    for gw in (a, b):  # A holds the record; B lost it (the facilitator's store still knows the payment)
        r = await call(gw.url + CHAT, CHAT_BODY, payment=fake)
        assert r.status in (400, 402), r
        assert ECHO.encode() not in r.body and "PAYMENT-RESPONSE" not in r.headers, r
        if gw is a:
            assert r.json()["error"] == "payment_already_used" and r.json()["transaction"] == first.settle.transaction
    assert chat_calls(upstream) == calls  # nothing reached the provider
    assert balances.moved() == (CHAT_PRICE[symbol],) * 2

    again = await call(a.url + CHAT, CHAT_BODY, payment=payment)  # the genuine payment still gets its result
    assert again.status == 200 and again.body == first.body


# -- 4. a crash after settlement: the agent gets what it paid for ----------------------------------


async def test_replica_killed_after_settling_is_taken_over_and_the_call_delivered(
    devchain: dict, devchain_file: str, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A settles (the transfer is on-chain) and is killed before answering. The resend to B is told
    to wait only as long as A's lease can last, then B serves the call once, without a new charge."""
    procs = Processes(devchain_file, tmp_path_factory.mktemp("killed-after-settling"))
    try:
        prefix = f"holes-kill:{uuid.uuid4().hex[:8]}:"
        upstream = procs.upstream()
        real = procs.facilitator(redis_server.url, facilitator_env(devchain, 2, prefix))
        hostile = procs.hostile(real.url)
        env = {"GATEWAY_STORE_PREFIX": prefix + "gw:"}  # the default lease: 6 s, renewed every 2 s
        a = procs.gateway(upstream.url, redis_server.url, facilitator_url=hostile.url, env=env)
        b = procs.gateway(upstream.url, redis_server.url, facilitator_url=hostile.url, env=env)
        requirement = await offered(a.url + CHAT, CHAT_BODY, "OPG", devchain)
        payment = await sign_for(devchain, a.url + CHAT, CHAT_BODY, symbol="OPG", agent=3)
        balances = Balances(devchain, "OPG", 3)
        set_mode(hostile, settle="proxy-then-sleep", sleep_s=30)

        in_flight = asyncio.create_task(call(a.url + CHAT, CHAT_BODY, payment=payment, timeout_s=60))
        deadline = time.monotonic() + 10
        while balances.moved() != (CHAT_PRICE["OPG"],) * 2:  # the settlement is on-chain ...
            assert time.monotonic() < deadline, "the settlement never reached the chain"
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # ... longer than A's first lease: A renews it while it waits
        busy = await call(b.url + CHAT, CHAT_BODY, payment=payment)
        assert busy.status == 409 and busy.json()["error"] == "payment_in_progress", busy
        assert 1 <= int(busy.headers["Retry-After"]) <= 6, busy.headers
        assert not in_flight.done()
        a.kill()
        with pytest.raises((aiohttp.ClientError, asyncio.TimeoutError)):
            await in_flight
        killed_at = time.monotonic()
        set_mode(hostile, settle="proxy")
        settles = facilitator_stats(hostile)["settle"]

        served = None
        while time.monotonic() - killed_at < 15:  # the agent resends as Retry-After says
            r = await call(b.url + CHAT, CHAT_BODY, payment=payment)
            if r.status != 409:
                served = r
                break
            await asyncio.sleep(int(r.headers["Retry-After"]))
        assert served is not None, "A's lease never lapsed"
        assert time.monotonic() - killed_at < 8  # taken over within the lease, not minutes
        assert served.status == 200, served
        assert served.json()["choices"][0]["message"]["content"] == ECHO
        tx = post_json(real.url + "/settle", facilitator_body(payment, requirement))["transaction"]
        assert served.settle is not None and served.settle.transaction == tx
        assert balances.moved() == (CHAT_PRICE["OPG"],) * 2  # charged exactly once
        assert facilitator_stats(hostile)["settle"] - settles <= 1

        # The owed answer was kept before it was sent: a resend (its agent cut off again) gets it again.
        done = await call(b.url + CHAT, CHAT_BODY, payment=payment)
        assert done.status == 200 and done.body == served.body, done
        assert done.settle is not None and done.settle.transaction == tx
        assert balances.moved() == (CHAT_PRICE["OPG"],) * 2
    finally:
        procs.stop_all()


async def test_stream_cut_after_settling_is_owed_once(devchain: dict, pair: tuple, upstream: Any) -> None:
    a, b = pair
    body = {**CHAT_BODY, "stream": True}
    payment = await sign_for(devchain, a.url + CHAT, body, symbol="USDC", agent=1)
    balances = Balances(devchain, "USDC", 1)
    calls = chat_calls(upstream)

    async with aiohttp.ClientSession() as http:  # the agent reads the first bytes, then its connection drops
        async with http.post(a.url + CHAT, json=body, headers={
            "PAYMENT-SIGNATURE": encode_payment(payment), "X-Devupstream-Fault": "drip:400"
        }) as r:
            assert r.status == 200 and "PAYMENT-RESPONSE" in r.headers
            await r.content.readany()
    assert balances.moved() == (CHAT_PRICE["USDC"],) * 2
    await asyncio.sleep(0.5)

    owed = await call(a.url + CHAT, body, payment=payment)
    assert owed.status == 200, owed
    text = owed.body.decode()
    assert text.rstrip().endswith("data: [DONE]") and "Echo" in text
    assert owed.settle is not None and owed.settle.success
    assert chat_calls(upstream) == calls + 2  # forwarded once more ...
    assert balances.moved() == (CHAT_PRICE["USDC"],) * 2  # ... and never charged again
    again = await call(a.url + CHAT, body, payment=payment)
    assert again.status == 402 and again.json()["error"] == "payment_already_used"


async def test_resend_of_a_pending_payment_waits_at_most_the_settle_timeout(
    devchain: dict, devchain_file: str, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    procs = Processes(devchain_file, tmp_path_factory.mktemp("pending-resend"))
    try:
        prefix = f"holes-pending:{uuid.uuid4().hex[:8]}:"
        upstream = procs.upstream()
        real = procs.facilitator(redis_server.url, facilitator_env(devchain, 2, prefix))
        hostile = procs.hostile(real.url)
        env = {"GATEWAY_STORE_PREFIX": prefix + "gw:", "GATEWAY_SETTLE_TIMEOUT_S": "2"}
        gw = procs.gateway(upstream.url, redis_server.url, facilitator_url=hostile.url, env=env)
        payment = await sign_for(devchain, gw.url + CHAT, CHAT_BODY, symbol="OPG", agent=2)
        balances = Balances(devchain, "OPG", 2)
        set_mode(hostile, settle="timeout")

        first = await call(gw.url + CHAT, CHAT_BODY, payment=payment, timeout_s=20)
        assert first.status == 402 and ECHO.encode() not in first.body, first
        resend = await call(gw.url + CHAT, CHAT_BODY, payment=payment, timeout_s=8)  # not a hang
        assert resend.status == 402 and resend.json()["error"] in ("settlement_pending", "unexpected_settle_error"), resend
        assert ECHO.encode() not in resend.body

        set_mode(hostile, settle="proxy")  # the facilitator answers again: settled, served once
        served = await call(gw.url + CHAT, CHAT_BODY, payment=payment, timeout_s=30)
        assert served.status == 200 and served.json()["choices"][0]["message"]["content"] == ECHO, served
        assert balances.moved() == (CHAT_PRICE["OPG"],) * 2
    finally:
        procs.stop_all()
