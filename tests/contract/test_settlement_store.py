"""One contract for every SettlementStore: the embedded SQLite store and Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from facilitator.store import SettlementState, SettlementStore, open_store
from facilitator.store.redis_store import RedisSettlementStore
from facilitator.store.sqlite_store import SQLiteSettlementStore
from tests.conftest import TestClock

LEASE = 60_000


@pytest.fixture
def store(open_backend) -> SettlementStore:
    return open_backend(open_store)


@pytest.fixture
def t0(clock: TestClock) -> int:
    """The test's start in ms: now on the (possibly shifted) test clock."""
    return clock.ms()


async def test_claim_is_exclusive_and_reports_the_holder(store: SettlementStore, t0: int) -> None:
    won = await store.claim("k1", "d1", now_ms=t0 + 1_000, lease_ms=LEASE)
    assert won.won and won.record is None
    again = await store.claim("k1", "d1", now_ms=t0 + 1_001, lease_ms=LEASE)
    assert not again.won and again.record is not None
    assert again.record.state == SettlementState.CLAIMED and again.record.digest == "d1"
    other = await store.claim("k1", "d2", now_ms=t0 + 1_002, lease_ms=LEASE)
    assert not other.won and other.record is not None and other.record.digest == "d1"


async def test_lifecycle_submitted_then_settled(store: SettlementStore, t0: int) -> None:
    assert (await store.claim("k2", "d", now_ms=t0 + 1, lease_ms=LEASE)).won
    await store.mark_submitted("k2", "d", tx_hash="0xabc", raw_tx="0xraw", signer="0xS", response='{"success":true}',
                               now_ms=t0 + 2)
    rec = await store.get("k2")
    assert rec is not None and rec.state == SettlementState.SUBMITTED
    assert (rec.tx_hash, rec.raw_tx, rec.signer, rec.response) == ("0xabc", "0xraw", "0xS", '{"success":true}')
    # a submitted record is never taken over, even long after its lease
    late = await store.claim("k2", "d", now_ms=t0 + 10 * LEASE, lease_ms=LEASE)
    assert not late.won and late.record is not None and late.record.state == SettlementState.SUBMITTED
    await store.finish("k2", "d", state=SettlementState.SETTLED, response='{"success":true,"transaction":"0xabc"}', now_ms=t0 + 3)
    rec = await store.get("k2")
    assert rec is not None and rec.state == SettlementState.SETTLED and rec.tx_hash == "0xabc"
    assert not (await store.claim("k2", "d", now_ms=t0 + 10 * LEASE, lease_ms=LEASE)).won


async def test_expired_claim_without_broadcast_is_taken_over(store: SettlementStore, t0: int) -> None:
    assert (await store.claim("k3", "d", now_ms=t0, lease_ms=100)).won
    assert not (await store.claim("k3", "d", now_ms=t0 + 50, lease_ms=100)).won
    assert (await store.claim("k3", "d", now_ms=t0 + 101, lease_ms=100)).won


async def test_release_lets_the_payment_be_tried_again(store: SettlementStore, t0: int) -> None:
    assert (await store.claim("k4", "d", now_ms=t0, lease_ms=LEASE)).won
    await store.release("k4", "other-digest")  # not ours: no effect
    assert await store.get("k4") is not None
    await store.release("k4", "d")
    assert await store.get("k4") is None
    assert (await store.claim("k4", "d", now_ms=t0 + 1, lease_ms=LEASE)).won


async def test_mark_submitted_refuses_a_foreign_digest(store: SettlementStore, t0: int) -> None:
    from facilitator.store import StoreUnavailableError

    assert (await store.claim("k5", "d", now_ms=t0, lease_ms=LEASE)).won
    with pytest.raises(StoreUnavailableError):
        await store.mark_submitted("k5", "x", tx_hash="0x1", raw_tx="0x2", signer="s", response="{}", now_ms=t0 + 1)


async def test_unfinished_lists_submitted_and_expired_claims(store: SettlementStore, t0: int) -> None:
    assert (await store.claim("u1", "d", now_ms=t0, lease_ms=10)).won
    assert (await store.claim("u2", "d", now_ms=t0, lease_ms=LEASE)).won
    await store.mark_submitted("u2", "d", tx_hash="0x1", raw_tx="0x2", signer="s", response="{}", now_ms=t0 + 5)
    assert (await store.claim("u3", "d", now_ms=t0, lease_ms=LEASE)).won
    await store.mark_submitted("u3", "d", tx_hash="0x3", raw_tx="0x4", signer="s", response="{}", now_ms=t0 + 5)
    await store.finish("u3", "d", state=SettlementState.SETTLED, response="{}", now_ms=t0 + 6)
    found = {r.key for r in await store.unfinished(older_than_ms=t0 + 1_000)}
    assert "u2" in found and "u3" not in found
    # the expired claim u1 is listed by SQLite directly; Redis lists only indexed (submitted) keys
    assert found <= {"u1", "u2"}


async def test_two_hundred_concurrent_claims_have_one_winner(store: SettlementStore, t0: int) -> None:
    results = await asyncio.gather(*(store.claim("hot", f"d{i % 3}", now_ms=t0 + 1, lease_ms=LEASE) for i in range(200)))
    assert sum(r.won for r in results) == 1


def test_open_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(f"sqlite://{tmp_path}/x.sqlite3"), SQLiteSettlementStore)
    assert isinstance(open_store("memory://"), SQLiteSettlementStore)
    assert isinstance(open_store("redis://127.0.0.1:1/0"), RedisSettlementStore)
    with pytest.raises(ValueError):
        open_store("postgres://x")


async def test_redis_unreachable_fails_closed() -> None:
    from facilitator.store import StoreUnavailableError

    s = RedisSettlementStore.from_url("redis://127.0.0.1:1/0")
    with pytest.raises(StoreUnavailableError):
        await s.claim("k", "d", now_ms=0, lease_ms=LEASE)  # never reaches a store
    with pytest.raises(StoreUnavailableError):
        await s.get("k")
    await s.close()
