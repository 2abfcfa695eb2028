"""Settlement intents (gateway/intents.py) on the embedded SQLite store and on Redis: written
ahead, leased to one owner at a time, taken over by recovery once the lease lapsed."""

from __future__ import annotations

import asyncio

import pytest

from budgets.models import Hold
from gateway.intents import Intent, IntentStore, open_intents
from tests.conftest import TestClock

BIG = 10**30  # beyond int64: 18-decimal tokens


@pytest.fixture
def intents(open_backend) -> IntentStore:
    return open_backend(open_intents)


def intent(id: str, amount: int = 5) -> Intent:
    hold = Hold(id=id, agent="0xA1", network="eip155:84532", asset="0xaa", amount=BIG, route="POST /v1/chat",
                model="m", group="g")
    return Intent(id=id, key=f"pay:{id}", hold=hold, amount=amount, payment='{"payload":{}}', request_id=id,
                  request_fp="fp", digest="d", details={"usage": {"total_tokens": 3}}, created_ms=1)


async def test_an_intent_round_trips_exactly(intents: IntentStore, clock: TestClock) -> None:
    await intents.write(intent("i1", BIG + 1), owner="a", lease_until_ms=clock.ms() + 60_000)
    assert await intents.get("i1") == intent("i1", BIG + 1)
    assert await intents.count() == 1
    await intents.finish("i1")
    assert await intents.get("i1") is None and await intents.count() == 0


async def test_a_live_lease_is_not_lapsed_nor_taken(intents: IntentStore, clock: TestClock) -> None:
    now = clock.ms()
    await intents.write(intent("i2"), owner="a", lease_until_ms=now + 60_000)
    assert await intents.lapsed(now_ms=now, limit=10) == []
    assert await intents.take("i2", "b", now_ms=now, lease_ms=1000) is None
    assert [i.id for i in await intents.lapsed(now_ms=now + 61_000, limit=10)] == ["i2"]
    taken = await intents.take("i2", "b", now_ms=now + 61_000, lease_ms=1000)
    assert taken == intent("i2")
    assert await intents.take("i2", "c", now_ms=now + 61_500, lease_ms=1000) is None  # b holds it now
    assert not await intents.lease("i2", "a", until_ms=0)  # the old owner lost it
    assert await intents.lease("i2", "b", until_ms=0)  # b hands it back at once
    assert [i.id for i in await intents.lapsed(now_ms=now + 61_500, limit=10)] == ["i2"]


async def test_lapsed_lists_oldest_leases_first_up_to_the_limit(intents: IntentStore, clock: TestClock) -> None:
    now = clock.ms()
    for n, at in ((1, 300), (2, 100), (3, 200)):
        await intents.write(intent(f"o{n}"), owner="a", lease_until_ms=now + at)
    assert [i.id for i in await intents.lapsed(now_ms=now + 1000, limit=2)] == ["o2", "o3"]
    assert [i.id for i in await intents.lapsed(now_ms=now + 250, limit=10)] == ["o2", "o3"]


async def test_one_owner_takes_a_lapsed_intent_under_contention(intents: IntentStore, clock: TestClock) -> None:
    now = clock.ms()
    await intents.write(intent("c1"), owner="dead", lease_until_ms=now - 1)
    taken = await asyncio.gather(*(intents.take("c1", f"r{n}", now_ms=now, lease_ms=5000) for n in range(20)))
    assert sum(t is not None for t in taken) == 1
