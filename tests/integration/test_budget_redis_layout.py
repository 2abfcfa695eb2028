"""The Redis budget store's own layout (budgets/lua.py): the running total of holds stays equal to
the holds it sums (reserve, re-reserve, commit, release, expiry swept by score); the one hash of
counters per scope keeps a bounded number of fields as windows move on, while the counters a
reserve may still read (the previous calendar window, the last 61 rolling buckets) stay; a period
limited later is rebuilt from the hourly spend (exactly for a calendar window starting on the
hour, never less for a rolling one); counters are read as far as their longest limb."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from zoneinfo import ZoneInfo

import pytest

from budgets.models import LedgerEntry, Limit, RateLimit, Scope, commit_windows, resolve_windows
from budgets.redis_store import RedisBudgetStore
from budgets.store import Check

pytestmark = pytest.mark.integration

NET = "eip155:84532"
ASSET = "0x" + "33" * 20
UTC = ZoneInfo("UTC")
# 08:00 UTC today, on the hour as the windows need: the store takes `now` from its caller, and no
# test here may depend on the date.
T0 = float(int(time.time()) // 86400 * 86400 + 8 * 3600)


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
    h = await store._r.hgetall(store._k(s, "rh"))
    total = sum(int(x) * 10 ** (9 * i) for i, x in enumerate(h.get("t", "").split(",")) if x)
    return total, sum(int(a) for f, a in h.items() if f.startswith("h:"))


async def test_the_running_total_of_holds_is_their_sum_through_every_operation(store: RedisBudgetStore) -> None:
    s = scope("0xh1")
    check = Check(s, tuple(resolve_windows([Limit(period="day", amount=10**6)], T0, UTC)))
    for i in range(300):
        assert await store.reserve([check], 10 + i, f"r{i}", now=T0, hold_s=100 if i % 2 else 10) is None
    assert (await holds(store, s))[0] == (await holds(store, s))[1] == sum(10 + i for i in range(300))
    assert await store.reserve([check], 5, "r299", now=T0, hold_s=100) is None  # the same id again: replaced
    for i in range(0, 40, 3):
        await store.release([check], f"r{i}", now=T0)
    for i in range(1, 40, 3):
        await store.commit([check], f"r{i}", 1, entry(f"r{i}", 1, T0), now=T0)
    await store.release([check], "r1", now=T0)  # already committed: nothing left to drop
    total, summed = await holds(store, s)
    assert total == summed
    (u,) = await store.usage(check, now=T0 + 11)  # the 10 s holds expired: swept by score
    total, summed = await holds(store, s)
    assert u.reserved == total == summed
    assert summed == sum(10 + i for i in range(1, 300, 2) if i != 299 and not (i < 40 and i % 3 in (0, 1))) + 5
    members = [m for m in await store._r.zrange(store._k(s, "rz"), 0, -1) if m]  # '' keeps the key alive
    assert sorted(f"h:{m}" for m in members) == sorted(f for f in await store._r.hkeys(store._k(s, "rh"))
                                                       if f.startswith("h:"))


EVERY = [Limit(period=p, amount=10**40, rolling=r) for r in (False, True) for p in ("hour", "day", "week", "month")]


async def test_counters_of_past_windows_are_dropped_and_the_live_ones_kept(store: RedisBudgetStore) -> None:
    s = scope("0xc1")
    c_key = store._k(s, "c")
    now = T0
    times = [T0 + i * 600 for i in range(3 * 24 * 6)]  # every 10 minutes for three days
    for i, now in enumerate(times):
        assert await store.reserve([Check(s, tuple(resolve_windows(EVERY, now, UTC)))], 1, f"c{i}", now=now,
                                   hold_s=60) is None  # every period limited: every period tracked
        check = Check(s, tuple(commit_windows([], now, UTC)))
        assert await store.commit([check], f"c{i}", 1, entry(f"c{i}", 1, now), now=now)
    fields = await store._r.hkeys(c_key)
    # calendar: the current and the previous window, two markers; rolling: 61 buckets, one marker;
    # the hours of spend, two markers of their own
    assert len(fields) <= 4 * 4 + 4 * 62 + 73 + 2
    hour = next(w for w in commit_windows([], now, UTC) if w.period == "hour" and not w.rolling)
    previous_hour = next(w for w in commit_windows([], now - 3600, UTC) if w.period == "hour" and not w.rolling)
    two_back = next(w for w in commit_windows([], now - 7200, UTC) if w.period == "hour" and not w.rolling)
    assert f"{hour.key}#0" in fields and f"{previous_hour.key}#0" in fields and f"{two_back.key}#0" not in fields
    # what a reserve reads is what was spent
    limits = [Limit(period="day", amount=10**6, rolling=True), Limit(period="hour", amount=10**6, rolling=True),
              Limit(period="day", amount=10**6)]
    usage = await store.usage(Check(s, tuple(resolve_windows(limits, now, UTC))), now=now)

    def rolling(bucket_s: int) -> int:  # calls in the current bucket and the 60 before it
        return sum(1 for t in times if t // bucket_s >= now // bucket_s - 60)

    assert [u.spent for u in usage] == [rolling(1440), rolling(60), sum(1 for t in times if t >= now // 86400 * 86400)]
    assert usage[0].spent >= 144 and usage[1].spent >= 6  # at least the whole last day / hour


async def test_a_period_limited_later_is_rebuilt_from_the_hourly_spend(store: RedisBudgetStore) -> None:
    s = scope("0xr1")
    times = [T0 + i * 700 for i in range(200)]  # 700 s apart: about 39 hours
    for i, now in enumerate(times):
        assert await store.reserve([Check(s, ())], 3, f"r{i}", now=now, hold_s=60) is None
        assert await store.commit([Check(s, tuple(commit_windows([], now, UTC)))], f"r{i}", 3,
                                  entry(f"r{i}", 3, now), now=now)
    now = times[-1]
    # nothing was limited, so no window was counted: only the hours
    assert not [f for f in await store._r.hkeys(store._k(s, "c")) if f.startswith(("day:", "roll:"))]
    limits = [Limit(period="day", amount=10**6), Limit(period="hour", amount=10**6, rolling=True),
              Limit(period="week", amount=10**6, rolling=True)]
    day, roll_hour, roll_week = await store.usage(Check(s, tuple(resolve_windows(limits, now, UTC))), now=now)
    assert day.spent == 3 * sum(1 for t in times if t >= now // 86400 * 86400)  # the day starts on the hour: exact
    # rolling: the hours that overlap the window count whole (never less than the window's spend)
    hours_start = (now // 3600 - 1) * 3600
    assert 3 * sum(1 for t in times if t >= now - 3600) <= roll_hour.spent <= 3 * sum(1 for t in times if t >= hours_start)
    assert roll_week.spent == 3 * len(times)
    # from now on they are tracked: a commit counts in them
    later = now + 10
    assert await store.reserve([Check(s, ())], 5, "x", now=later, hold_s=60) is None
    assert await store.commit([Check(s, tuple(commit_windows([], later, UTC)))], "x", 5, entry("x", 5, later), now=later)
    after = await store.usage(Check(s, tuple(resolve_windows(limits, later, UTC))), now=later)
    assert [u.spent for u in after] == [day.spent + 5, roll_hour.spent + 5, roll_week.spent + 5]


async def test_a_counter_longer_than_the_limit_is_read_whole(store: RedisBudgetStore) -> None:
    """Limbs are read as far as the longest counter of the scope, not only as far as the limit."""
    s = scope("0xl1")
    month = Check(s, tuple(resolve_windows([Limit(period="month", amount=10**40)], T0, UTC)))
    day = Check(s, tuple(resolve_windows([Limit(period="day", amount=10**40)], T0, UTC)))
    assert await store.reserve([month], 10**30, "big", now=T0, hold_s=60) is None
    assert await store.reserve([day], 1, "track", now=T0, hold_s=60) is None
    await store.release([day], "track", now=T0)
    assert await store.commit([Check(s, tuple(commit_windows([], T0, UTC)))], "big", 10**30,
                              entry("big", 10**30, T0), now=T0)
    small = Check(s, tuple(resolve_windows([Limit(period="day", amount=100)], T0, UTC)))
    refused = await store.reserve([small], 1, "small", now=T0, hold_s=60)
    assert refused is not None and refused.reason == "budget_exceeded" and refused.remaining == 0
    (u,) = await store.usage(small, now=T0)
    assert u.spent == 10**30


async def test_a_store_written_by_the_earlier_layout_is_carried_over(store: RedisBudgetStore) -> None:
    """Keys as the earlier scripts wrote them (a decimal string per calendar window, a hash per
    rolling period, holds as id -> amount, the rate bucket on its own) keep their spend, holds and
    rate state after `migrate_layout`, and a second run changes nothing."""
    from budgets.redis_migrate import migrate_layout

    s = scope("0xm1")
    base = f"{store._p}b:{{{s.tag}}}:{s.name}"
    day = resolve_windows([Limit(period="day", amount=1)], T0, UTC)[0]
    yesterday = resolve_windows([Limit(period="day", amount=1)], T0 - 86400, UTC)[0]
    roll = resolve_windows([Limit(period="hour", amount=1, rolling=True)], T0, UTC)[0]
    big = 3 * 10**21 + 7  # past int64 and 2^53
    await store._r.set(f"{base}:{day.key}", str(big))
    await store._r.set(f"{base}:{yesterday.key}", "999")
    await store._r.hset(f"{base}:roll:hour", mapping={str(roll.bucket - 5): "40", str(roll.bucket): "2"})
    await store._r.zadd(f"{base}:rz", {"held-1": T0 + 100, "gone": T0 - 1})
    await store._r.hset(f"{base}:rh", mapping={"held-1": "30", "gone": "50"})
    await store._r.hset(f"{base}:rate", mapping={"tokens": "0.5", "ts": str(T0)})
    await store._r.set(f"{base}:done:r0", "1")
    assert await migrate_layout(store._r, store._p) > 0
    assert await migrate_layout(store._r, store._p) == 0

    limits = [Limit(period="day", amount=4 * 10**21), Limit(period="hour", amount=1000, rolling=True)]
    check = Check(s, tuple(resolve_windows(limits, T0, UTC)))
    day_use, roll_use = await store.usage(check, now=T0)
    assert (day_use.spent, roll_use.spent, day_use.reserved) == (big, 42, 30)  # the expired hold is swept
    refused = await store.reserve([check], 10**21, "new", now=T0, hold_s=60)
    assert refused is not None and refused.remaining == 4 * 10**21 - big - 30
    # the rate bucket came along: half a token left, so a rate-limited reserve is refused
    rated = Check(s, check.windows, RateLimit(per_minute=1))
    refused = await store.reserve([rated], 1, "rated", now=T0, hold_s=60)
    assert refused is not None and refused.reason == "rate_limited"
    # and the counters keep counting: a commit lands in the same window
    assert await store.reserve([check], 8, "more", now=T0 + 61, hold_s=60) is None
    assert await store.commit([Check(s, tuple(commit_windows([], T0 + 61, UTC)))], "more", 8,
                              entry("more", 8, T0 + 61), now=T0 + 61)
    (day_use, roll_use) = await store.usage(check, now=T0 + 61)
    assert (day_use.spent, roll_use.spent) == (big + 8, 50)


async def test_a_pinned_hold_outlives_its_expiry_and_its_keys_get_their_ttl_back(store: RedisBudgetStore) -> None:
    s = scope("0xp1")
    check = Check(s, tuple(resolve_windows([Limit(period="day", amount=1000)], T0, UTC)))
    z, h = store._k(s, "rz"), store._k(s, "rh")
    assert await store.reserve([check], 300, "asked", now=T0, hold_s=30) is None
    assert await store.reserve([check], 200, "other", now=T0, hold_s=30) is None
    assert await store.pin([check], "asked", 300, now=T0 + 1)
    assert await store.pin([check], "asked", 300, now=T0 + 1)  # twice: counted once
    assert await store._r.ttl(z) == await store._r.ttl(h) == -1  # no TTL while a hold is pinned
    # long after every hold's expiry (and the keys' old TTL): the pinned hold still counts
    (u,) = await store.usage(check, now=T0 + 30 * 86400)
    assert u.reserved == 300
    assert await store.reserve([check], 800, "late", now=T0 + 40, hold_s=30) is not None
    assert await store.reserve([check], 700, "late", now=T0 + 40, hold_s=30) is None
    assert await store._r.ttl(z) == -1  # a reserve beside a pinned hold does not give the TTL back
    assert await store.commit([check], "asked", 300, entry("asked", 300, T0 + 50), now=T0 + 50)
    assert 0 < await store._r.ttl(z) and 0 < await store._r.ttl(h)  # the last pin gone: they expire again
    total, summed = await holds(store, s)
    assert total == summed == 700


async def test_a_second_pinned_hold_and_the_rate_bucket_leave_the_keys_without_ttl(store: RedisBudgetStore) -> None:
    """Only a scope's first pinned hold persists its keys; while `p` is above 0 nothing gives them a
    TTL again (not a reserve, not the rate bucket), and the last one to go gives it back."""
    s = scope("0xp3")
    check = Check(s, tuple(resolve_windows([Limit(period="day", amount=1000)], T0, UTC)))
    z, h = store._k(s, "rz"), store._k(s, "rh")
    for rid in ("a", "b"):
        assert await store.reserve([check], 100, rid, now=T0, hold_s=30) is None
        assert await store.pin([check], rid, 100, now=T0 + 1)
    assert await store._r.hget(h, "p") == "2"
    await store.rate_take(s, RateLimit(per_minute=60), now=T0 + 2)
    assert await store._r.ttl(z) == await store._r.ttl(h) == -1
    await store.release([check], "a", now=T0 + 3)
    assert await store._r.ttl(z) == await store._r.ttl(h) == -1
    assert await store.commit([check], "b", 100, entry("b", 100, T0 + 4), now=T0 + 4)
    assert 0 < await store._r.ttl(z) and 0 < await store._r.ttl(h)
    assert await store._r.hget(h, "p") is None


@pytest.mark.parametrize("limit", [2**80, 10**27 + 1, 4 * 10**21 + 3, 10**9, 1])
async def test_room_is_decided_exactly_at_the_limit_whatever_the_limbs(store: RedisBudgetStore, limit: int) -> None:
    """A reserve decides on doubles only when the sum is clearly below the limit: one base unit
    more than the room is refused, the room itself fits, for limits past 2^53 and within it, with
    spend, holds and the amount spread over several limbs."""
    s = scope(f"0xe{limit % 997}")
    check = Check(s, tuple(resolve_windows([Limit(period="day", amount=limit)], T0, UTC)))
    spent, held = limit // 3, limit // 5
    if spent:
        assert await store.reserve([check], spent, "spent", now=T0, hold_s=60) is None
        assert await store.commit([Check(s, tuple(commit_windows([], T0, UTC)))], "spent", spent,
                                  entry("spent", spent, T0), now=T0)
    if held:
        assert await store.reserve([check], held, "held", now=T0, hold_s=60) is None
    room = limit - spent - held
    refused = await store.reserve([check], room + 1, "over", now=T0, hold_s=60)
    assert refused is not None and refused.reason == "budget_exceeded" and refused.remaining == room
    assert await store.reserve([check], room, "fits", now=T0, hold_s=60) is None
    refused = await store.reserve([check], 1, "one more", now=T0, hold_s=60)
    assert refused is not None and refused.remaining == 0
    zero = Check(s, tuple(resolve_windows([Limit(period="day", amount=0)], T0, UTC)))
    assert (await store.reserve([zero], 1, "zero", now=T0, hold_s=60)) is not None


async def test_a_payment_is_counted_once_per_transaction_whichever_hold_commits(store: RedisBudgetStore) -> None:
    s = scope("0xp2")
    check = Check(s, tuple(resolve_windows([Limit(period="day", amount=1000)], T0, UTC)))
    for rid in ("first", "resend"):
        assert await store.reserve([check], 100, rid, now=T0, hold_s=60) is None
        assert await store.pin([check], rid, 100, now=T0)
    tx = "0x" + "ab" * 32
    assert await store.commit([check], "resend", 100, entry("resend", 100, T0), now=T0, once=tx)
    assert not await store.commit([check], "first", 100, entry("first", 100, T0), now=T0, once=tx)
    (u,) = await store.usage(check, now=T0)
    assert (u.spent, u.reserved) == (100, 0)
    assert len(await store.ledger(agent=None, start=T0 - 1, end=T0 + 1, limit=10)) == 1
    assert 0 < await store._r.ttl(store._k(s, "rz"))


async def test_pinned_holds_moved_to_a_new_group_keep_their_keys_alive(store: RedisBudgetStore) -> None:
    """An agent changes group while a settlement is pinned under it: the moved hold still counts
    as pinned (`p`), the new scope's keys have no TTL until it goes, and then they get one."""
    old, new = Scope("agent", "0xm1", NET, ASSET, "a:0xm1"), Scope("agent", "0xm1", NET, ASSET, "g:team")
    windows = tuple(resolve_windows([Limit(period="day", amount=1000)], T0, UTC))
    assert await store.reserve([Check(old, windows)], 300, "asked", now=T0, hold_s=30) is None
    assert await store.pin([Check(old, windows)], "asked", 300, now=T0 + 1)
    await store.move_spend(old, new, windows)
    z, h = store._k(new, "rz"), store._k(new, "rh")
    assert await store._r.hget(h, "p") == "1"
    assert await store._r.ttl(z) == await store._r.ttl(h) == -1
    (u,) = await store.usage(Check(new, windows), now=T0 + 30 * 86400)
    assert u.reserved == 300
    assert await store.commit([Check(new, windows)], "asked", 300, entry("asked", 300, T0 + 50), now=T0 + 50)
    assert await store._r.hget(h, "p") is None
    assert 0 < await store._r.ttl(h)
