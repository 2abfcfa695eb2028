"""Settlement intents in process (gateway/intents.py, gateway/paywall/recovery.py): a replica that
dies between the facilitator's "settled" and the budget commit leaves an intent and a pinned hold;
recovery commits the budget and writes the ledger once, and the call stays owed to its agent.
The app runs under Starlette's test client with real SQLite stores (records, intents, budgets),
the stand-in provider over HTTP and the stand-in facilitator of test_paywall_flow (idempotent
settle, outcomes the test picks). Recovery runs on a clock an hour ahead, so every lease lapsed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import SettleResponse, VerifyResponse
from gateway.app import create_app
from gateway.paywall.recovery import Recovery
from gateway.settings import GatewaySettings
from tests.integration.test_paywall_flow import (  # noqa: F401 (upstream_url is a fixture)
    BODY,
    CHAT,
    OPG,
    PAY_TO,
    StandInFacilitator,
    pay,
    send,
    upstream_url,
)

PRICE = 5 * 10**15  # 0.005 OPG


class ReplicaDied(Exception):
    """What the stand-in raises right after settling: the replica is gone before it commits."""


class DyingFacilitator(StandInFacilitator):
    """`store_down`: settle answers as our facilitator does when its store is unreachable (a
    failure marked final: nothing moved in this call), which is trusted like our own."""

    trusted = True

    def __init__(self) -> None:
        super().__init__()
        self.die_after_settle = False
        self.store_down = False
        self.asked: set[str] = set()  # payment keys settlement was asked for (ours records them)

    async def verify(self, payload: Any, requirements: Any) -> VerifyResponse:
        payer, key, _ = self._identity(payload, requirements)
        if key in self.asked:  # as ours: a settlement on record (even unfinished) spends the nonce
            return VerifyResponse(is_valid=False, invalid_reason=R.PERMIT2_INVALID_NONCE.value, payer=payer)
        return await super().verify(payload, requirements)

    async def settle(self, payload: Any, requirements: Any) -> SettleResponse:
        if self.store_down:
            return SettleResponse(success=False, error_reason=R.UNEXPECTED_SETTLE_ERROR.value, transaction="",
                                  network=requirements.network, extra={"final": True})
        _, key, _ = self._identity(payload, requirements)
        if self.settle_mode == "refuse":
            self.asked.discard(key)  # refused: nothing on record, nothing moved
        else:
            self.asked.add(key)
        result = await super().settle(payload, requirements)
        if self.die_after_settle:
            self.die_after_settle = False
            raise ReplicaDied()
        return result


@pytest.fixture
def facilitator() -> DyingFacilitator:
    return DyingFacilitator()


@pytest.fixture
def gateway(upstream_url: str, facilitator: DyingFacilitator, tmp_path: Path) -> Iterator[TestClient]:  # noqa: F811
    settings = GatewaySettings.model_validate({
        "pay_to": PAY_TO,
        "store_url": f"sqlite://{tmp_path / 'records.sqlite3'}",
        "accepts": [{"network": "eip155:8453", "asset": OPG, "symbol": "OPG", "decimals": 18,
                     "transfer_method": "permit2", "eip712_name": "OpenGradient", "eip712_version": "1"}],
        "upstreams": {"llm": {"urls": [upstream_url]}},
        "routes": [{"path": CHAT, "upstream": "llm", "price": "0.005"}],
        "quote": {"rates": {"OPG": "1"}},
        "record_lease_s": 1,
        "budgets": {"store_url": f"sqlite://{tmp_path / 'budgets.sqlite3'}", "hold_s": 1},
    })  # fmt: skip
    with TestClient(create_app(settings, facilitator=facilitator), raise_server_exceptions=True) as client:
        yield client


def recovery(client: TestClient) -> Recovery:
    settlement = client.app.state.gateway.paywall.settlement  # type: ignore[attr-defined]
    return Recovery(settlement, settlement.intents, interval_s=1, clock=lambda: time.time() + 3600)


def books(client: TestClient, payer: str) -> tuple[list[tuple[int, str]], int, int, int]:
    """(ledger (amount, tx), spent today, reserved now and an hour from now (holds of hold_s=1
    have expired by then unless pinned), open intents)."""
    settlement = client.app.state.gateway.paywall.settlement  # type: ignore[attr-defined]
    enforcer = settlement.budgets

    async def read() -> tuple[list[tuple[int, str]], int, int, int]:
        ledger = await enforcer.store.ledger(agent=None, start=0, end=time.time() + 10**6, limit=100)
        policy, group, _ = await enforcer.policies_for(payer, "eip155:8453", OPG)
        (check,) = enforcer.checks(payer, policy, group, "eip155:8453", OPG, time.time(), with_rate=False)
        (usage,) = await enforcer.store.usage(check, now=time.time() + 3600)
        return ([(e.amount, e.tx_hash) for e in ledger], usage.spent, usage.reserved,
                await settlement.intents.count())

    return client.portal.call(read)  # type: ignore[union-attr]


def payer_of(facilitator: StandInFacilitator, payment: dict[str, Any]) -> str:
    from facilitator.x402.identity import payment_identity

    return payment_identity(payment["payload"], "eip155:8453", OPG)[0]


def test_a_replica_dead_after_settling_is_committed_once_by_recovery(gateway: TestClient,
                                                                      facilitator: DyingFacilitator) -> None:
    payment = pay(gateway, facilitator)
    payer = payer_of(facilitator, payment)
    facilitator.die_after_settle = True
    with pytest.raises(ReplicaDied):
        send(gateway, payment)
    ((_, tx),) = list(facilitator.settled.values())
    tx_hash = tx.transaction
    assert books(gateway, payer) == ([], 0, PRICE, 1)  # settled on-chain, nothing counted, the hold pinned

    r = recovery(gateway)
    assert gateway.portal.call(r.sweep) == 1  # type: ignore[union-attr]
    assert books(gateway, payer) == ([(PRICE, tx_hash)], PRICE, 0, 0)
    assert gateway.portal.call(r.sweep) == 0  # type: ignore[union-attr]
    assert books(gateway, payer)[0] == [(PRICE, tx_hash)]  # once

    settles = facilitator.calls["settle"]
    served = send(gateway, payment)  # owed: the resend is served, without a new charge
    assert served.status_code == 200 and b"Echo" in served.content
    assert facilitator.calls["settle"] == settles
    again = send(gateway, payment)  # the owed answer was kept before it was sent: a resend gets it again
    assert again.status_code == 200 and again.content == served.content
    assert facilitator.calls["settle"] == settles
    assert books(gateway, payer) == ([(PRICE, tx_hash)], PRICE, 0, 0)


def test_a_pending_settlement_keeps_its_hold_until_recovery_learns_it_settled(
        gateway: TestClient, facilitator: DyingFacilitator) -> None:
    payment = pay(gateway, facilitator)
    payer = payer_of(facilitator, payment)
    facilitator.settle_mode = "pending"
    r = send(gateway, payment)
    assert r.status_code == 402 and r.json()["error"] == R.SETTLEMENT_PENDING
    assert books(gateway, payer) == ([], 0, PRICE, 1)  # never released while unknown
    rec = recovery(gateway)
    assert gateway.portal.call(rec.sweep) == 0  # type: ignore[union-attr]
    assert books(gateway, payer) == ([], 0, PRICE, 1)  # still unknown: kept, asked again later

    facilitator.settle_mode = "success"
    rec.clock = lambda: time.time() + 7200  # past the retry delay
    assert gateway.portal.call(rec.sweep) == 1  # type: ignore[union-attr]
    ((_, settled),) = facilitator.settled.values()
    assert books(gateway, payer) == ([(PRICE, settled.transaction)], PRICE, 0, 0)
    served = send(gateway, payment)
    assert served.status_code == 200 and b"Echo" in served.content


def test_an_intent_refused_by_the_facilitator_is_released(gateway: TestClient, facilitator: DyingFacilitator) -> None:
    payment = pay(gateway, facilitator)
    payer = payer_of(facilitator, payment)
    facilitator.settle_mode = "pending"
    send(gateway, payment)
    facilitator.settle_mode = "refuse"  # e.g. the authorization expired before it was ever broadcast
    assert gateway.portal.call(recovery(gateway).sweep) == 1  # type: ignore[union-attr]
    assert books(gateway, payer) == ([], 0, 0, 0)
    facilitator.settle_mode = "success"
    assert send(gateway, payment).status_code == 200  # nothing was charged: the payment is free again
    ((_, settled),) = facilitator.settled.values()
    assert books(gateway, payer) == ([(PRICE, settled.transaction)], PRICE, 0, 0)


def test_a_settled_call_leaves_no_intent_and_no_hold(gateway: TestClient, facilitator: DyingFacilitator) -> None:
    payment = pay(gateway, facilitator)
    assert send(gateway, payment).status_code == 200
    ((_, settled),) = facilitator.settled.values()
    assert books(gateway, payer_of(facilitator, payment)) == ([(PRICE, settled.transaction)], PRICE, 0, 0)


def test_a_facilitator_that_cannot_read_its_store_is_asked_again_never_taken_for_a_refusal(
        gateway: TestClient, facilitator: DyingFacilitator) -> None:
    """The payment was settled by a replica that died; then the facilitator's store is away. The
    resend is told to come back (503, not a final refusal) and recovery keeps the intent and the
    pinned hold; once the store is back, both finish."""
    payment = pay(gateway, facilitator)
    payer = payer_of(facilitator, payment)
    facilitator.die_after_settle = True
    with pytest.raises(ReplicaDied):
        send(gateway, payment)
    facilitator.store_down = True
    time.sleep(1.1)  # the dead request's lease on the payment's record lapses (record_lease_s = 1)
    r = send(gateway, payment)
    assert r.status_code == 503 and r.json()["error"] == R.UNEXPECTED_SETTLE_ERROR and "Retry-After" in r.headers
    rec = recovery(gateway)
    assert gateway.portal.call(rec.sweep) == 0  # type: ignore[union-attr]
    assert books(gateway, payer) == ([], 0, PRICE, 1)  # kept, never released

    facilitator.store_down = False
    rec.clock = lambda: time.time() + 7200
    assert gateway.portal.call(rec.sweep) == 1  # type: ignore[union-attr]
    ((_, settled),) = facilitator.settled.values()
    assert books(gateway, payer) == ([(PRICE, settled.transaction)], PRICE, 0, 0)
    served = send(gateway, payment)
    assert served.status_code == 200 and b"Echo" in served.content


def test_an_intent_whose_settlement_was_never_asked_is_released_not_settled(
        gateway: TestClient, facilitator: DyingFacilitator) -> None:
    """The facilitator refuses for a store outage (nothing moved, but it may hold a claim it could
    not clear): the hold stays pinned and the intent goes to recovery. Recovery finds the payment
    unused (verify) and releases it: it never starts a settlement itself."""
    payment = pay(gateway, facilitator)
    payer = payer_of(facilitator, payment)
    facilitator.store_down = True
    r = send(gateway, payment)
    assert r.status_code == 402 and r.json()["error"] == R.UNEXPECTED_SETTLE_ERROR
    facilitator.store_down = False
    assert books(gateway, payer) == ([], 0, PRICE, 1)  # held until the facilitator can say
    settles = facilitator.calls["settle"]
    assert gateway.portal.call(recovery(gateway).sweep) == 1  # type: ignore[union-attr]
    assert facilitator.calls["settle"] == settles and facilitator.settled == {}  # nothing settled by recovery
    assert books(gateway, payer) == ([], 0, 0, 0)
    assert send(gateway, payment).status_code == 200  # the payment is the agent's to use
