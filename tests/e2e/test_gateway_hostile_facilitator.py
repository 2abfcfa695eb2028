"""A remote facilitator that lies, breaks or stalls at settlement: the gateway must never hand out
the provider's content unless a settlement really succeeded.

gateway --(HTTP)--> hostile facilitator --(proxy)--> real `x402-facilitator serve`; everything on
the test Redis (the gateway's payment records too).

The gateway's settle timeout is lowered (GATEWAY_SETTLE_TIMEOUT_S) to make the `timeout` case fast."""

from __future__ import annotations

import uuid
from typing import Any

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
    set_mode,
    sign_for,
    upstream_stats,
)

pytestmark = pytest.mark.e2e

FAKE_TX = "0x" + "ab" * 32  # what tests.hostile_facilitator names in its lies
SETTLE_TIMEOUT_S = 1.5

# mode -> (error the 402 names, whether the facilitator named a transaction hash)
MODES: dict[str, tuple[str, bool]] = {
    "timeout": ("unexpected_settle_error", False),
    "html502": ("unexpected_settle_error", False),
    "503-success": ("unexpected_settle_error", True),
    "nonjson": ("unexpected_settle_error", False),
    "truncated": ("unexpected_settle_error", False),
    "pending": ("settlement_pending", True),
    "invalid-state": ("invalid_transaction_state", False),
    "success-no-tx": ("invalid_transaction_state", False),
    "wrong-network": ("invalid_transaction_state", True),
}


@pytest.fixture(scope="module")
def stack(devchain: dict, devchain_file: str, redis_server: Any, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("gateway-hostile")
    procs = Processes(devchain_file, tmp)
    try:
        prefix = f"gwhostile:{uuid.uuid4().hex[:8]}:"
        upstream = procs.upstream()
        real = procs.facilitator(redis_server.url, facilitator_env(devchain, 2, prefix))
        hostile = procs.hostile(real.url)
        # Recovery would keep asking the facilitator about the unresolved settlements these tests
        # leave (as it must): slowed down here, so each test counts only its own requests.
        env = {"GATEWAY_SETTLE_TIMEOUT_S": str(SETTLE_TIMEOUT_S), "GATEWAY_STORE_PREFIX": prefix + "gw:",
               "GATEWAY_RECOVERY_INTERVAL_S": "300"}
        gateway = procs.gateway(upstream.url, redis_server.url, facilitator_url=hostile.url, env=env)
        yield gateway, hostile, upstream
    finally:
        procs.stop_all()


@pytest.fixture
def hostile_stack(stack: tuple[Any, Any, Any]):
    yield stack
    set_mode(stack[1], settle="proxy", verify="proxy")


def assert_not_served(r: Any, error: str, names_tx: bool) -> None:
    assert r.status == 402, r
    doc = r.json()
    assert "choices" not in doc and b"Echo:" not in r.body, doc
    assert doc["error"] == error, doc
    if names_tx:
        assert doc.get("transaction") == FAKE_TX, doc
    else:
        assert not doc.get("transaction"), doc
    if r.settle is not None:  # what the facilitator answered, if the gateway passes it on: never success
        assert r.settle.success is False


@pytest.mark.parametrize("mode", list(MODES))
async def test_no_content_without_a_real_settlement(devchain: dict, hostile_stack: tuple[Any, Any, Any],
                                                    mode: str) -> None:
    gateway, hostile, upstream = hostile_stack
    symbol = "USDC" if list(MODES).index(mode) % 2 else "OPG"
    payment = await sign_for(devchain, gateway.url + CHAT, CHAT_BODY, symbol=symbol, agent=2)
    set_mode(hostile, settle=mode, verify="proxy")
    balances = Balances(devchain, symbol, 2)
    settles = facilitator_stats(hostile)["settle"]
    calls = upstream_stats(upstream)["by_path"].get(CHAT, 0)
    error, names_tx = MODES[mode]

    r = await call(gateway.url + CHAT, CHAT_BODY, payment=payment)
    assert_not_served(r, error, names_tx)
    assert facilitator_stats(hostile)["settle"] == settles + 1
    assert upstream_stats(upstream)["by_path"][CHAT] == calls + 1  # asked, but its answer was held back
    assert balances.moved() == (0, 0)  # the hostile facilitator never forwarded this settlement

    if mode == "pending":  # a resend asks again and is still not served while it says pending
        for _ in range(2):
            r = await call(gateway.url + CHAT, CHAT_BODY, payment=payment)
            assert_not_served(r, error, names_tx)
        assert facilitator_stats(hostile)["settle"] == settles + 3
        assert upstream_stats(upstream)["by_path"][CHAT] == calls + 1
        assert balances.moved() == (0, 0)


async def test_pending_payment_is_served_once_it_really_settles(devchain: dict,
                                                                hostile_stack: tuple[Any, Any, Any]) -> None:
    """After `settlement_pending`, a resend is served (the kept response, no second upstream call)
    once the facilitator really settles — and charged exactly once."""
    gateway, hostile, upstream = hostile_stack
    payment = await sign_for(devchain, gateway.url + CHAT, CHAT_BODY, symbol="USDC", agent=3)
    balances = Balances(devchain, "USDC", 3)
    calls = upstream_stats(upstream)["by_path"].get(CHAT, 0)

    set_mode(hostile, settle="pending")
    r = await call(gateway.url + CHAT, CHAT_BODY, payment=payment)
    assert_not_served(r, "settlement_pending", True)

    set_mode(hostile, settle="proxy")
    r = await call(gateway.url + CHAT, CHAT_BODY, payment=payment)
    assert r.status == 200, r
    assert r.json()["choices"][0]["message"]["content"] == "Echo: hello paid world"
    assert r.settle is not None and r.settle.success and r.settle.transaction != FAKE_TX
    assert balances.moved() == (CHAT_PRICE["USDC"],) * 2
    assert upstream_stats(upstream)["by_path"][CHAT] == calls + 1

    again = await call(gateway.url + CHAT, CHAT_BODY, payment=payment)  # and again: the same result
    assert again.status == 200 and again.body == r.body
    assert balances.moved() == (CHAT_PRICE["USDC"],) * 2


async def test_pending_stream_is_not_charged_without_being_served(devchain: dict,
                                                                  hostile_stack: tuple[Any, Any, Any]) -> None:
    """A stream is not kept by the gateway: when its settlement was pending and a resend finds it
    settled, the agent has paid and must still get the stream (or at least not be told it was
    delivered)."""
    gateway, hostile, upstream = hostile_stack
    body = {**CHAT_BODY, "stream": True}
    payment = await sign_for(devchain, gateway.url + CHAT, body, symbol="OPG", agent=3)
    balances = Balances(devchain, "OPG", 3)

    set_mode(hostile, settle="pending")
    r = await call(gateway.url + CHAT, body, payment=payment)
    assert_not_served(r, "settlement_pending", True)
    assert b"data:" not in r.body

    set_mode(hostile, settle="proxy")
    r = await call(gateway.url + CHAT, body, payment=payment)
    charged = balances.moved() == (CHAT_PRICE["OPG"],) * 2
    assert charged  # the resend settled it for real
    assert r.status == 200 and b"data: [DONE]" in r.body, f"charged {CHAT_PRICE['OPG']} but not served: {r}"
