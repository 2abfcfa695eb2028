"""The Redis budget store's own layout (budgets/lua.py): the running total of holds stays equal to
the holds it sums (reserve, re-reserve, commit, release, expiry swept by score), and the one hash
of counters per scope keeps a bounded number of fields as windows move on, while the counters a
reserve may still read (the previous calendar window, the last 61 rolling buckets) stay."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from zoneinfo import ZoneInfo

import pytest

from budgets.models import LedgerEntry, Limit, Scope, commit_windows, resolve_windows
from budgets.redis_store import RedisBudgetStore
from budgets.store import Check

pytestmark = pytest.mark.integration

NET = "eip155:84532"
ASSET = "0x" + "33" * 20
UTC = ZoneInfo("UTC")
T0 = 1_800_000_000.0  # a fixed moment: the store takes `now` from its caller


@pytest.fixture
async def store(redis_server) -> AsyncIterator[RedisBudgetStore]:  # type: ignore[no-untyped-def]
    s = RedisBudgetStore.from_url(redis_server.url, prefix=f"lay{uuid.uuid4().hex[:8]}:")
    yield s
    await s.close()


def scope(name: str) -> Scope:
    return Scope("agent", name, NET, ASSET, f"a:{name}")


def entry(rid: str, amount: int, ts: float) -> LedgerEntry:
    return LedgerEntry(ts=ts, agent="0xa", group=None, route="POST /x", model=None, amount=amount, asset=ASSET,
                       network=NET, tx_hash="0x" + "aa" * 32, request_id=rid)


async def holds(store: RedisBudgetStore, s: Scope) -> tuple[int, int]:
    """(running total, sum of the holds themselves)."""
    total = await store._r.get(store._k(s, "rt"))
    amounts = await store._r.hvals(store._k(s, "rh"))
    return int(total or 0), sum(int(a) for a in amounts)


async def test_the_running_total_of_holds_is_their_sum_through_every_operation(store: RedisBudgetStore) -> None:
    s = scope("0xh1")
    check = Check(s, tuple(resolve_windows([Limit(period="day", amount=10**6)], T0, UTC)))
    for i in range(300):
        assert await store.reserve([check], 10 + i, f"r{i}", now=T0, hold_s=100 if i % 2 else 10) is None
    assert (await holds(store, s))[0] == (await holds(store, s))[1] == sum(10 + i for i in range(300))
    assert await store.reserve([check], 5, "r299", now=T0, hold_s=100) is None  # the same id again: replaced
    for i in range(0, 40, 3):
        await store.release([check], f"r{i}")
    for i in range(1, 40, 3):
        await store.commit([check], f"r{i}", 1, entry(f"r{i}", 1, T0), now=T0)
    await store.release([check], "r1")  # already committed: nothing left to drop
    total, summed = await holds(store, s)
    assert total == summed
    (u,) = await store.usage(check, now=T0 + 11)  # the 10 s holds expired: swept by score
    total, summed = await holds(store, s)
    assert u.reserved == total == summed
    assert summed == sum(10 + i for i in range(1, 300, 2) if i != 299 and not (i < 40 and i % 3 in (0, 1))) + 5
    assert await store._r.zcard(store._k(s, "rz")) == await store._r.hlen(store._k(s, "rh"))


async def test_counters_of_past_windows_are_dropped_and_the_live_ones_kept(store: RedisBudgetStore) -> None:
    s = scope("0xc1")
    c_key = store._k(s, "c")
    now = T0
    for i in range(3 * 24 * 6):  # every 10 minutes for three days, every window counted (as the enforcer does)
        now = T0 + i * 600
        check = Check(s, tuple(commit_windows([], now, UTC)))
        await store.reserve([Check(s, ())], 1, f"c{i}", now=now, hold_s=60)
        assert await store.commit([check], f"c{i}", 1, entry(f"c{i}", 1, now), now=now)
    fields = await store._r.hkeys(c_key)
    # four calendar periods: the current and the previous window each, plus two markers; four rolling
    # periods: at most 61 buckets each plus one marker
    assert len(fields) <= 4 * 4 + 4 * 62
    hour = [w for w in commit_windows([], now, UTC) if w.period == "hour" and not w.rolling][0]
    previous_hour = [w for w in commit_windows([], now - 3600, UTC) if w.period == "hour" and not w.rolling][0]
    two_back = [w for w in commit_windows([], now - 7200, UTC) if w.period == "hour" and not w.rolling][0]
    assert hour.key in fields and previous_hour.key in fields and two_back.key not in fields
    # what a reserve reads is what was spent: the rolling day is the last 24 h (+ one bucket at most)
    limits = [Limit(period="day", amount=10**6, rolling=True), Limit(period="hour", amount=10**6, rolling=True),
              Limit(period="day", amount=10**6)]
    usage = await store.usage(Check(s, tuple(resolve_windows(limits, now, UTC))), now=now)
    times = [T0 + i * 600 for i in range(3 * 24 * 6)]

    def rolling(bucket_s: int) -> int:  # calls in the current bucket and the 60 before it
        return sum(1 for t in times if t // bucket_s >= now // bucket_s - 60)

    assert [u.spent for u in usage] == [rolling(1440), rolling(60), sum(1 for t in times if t >= now // 86400 * 86400)]
    assert usage[0].spent >= 144 and usage[1].spent >= 6  # at least the whole last day / hour
