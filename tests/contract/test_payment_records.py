"""The gateway's payment records on the embedded SQLite store and on Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import REDIS_TOPOLOGIES, TestClock, redis_url_for
from gateway.records import PaymentRecord, PaymentRecords, RecordState, RedisPaymentRecords, SQLitePaymentRecords


@pytest.fixture(params=["sqlite", *REDIS_TOPOLOGIES])
async def records(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PaymentRecords]:
    if request.param == "sqlite":
        r: PaymentRecords = SQLitePaymentRecords(str(tmp_path / "records.sqlite3"))
    else:
        r = RedisPaymentRecords.from_url(redis_url_for(request, request.param), prefix=request.getfixturevalue("redis_prefix"))
    yield r
    await r.close()


async def test_begin_is_exclusive_until_the_lease_expires(records: PaymentRecords, clock: TestClock) -> None:
    assert await records.begin("p1", "fp", now_ms=clock.ms(), lease_ms=60_000) is None
    held = await records.begin("p1", "fp", now_ms=clock.ms(), lease_ms=60_000)
    assert held is not None and held.state == RecordState.PROCESSING
    assert await records.begin("p1", "fp", now_ms=clock.ms() + 61_000, lease_ms=60_000) is None  # taken over


async def test_settled_records_keep_the_response_bytes(records: PaymentRecords, clock: TestClock) -> None:
    assert await records.begin("p2", "fp", now_ms=clock.ms(), lease_ms=60_000) is None
    body = bytes(range(256)) * 4
    await records.save(PaymentRecord(key="p2", state=RecordState.SETTLED, request_fp="fp", tx="0x" + "ab" * 32,
                                     settle='{"success":true}', status=200, headers=[("content-type", "application/json")],
                                     body=body, cached=True, payment='{"payload":{}}'), ttl_s=86400,
                       now_ms=clock.ms())
    rec = await records.get("p2")
    assert rec is not None and rec.state == RecordState.SETTLED and rec.body == body and rec.cached
    assert rec.headers == [("content-type", "application/json")] and rec.payment == '{"payload":{}}'
    again = await records.begin("p2", "fp", now_ms=clock.ms() + 120_000, lease_ms=60_000)
    assert again is not None and again.state == RecordState.SETTLED  # never taken over
    await records.abandon("p2")  # only PROCESSING records are abandoned
    assert await records.get("p2") is not None


async def test_abandon_frees_the_payment(records: PaymentRecords, clock: TestClock) -> None:
    assert await records.begin("p3", "fp", now_ms=clock.ms(), lease_ms=60_000) is None
    await records.abandon("p3")
    assert await records.get("p3") is None
    assert await records.begin("p3", "fp", now_ms=clock.ms(), lease_ms=60_000) is None


async def test_payment_identifier_binds_once_unless_replaced(records: PaymentRecords) -> None:
    pid = "pay_" + "0" * 28
    assert await records.link_id(pid, "k1", ttl_s=60) == "k1"
    assert await records.link_id(pid, "k2", ttl_s=60) == "k1"
    assert await records.link_id(pid, "k2", ttl_s=60, replace=True) == "k2"


async def test_concurrent_begins_have_one_owner(records: PaymentRecords, clock: TestClock) -> None:
    results = await asyncio.gather(*(records.begin("hot", "fp", now_ms=clock.ms(), lease_ms=60_000) for _ in range(100)))
    assert sum(r is None for r in results) == 1
