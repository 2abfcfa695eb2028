"""One contract for every BudgetStore: the embedded SQLite store and Redis."""

from __future__ import annotations

import asyncio
import uuid
from zoneinfo import ZoneInfo

import pytest

from budgets.models import LedgerEntry, Limit, Policy, RateLimit, Scope, resolve_windows
from budgets.sqlite_store import open_budget_store
from budgets.store import BudgetStore, Check
from tests.conftest import TestClock

NET = "eip155:84532"
ASSET = "0x" + "11" * 20
OPG = 10**18
UTC = ZoneInfo("UTC")


@pytest.fixture
def store(open_backend) -> BudgetStore:
    return open_backend(open_budget_store)


@pytest.fixture
def t0(clock: TestClock) -> float:
    """The test's start: now on the (possibly shifted) test clock."""
    return clock()


def agent_check(agent: str, limits: list[Limit], now: float, *, group: str | None = None,
                rate: RateLimit | None = None) -> Check:
    tag = f"g:{group}" if group else f"a:{agent}"
    return Check(Scope("agent", agent, NET, ASSET, tag), tuple(resolve_windows(limits, now, UTC)), rate)


def group_check(group: str, limits: list[Limit], now: float) -> Check:
    return Check(Scope("group", group, NET, ASSET, f"g:{group}"), tuple(resolve_windows(limits, now, UTC)))


def entry(agent: str, amount: int, rid: str, ts: float) -> LedgerEntry:
    return LedgerEntry(ts=ts, agent=agent, group=None, route="POST /v1/chat/completions", model="m", amount=amount,
                       asset=ASSET, network=NET, tx_hash="0x" + "aa" * 32, request_id=rid)


async def test_reserve_commit_release_against_a_daily_limit(store: BudgetStore, t0: float) -> None:
    check = agent_check("0xa1", [Limit(period="day", amount=100)], t0)
    assert await store.reserve([check], 60, "r1", now=t0, hold_s=60) is None
    refused = await store.reserve([check], 50, "r2", now=t0, hold_s=60)
    assert refused is not None and refused.reason == "budget_exceeded" and refused.remaining == 40
    assert refused.resets_at is not None and refused.resets_at > t0
    await store.release([check], "r1", now=t0)
    assert await store.reserve([check], 50, "r2", now=t0, hold_s=60) is None
    assert await store.commit([check], "r2", 30, entry("0xa1", 30, "r2", t0), now=t0)  # charged less than held
    (usage,) = await store.usage(check, now=t0)
    assert (usage.spent, usage.reserved, usage.remaining) == (30, 0, 70)


async def test_commit_is_idempotent_per_reservation(store: BudgetStore, t0: float) -> None:
    check = agent_check("0xa2", [Limit(period="day", amount=100)], t0)
    assert await store.reserve([check], 10, "r", now=t0, hold_s=60) is None
    assert await store.commit([check], "r", 10, entry("0xa2", 10, "r", t0), now=t0) is True
    assert await store.commit([check], "r", 10, entry("0xa2", 10, "r", t0), now=t0) is False
    (usage,) = await store.usage(check, now=t0)
    assert usage.spent == 10
    assert len(await store.ledger(agent="0xa2", start=t0 - 60, end=t0 + 60, limit=10)) == 1


async def test_holds_expire_so_a_crashed_replica_frees_its_budget(store: BudgetStore, t0: float) -> None:
    check = agent_check("0xa3", [Limit(period="day", amount=100)], t0)
    assert await store.reserve([check], 100, "lost", now=t0, hold_s=30) is None
    assert (await store.reserve([check], 1, "x", now=t0 + 10, hold_s=30)) is not None
    assert await store.reserve([check], 100, "y", now=t0 + 31, hold_s=30) is None


async def test_commit_once_per_settlement_drops_a_second_hold_without_counting(store: BudgetStore, t0: float) -> None:
    """Two holds for one payment (a resend that took over a stalled claim): one count, no hold left."""
    check = agent_check("0xa8", [Limit(period="day", amount=100)], t0)
    assert await store.reserve([check], 10, "first", now=t0, hold_s=60) is None
    assert await store.reserve([check], 10, "second", now=t0, hold_s=60) is None
    tx = "0x" + "ee" * 32
    assert await store.commit([check], "second", 10, entry("0xa8", 10, "second", t0), now=t0, once=tx)
    assert not await store.commit([check], "first", 10, entry("0xa8", 10, "first", t0), now=t0, once=tx)
    (usage,) = await store.usage(check, now=t0)
    assert (usage.spent, usage.reserved) == (10, 0)
    assert len(await store.ledger(agent="0xa8", start=t0 - 60, end=t0 + 60, limit=10)) == 1


