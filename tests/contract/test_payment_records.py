"""The gateway's payment records on the embedded SQLite store and on Redis."""

from __future__ import annotations

import asyncio

import pytest

from gateway.records import PaymentRecord, PaymentRecords, RecordState, open_records
from tests.conftest import TestClock


@pytest.fixture
def records(open_backend) -> PaymentRecords:
    return open_backend(open_records)


@pytest.fixture
def now_ms(clock: TestClock):
    return clock.ms


@pytest.fixture
def begin(records: PaymentRecords, now_ms):
    async def begin(records: PaymentRecords, key: str, *, owner: str = "a", at: int | None = None,
                    lease_ms: int = 60_000, digest: str = "d1") -> PaymentRecord | None:
        return await records.begin(key, "fp", digest, owner=owner, now_ms=now_ms() if at is None else at,
                                   lease_ms=lease_ms)

    return begin


async def test_begin_is_exclusive_until_the_lease_expires(records: PaymentRecords, begin, now_ms) -> None:
    assert await begin(records, "p1") is None
    held = await begin(records, "p1", owner="b")
    assert held is not None and held.state == RecordState.PROCESSING and held.owner == "a" and held.digest == "d1"
    assert await begin(records, "p1", owner="b", at=now_ms() + 61_000) is None  # taken over
    assert (await records.get("p1")).owner == "b"  # type: ignore[union-attr]


async def test_settled_records_keep_the_response_bytes(records: PaymentRecords, begin, now_ms) -> None:
    assert await begin(records, "p2") is None
    body = bytes(range(256)) * 4
    await records.save(PaymentRecord(key="p2", state=RecordState.SETTLED, request_fp="fp", tx="0x" + "ab" * 32,
                                     settle='{"success":true}', status=200, headers=[("content-type", "application/json")],
                                     body=body, cached=True, payment='{"payload":{}}', digest="d1", owner="a"),
                       ttl_s=86400, now_ms=now_ms())
    rec = await records.get("p2")
    assert rec is not None and rec.state == RecordState.SETTLED and rec.body == body and rec.cached
    assert rec.headers == [("content-type", "application/json")] and rec.payment == '{"payload":{}}'
    assert rec.digest == "d1" and not rec.delivered
    again = await begin(records, "p2", at=now_ms() + 120_000)
    assert again is not None and again.state == RecordState.SETTLED  # never taken over
    await records.abandon("p2", "a")  # a settled record is never abandoned
    assert await records.get("p2") is not None


async def test_abandon_frees_the_payment_for_its_owner_only(records: PaymentRecords, begin, now_ms) -> None:
    assert await begin(records, "p3") is None
    await records.abandon("p3", "someone-else")
    assert await records.get("p3") is not None
    await records.abandon("p3", "a")
    assert await records.get("p3") is None
    assert await begin(records, "p3") is None


async def test_leases_are_renewed_by_their_owner_and_acquired_once_lapsed(records: PaymentRecords, begin, now_ms) -> None:
    t = now_ms()
    assert await begin(records, "p4", at=t, lease_ms=1_000) is None
    assert await records.renew("p4", "a", now_ms=t + 900, lease_ms=1_000)
    assert not await records.renew("p4", "b", now_ms=t + 900, lease_ms=1_000)
    assert await records.acquire("p4", "b", now_ms=t + 1_500, lease_ms=1_000) is None  # renewed until t + 1,900
    settled = PaymentRecord(key="p4", state=RecordState.SETTLED, request_fp="fp", digest="d1", owner="a",
                            lease_until_ms=t + 1_900)
    assert await records.save(settled, ttl_s=600, owner="a", now_ms=now_ms())
    got = await records.acquire("p4", "b", now_ms=t + 2_000, lease_ms=1_000)
    assert got is not None and got.state == RecordState.SETTLED and got.owner == "b" and got.lease_until_ms == t + 3_000
    assert not await records.renew("p4", "a", now_ms=t + 2_100, lease_ms=1_000)  # a lost it
    assert not await records.save(settled, ttl_s=600, owner="a", now_ms=now_ms())  # and can no longer write it
    assert (await records.get("p4")).owner == "b"  # type: ignore[union-attr]
    assert await records.acquire("missing", "b", now_ms=t, lease_ms=1_000) is None


async def test_payment_identifier_binds_once_unless_replaced(records: PaymentRecords, begin, now_ms) -> None:
    pid = "pay_" + "0" * 28
    assert await records.link_id(pid, "k1", ttl_s=60) == "k1"
    assert await records.link_id(pid, "k2", ttl_s=60) == "k1"
    assert await records.link_id(pid, "k2", ttl_s=60, replace=True) == "k2"


async def test_concurrent_begins_have_one_owner(records: PaymentRecords, begin, now_ms) -> None:
    results = await asyncio.gather(*(begin(records, "hot", owner=str(i)) for i in range(100)))
    assert sum(r is None for r in results) == 1


async def test_concurrent_acquires_have_one_owner(records: PaymentRecords, begin, now_ms) -> None:
    await records.save(PaymentRecord(key="owed", state=RecordState.SETTLED, request_fp="fp", digest="d1"),
                       ttl_s=600, now_ms=now_ms())
    results = await asyncio.gather(*(records.acquire("owed", str(i), now_ms=now_ms(), lease_ms=60_000) for i in range(50)))
    assert sum(r is not None for r in results) == 1


async def test_expired_records_and_payment_ids_are_swept(records: PaymentRecords, begin, now_ms) -> None:
    from gateway.records import SQLitePaymentRecords

    if not isinstance(records, SQLitePaymentRecords):
        assert await records.sweep(now_ms=now_ms()) == 0  # Redis: every key expires by itself
        return
    day = 86_400_000
    for key, at in (("old", now_ms() - 2 * day), ("new", now_ms())):
        assert await begin(records, key, at=at) is None
        await records.save(PaymentRecord(key=key, state=RecordState.SETTLED, request_fp="fp", digest="d1"),
                           ttl_s=86_400, now_ms=at)
    await records.link_id("id-new", "new", ttl_s=3600, now_ms=now_ms())
    assert await records.sweep(now_ms=now_ms(), limit=1) == 1
    assert await records.get("old") is None and await records.get("new") is not None
    assert await records.sweep(now_ms=now_ms() + 2 * day) == 2  # the record and the id, once expired
    assert await records.get("new") is None
    assert await records.link_id("id-new", "other", ttl_s=3600, now_ms=now_ms() + 2 * day) == "other"


async def test_the_gateways_sweep_loop_forgets_expired_records(records: PaymentRecords) -> None:
    import time

    from gateway.records import SQLitePaymentRecords, sweep_forever

    if not isinstance(records, SQLitePaymentRecords):
        return  # Redis keys expire by themselves
    now = int(time.time() * 1000)  # the loop reads the real clock, as the gateway runs it
    for key, at in (("stale", now - 2 * 86_400_000), ("fresh", now)):
        await records.save(PaymentRecord(key=key, state=RecordState.SETTLED, request_fp="fp", digest="d1"),
                           ttl_s=86_400, now_ms=at)
    loop = asyncio.ensure_future(sweep_forever(records, interval_s=0.02, limit=1))
    try:
        for _ in range(100):
            if await records.get("stale") is None:
                break
            await asyncio.sleep(0.02)
    finally:
        loop.cancel()
    assert await records.get("stale") is None and await records.get("fresh") is not None
