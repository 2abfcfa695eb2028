"""The refusal log's store (what the console's refusal counts read) on SQLite and Redis (single,
Sentinel, Cluster): newest first, by time, trimmed to KEEP; and the log in front of it never
fails a refusal when the store is down."""

from __future__ import annotations

import pytest

import gateway.refusals as refusals
from gateway.refusals import RefusalLog, RefusalNote, RefusalStore, open_refusals
from tests.conftest import TestClock


@pytest.fixture
def store(open_backend) -> RefusalStore:
    return open_backend(open_refusals)


def note(ts: float, reason: str = "budget_exceeded", **kw: str) -> RefusalNote:
    return RefusalNote(ts, "POST /v1/chat/completions", reason, 402, "no", **kw)


async def test_newest_first_since_a_time(store: RefusalStore, clock: TestClock) -> None:
    t0 = clock()
    await store.add([note(t0 - 100, "a"), note(t0 - 50, "b")])
    await store.add([note(t0 - 10, "c", payer="0xab", network="eip155:8453", asset="0xcd", kind="budget", tx="")])
    assert [n.reason for n in await store.recent(since=t0 - 1000, limit=10)] == ["c", "b", "a"]
    assert [n.reason for n in await store.recent(since=t0 - 60, limit=10)] == ["c", "b"]
    assert [n.reason for n in await store.recent(since=t0 - 1000, limit=1)] == ["c"]
    [latest] = await store.recent(since=t0 - 20, limit=10)
    assert latest == note(t0 - 10, "c", payer="0xab", network="eip155:8453", asset="0xcd", kind="budget")


async def test_keeps_the_newest(store: RefusalStore, clock: TestClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refusals, "KEEP", 5)
    t0 = clock()
    for i in range(4):
        await store.add([note(t0 + 2 * i, f"r{2 * i}"), note(t0 + 2 * i + 1, f"r{2 * i + 1}")])
    assert [n.reason for n in await store.recent(since=0, limit=100)] == ["r7", "r6", "r5", "r4", "r3"]


async def test_the_log_buffers_and_never_raises(clock: TestClock) -> None:
    log = RefusalLog(open_refusals("memory://"), clock=clock)
    log.note("POST /x", "agent_suspended", 402, "suspended", "0xAB", "eip155:1", "0xCD", kind="budget")
    [got] = await log.recent(since=clock() - 1)  # reading flushes first
    assert (got.payer, got.asset, got.kind) == ("0xab", "0xcd", "budget")
    down = RefusalLog(open_refusals("redis://127.0.0.1:1/0"), clock=clock)  # nothing listens there
    down.note("POST /x", "budget_exceeded", 402, "over")
    await down.flush()  # dropped, logged: the refusal itself was already answered
    await down.store.close()
    await log.store.close()