async def test_a_pinned_hold_never_expires_until_committed_or_released(store: BudgetStore, t0: float) -> None:
    """Settlement was asked for under this hold: it outlives hold_s (and a later reserve's TTL)."""
    check = agent_check("0xa9", [Limit(period="day", amount=100)], t0)
    assert await store.reserve([check], 60, "asked", now=t0, hold_s=30) is None
    assert await store.pin([check], "asked", 60, now=t0 + 1)
    later = t0 + 3600
    refused = await store.reserve([check], 50, "other", now=later, hold_s=30)
    assert refused is not None and refused.remaining == 40
    assert await store.reserve([check], 40, "fits", now=later, hold_s=30) is None
    (usage,) = await store.usage(check, now=later + 31)  # "fits" expired, "asked" did not
    assert usage.reserved == 60
    assert await store.commit([check], "asked", 60, entry("0xa9", 60, "asked", later), now=later + 31)
    (usage,) = await store.usage(check, now=later + 31)
    assert (usage.spent, usage.reserved) == (60, 0)
    assert await store.reserve([check], 5, "slow", now=later, hold_s=30) is None
    assert not await store.pin([check], "slow", 5, now=later + 31)  # expired: its budget may be another's now
    assert not await store.pin([check], "never", 5, now=later)
    (usage,) = await store.usage(check, now=later + 31)
    assert usage.reserved == 0


async def test_agent_and_group_budgets_are_checked_together(store: BudgetStore, t0: float) -> None:
    g = f"team-{uuid.uuid4().hex[:6]}"
    group = group_check(g, [Limit(period="day", amount=100)], t0)
    a = agent_check("0xb1", [Limit(period="day", amount=80)], t0, group=g)
    b = agent_check("0xb2", [Limit(period="day", amount=80)], t0, group=g)
    assert await store.reserve([a, group], 70, "a1", now=t0, hold_s=60) is None
    refused = await store.reserve([b, group], 40, "b1", now=t0, hold_s=60)
    assert refused is not None and refused.scope == group.scope.name and refused.remaining == 30
    # the refusal held nothing on b's own budget
    (usage,) = await store.usage(b, now=t0)
    assert usage.reserved == 0
    assert await store.reserve([b, group], 30, "b2", now=t0, hold_s=60) is None


async def test_calendar_window_resets_and_rolling_window_slides(store: BudgetStore, t0: float) -> None:
    day = agent_check("0xc1", [Limit(period="day", amount=100)], now=t0)
    assert await store.reserve([day], 100, "d1", now=t0, hold_s=60) is None
    await store.commit([day], "d1", 100, entry("0xc1", 100, "d1", t0), now=t0)
    tomorrow = agent_check("0xc1", [Limit(period="day", amount=100)], now=t0 + 86400)
    assert await store.reserve([tomorrow], 100, "d2", now=t0 + 86400, hold_s=60) is None

    limits = [Limit(period="hour", amount=100, rolling=True)]
    roll = agent_check("0xc2", limits, now=t0)
    assert await store.reserve([roll], 100, "h1", now=t0, hold_s=60) is None
    await store.commit([roll], "h1", 100, entry("0xc2", 100, "h1", t0), now=t0)
    later = agent_check("0xc2", limits, now=t0 + 1800)
    assert await store.reserve([later], 1, "h2", now=t0 + 1800, hold_s=60) is not None  # still inside the hour
    after = agent_check("0xc2", limits, now=t0 + 3600 + 61)
    assert await store.reserve([after], 100, "h3", now=t0 + 3600 + 61, hold_s=60) is None


async def test_eighteen_decimal_amounts_are_exact_beyond_int64(store: BudgetStore, t0: float) -> None:
    limit = 1000 * OPG + 1  # 1e21: past 2**63 and 2**53
    check = agent_check("0xd1", [Limit(period="month", amount=limit)], t0)
    for i in range(10):
        assert await store.reserve([check], 100 * OPG, f"m{i}", now=t0, hold_s=60) is None
        assert await store.commit([check], f"m{i}", 100 * OPG, entry("0xd1", 100 * OPG, f"m{i}", t0), now=t0)
    (usage,) = await store.usage(check, now=t0)
    assert usage.spent == 1000 * OPG and usage.remaining == 1
    assert await store.reserve([check], 2, "over", now=t0, hold_s=60) is not None
    assert await store.reserve([check], 1, "exact", now=t0, hold_s=60) is None


async def test_rate_limit_peek_does_not_consume_and_take_does(store: BudgetStore, t0: float) -> None:
    rate = RateLimit(per_minute=60, burst=2)
    scope = Scope("agent", "0xe1", NET, ASSET, "a:0xe1")
    for _ in range(5):
        assert (await store.rate_peek(scope, rate, now=t0)).allowed
    assert (await store.rate_take(scope, rate, now=t0)).allowed
    assert (await store.rate_take(scope, rate, now=t0)).allowed
    state = await store.rate_take(scope, rate, now=t0)
    assert not state.allowed and 0 < state.retry_after_s <= 1.0
    assert (await store.rate_take(scope, rate, now=t0 + 1)).allowed  # exactly one token back after 1 s


