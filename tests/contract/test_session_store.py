"""The upto session store on the embedded SQLite store and Redis (single, Sentinel, Cluster)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.sessions import HoldOutcome, Session, SessionState, SessionStore, open_sessions
from tests.conftest import TestClock

OPG = 10**18


@pytest.fixture
def store(open_backend) -> SessionStore:
    return open_backend(open_sessions)


@pytest.fixture
def t0(clock: TestClock) -> float:
    """The test's start: now on the (possibly shifted) test clock."""
    return clock()


async def opened(store: SessionStore, t0: float, *, cap: int = 100 * OPG, per_call: int = 30 * OPG) -> Session:
    s = Session(id=f"ses_{uuid.uuid4().hex}", payer="0xabc", network="eip155:84532", asset="0xtoken", cap=cap,
                accrued=0, held=0, calls=0, deadline=t0 + 3600, last_used=t0, state=SessionState.OPEN,
                payment='{"payload":{}}', route="POST /v1/chat/completions", per_call=per_call)
    await store.open(s, first_hold=0, due_at=t0 + 100)
    return s


async def test_holds_never_pass_the_cap_and_accrue_exactly(store: SessionStore, t0: float) -> None:
    s = await opened(store, t0)
    assert await store.hold(s.id, 30 * OPG, now=t0, serve_until=t0 + 3000, due_at=t0 + 100) == HoldOutcome.OK
    await store.finish_call(s.id, 30 * OPG, 7 * OPG + 1, now=t0 + 1, due_at=t0 + 101)  # 18-decimal, odd amount
    got = await store.get(s.id)
    assert got is not None and (got.accrued, got.held, got.calls) == (7 * OPG + 1, 0, 1)
    results = await asyncio.gather(*(store.hold(s.id, 30 * OPG, now=t0 + 2, serve_until=t0 + 3000, due_at=t0 + 102)
                                     for _ in range(10)))
    assert results.count(HoldOutcome.OK) == 3 and results.count(HoldOutcome.EXHAUSTED) == 7  # 93 - 7 left


async def test_refusals_missing_expired_closed(store: SessionStore, t0: float) -> None:
    s = await opened(store, t0)
    assert await store.hold("ses_nope", 1, now=t0, serve_until=t0 + 10, due_at=t0) == HoldOutcome.MISSING
    assert await store.hold(s.id, 1, now=t0 + 11, serve_until=t0 + 10, due_at=t0) == HoldOutcome.EXPIRED
    claimed = await store.claim_settlement(s.id, now=t0, force=False, lease_s=60)
    assert claimed is not None and claimed.state == SessionState.SETTLING
    assert await store.hold(s.id, 1, now=t0, serve_until=t0 + 10, due_at=t0) == HoldOutcome.CLOSED


async def test_settlement_is_claimed_once_and_waits_for_calls_in_flight(store: SessionStore, t0: float) -> None:
    s = await opened(store, t0)
    assert await store.hold(s.id, 30 * OPG, now=t0, serve_until=t0 + 3000, due_at=t0 + 100) == HoldOutcome.OK
    assert await store.claim_settlement(s.id, now=t0, force=False, lease_s=60) is None  # a call is in flight
    claims = await asyncio.gather(*(store.claim_settlement(s.id, now=t0, force=True, lease_s=60) for _ in range(5)))
    assert sum(c is not None for c in claims) == 1  # forced (deadline near): exactly one settler
    assert await store.claim_settlement(s.id, now=t0 + 61, force=True, lease_s=60) is not None  # lease expired
    await store.finish_settlement(s.id, state=SessionState.SETTLED, tx="0x" + "ab" * 32, result="{}", retry_at=None)
    got = await store.get(s.id)
    assert got is not None and got.state == SessionState.SETTLED and got.tx == "0x" + "ab" * 32
    assert s.id not in await store.due(now=t0 + 10**6)
    assert await store.claim_settlement(s.id, now=t0 + 10**6, force=True, lease_s=60) is None


async def test_due_index_follows_reschedules(store: SessionStore, t0: float) -> None:
    s = await opened(store, t0)
    assert s.id not in await store.due(now=t0 + 50)
    assert s.id in await store.due(now=t0 + 100)
    await store.reschedule(s.id, t0 + 500)
    assert s.id not in await store.due(now=t0 + 400)
    assert s.id in await store.due(now=t0 + 500)


async def test_a_payers_exposure_across_sessions_never_passes_the_limit(store: SessionStore, t0: float) -> None:
    key = f"0x{uuid.uuid4().hex}|eip155:84532|0xtoken"  # one payer and asset, fresh per test
    a, b = f"ses_{uuid.uuid4().hex}", f"ses_{uuid.uuid4().hex}"
    assert await store.expose(key, a, 60 * OPG, limit=100 * OPG)
    results = await asyncio.gather(*(store.expose(key, b, 30 * OPG, limit=100 * OPG) for _ in range(5)))
    assert results.count(True) == 1  # 90 exposed; a second 30 would pass 100
    assert await store.exposure(key) == {a: 60 * OPG, b: 30 * OPG}
    assert await store.expose(key, a, -(60 * OPG) + 7, limit=None)  # the call's hold became its charge
    assert await store.expose(key, b, 70 * OPG - 7, limit=100 * OPG)  # exactly at the limit
    assert not await store.expose(key, b, 1, limit=100 * OPG)
    await store.unexpose(key, a)  # settled
    assert await store.exposure(key) == {b: 100 * OPG - 7}
    assert await store.expose(key, b, -(10**30), limit=None)  # never below zero
    assert await store.exposure(key) == {}


async def test_a_drained_session_serves_nothing_and_is_due_at_once(store: SessionStore, t0: float) -> None:
    s = await opened(store, t0)
    assert s.id in await store.open_ids(now=t0)
    assert await store.hold(s.id, 30 * OPG, now=t0, serve_until=t0 + 3000, due_at=t0 + 100) == HoldOutcome.OK
    assert await store.drain(s.id, now=t0 + 1)
    assert not await store.drain(s.id, now=t0 + 1)  # once
    assert await store.hold(s.id, 1, now=t0 + 1, serve_until=t0 + 3000, due_at=t0 + 100) == HoldOutcome.CLOSED
    assert s.id in await store.due(now=t0 + 1)
    assert await store.claim_settlement(s.id, now=t0 + 2, force=False, lease_s=60) is None  # its call is in flight
    await store.finish_call(s.id, 30 * OPG, 5, now=t0 + 3, due_at=t0 + 100)
    claimed = await store.claim_settlement(s.id, now=t0 + 3, force=False, lease_s=60)
    assert claimed is not None and claimed.accrued == 5
    await store.finish_settlement(s.id, state=SessionState.SETTLED, tx="0x" + "cd" * 32, result="{}", retry_at=None)
    assert s.id not in await store.open_ids(now=t0 + 4)