async def test_reserve_enforces_the_rate_limit_atomically(store: BudgetStore, t0: float) -> None:
    check = agent_check("0xe2", [Limit(period="day", amount=10**6)], t0, rate=RateLimit(per_minute=3))
    results = [await store.reserve([check], 1, f"q{i}", now=t0, hold_s=60) for i in range(5)]
    assert [r is None for r in results] == [True, True, True, False, False]
    assert results[3] is not None and results[3].reason == "rate_limited" and results[3].status == 429


async def test_two_hundred_concurrent_reserves_never_overspend(store: BudgetStore, t0: float) -> None:
    check = agent_check("0xf1", [Limit(period="day", amount=1000)], t0)
    results = await asyncio.gather(*(store.reserve([check], 7, f"c{i}", now=t0, hold_s=60) for i in range(200)))
    granted = sum(r is None for r in results)
    assert granted == 1000 // 7
    (usage,) = await store.usage(check, now=t0)
    assert usage.reserved == granted * 7 <= 1000


async def test_policies_round_trip(store: BudgetStore) -> None:
    agent = "0x" + "Ab" * 20
    policy = Policy(network=NET, asset=ASSET, limits=[Limit(period="day", amount=5 * OPG)], per_call_max=OPG // 5,
                    allowed_models=["gpt-4o"], rate_limit=RateLimit(per_minute=60, burst=10), group="team-1")
    await store.put_policy("agent", agent, policy)
    assert await store.get_policy("agent", agent.lower(), NET, ASSET.upper().replace("0X", "0x")) == policy
    assert any(kind == "agent" and pid == agent.lower() for kind, pid, _ in await store.list_policies())
    assert await store.delete_policy("agent", agent, NET, ASSET) is True
    assert await store.get_policy("agent", agent, NET, ASSET) is None


async def test_outstanding_holds_stay_exact_through_every_way_a_hold_ends(store: BudgetStore, t0: float) -> None:
    """Holds kept as a running total (not summed per reserve) must say exactly what a sum would:
    a seeded mix of reserves (the same id again replaces its hold), commits, releases, pins and
    expiries over one group of three agents, checked against a model after every step."""
    import random

    rnd = random.Random(1201)
    agents = ["0xb1", "0xb2", "0xb3"]
    big = [Limit(period="day", amount=10**30)]
    live: dict[str, tuple[str, int, float]] = {}  # id -> (agent, amount, expires)
    now = t0

    def checks(agent: str) -> list[Check]:
        return [agent_check(agent, big, now, group="team"), group_check("team", big, now)]

    for step in range(160):
        now += rnd.choice([0, 0, 1, 7, 31])
        for rid in [r for r, (_, _, exp) in live.items() if exp <= now]:
            del live[rid]
        op = rnd.random()
        if op < 0.5 or not live:
            agent = rnd.choice(agents)
            rid = rnd.choice([f"r{step}", *[r for r, (a, _, _) in live.items() if a == agent][:1]])
            amount, hold_s = rnd.randrange(1, 10**20), rnd.choice([5, 30, 600])
            assert await store.reserve(checks(agent), amount, rid, now=now, hold_s=hold_s) is None
            live[rid] = (agent, amount, now + hold_s)
        else:
            rid = rnd.choice(sorted(live))
            agent, amount, _ = live[rid]
            if op < 0.7:
                assert await store.commit(checks(agent), rid, amount, entry(agent, amount, rid, now), now=now)
                del live[rid]
            elif op < 0.85:
                await store.release(checks(agent), rid, now=now)
                del live[rid]
            elif await store.pin(checks(agent), rid, amount, now=now):
                live[rid] = (agent, amount, float("inf"))
        for agent in agents:
            (usage,) = await store.usage(checks(agent)[0], now=now)
            assert usage.reserved == sum(a for ag, a, _ in live.values() if ag == agent), (step, agent)
        (usage,) = await store.usage(checks(agents[0])[1], now=now)
        assert usage.reserved == sum(a for _, a, _ in live.values()), step


async def test_a_settlement_committed_before_and_after_a_group_move_counts_once(store: BudgetStore, t0: float) -> None:
    """An agent that joins a group moves to the group's hash tag on Redis: what was counted goes
    with its spend, so the same settlement committed again (recovery) after the move is not."""
    limits = [Limit(period="day", amount=100)]
    before = agent_check("0xb1", limits, t0)
    after = agent_check("0xb1", limits, t0, group="team-b1")
    assert await store.reserve([before], 10, "r", now=t0, hold_s=60) is None
    tx = "0x" + "b1" * 32
    assert await store.commit([before], "r", 10, entry("0xb1", 10, "r", t0), now=t0, once=tx)
    await store.move_spend(before.scope, after.scope, before.windows)
    assert not await store.commit([after], "r", 10, entry("0xb1", 10, "r", t0), now=t0, once=tx)
    (usage,) = await store.usage(after, now=t0)
    assert (usage.spent, usage.reserved) == (10, 0)
    assert len(await store.ledger(agent="0xb1", start=t0 - 60, end=t0 + 60, limit=10)) == 1
