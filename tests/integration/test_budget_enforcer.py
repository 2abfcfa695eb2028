"""BudgetEnforcer (budgets/enforcer.py) over both stores, with an injectable clock: which budgets
apply to a payer, calendar windows in a time zone (day, ISO week, month, DST days), rolling
windows, policy updates mid-window, groups, per-call/model/route rules, the default policy, the
pre-check, the store failing closed and reservations expiring.

The store-level atomic cases (reserve/commit/release arithmetic, 200 concurrent reserves, 18
decimals, rate buckets) are in tests/contract/test_budget_store.py; here everything goes through
the enforcer the gateway calls.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from budgets.enforcer import POLICY_CACHE_S, BudgetEnforcer
from budgets.models import BudgetUsage, DefaultPolicy, Hold, Limit, Policy, RateLimit, Refusal
from budgets.redis_store import RedisBudgetStore
from budgets.sqlite_store import SQLiteBudgetStore
from budgets.store import BudgetStore
from tests.conftest import TestClock

pytestmark = pytest.mark.integration

NET = "eip155:84532"
ASSET = "0x" + "22" * 20
CHAT = "POST /v1/chat/completions"
EMBED = "POST /v1/embeddings"
NY = ZoneInfo("America/New_York")


def ny(day: dt.date, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    """Unix time of a wall-clock moment in New York."""
    return dt.datetime.combine(day, dt.time(hour, minute, second), tzinfo=NY).timestamp()


def ny_day(t: float, days: int = 0) -> dt.date:
    """New York's date at unix time `t`, plus `days`."""
    return dt.datetime.fromtimestamp(t, NY).date() + dt.timedelta(days=days)


def next_ny_day_lasting(t: float, hours: int) -> dt.date:
    """The first New York day after `t` that lasts `hours` (23: spring forward, 25: fall back)."""
    day = ny_day(t, 1)
    while ny(day + dt.timedelta(days=1)) - ny(day) != hours * 3600:
        day += dt.timedelta(days=1)
        assert day < ny_day(t, 400), f"no {hours}-hour day within a year"
    return day


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def wallet() -> str:
    return "0x" + uuid.uuid4().hex + uuid.uuid4().hex[:8]


@pytest.fixture
def t0(clock: TestClock) -> float:
    """The test's start: now on the (possibly shifted) test clock; calendar positions are built from it."""
    return clock()


LEASED: set[int] = set()  # ids of the stores whose enforcers lease (budgets/leases.py)


@pytest.fixture(params=["sqlite", "redis", "redis-leases"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BudgetStore]:
    """"redis-leases": every case again with leases of 3 calls: the limits here are a few calls
    wide, so mostly a lease does not fit and calls go one by one; where one does, the answers
    must be the same."""
    if request.param == "sqlite":
        s: BudgetStore = SQLiteBudgetStore(str(tmp_path / "budgets.sqlite3"))
    else:
        server = request.getfixturevalue("redis_server")
        s = RedisBudgetStore.from_url(server.url, prefix=f"enf{uuid.uuid4().hex[:8]}:")
    if request.param == "redis-leases":
        LEASED.add(id(s))
    yield s
    LEASED.discard(id(s))
    await s.close()


def enforcer(store: BudgetStore, clock: Clock, *, tz: str = "UTC", hold_s: float = 600.0,
             defaults: dict[tuple[str, str], DefaultPolicy] | None = None) -> BudgetEnforcer:
    return BudgetEnforcer(store, defaults=defaults, timezone=tz, hold_s=hold_s, clock=clock,
                          lease_calls=3 if id(store) in LEASED else 0)


async def put(e: BudgetEnforcer, kind: str, owner: str, **fields: object) -> Policy:
    policy = Policy(network=NET, asset=ASSET, **fields)
    await e.put_policy(kind, owner, policy)  # as the admin API does (it also drops the 1 s policy cache)
    return policy


async def reserve(e: BudgetEnforcer, agent: str, amount: int, *, route: str = CHAT,
                  model: str | None = "gpt-4o") -> Hold | Refusal:
    try:
        return await e.reserve(agent, NET, ASSET, amount, route, model, f"r-{uuid.uuid4().hex}")
    except Refusal as refusal:
        return refusal


async def precheck(e: BudgetEnforcer, agent: str, *, route: str = CHAT, model: str | None = "gpt-4o") -> Refusal | None:
    try:
        await e.precheck(agent, NET, ASSET, route, model)
    except Refusal as refusal:
        return refusal
    return None


async def spend(e: BudgetEnforcer, agent: str, amount: int, **kw: object) -> Hold:
    hold = await reserve(e, agent, amount, **kw)  # type: ignore[arg-type]
    assert isinstance(hold, Hold), hold
    await e.commit(hold, amount, "0x" + "ab" * 32, hold.id)
    return hold


async def usage(e: BudgetEnforcer, agent: str) -> list[BudgetUsage]:
    policy, group, _ = await e.policies_for(agent, NET, ASSET)
    check = e.checks(agent, policy, group, NET, ASSET, e.clock(), with_rate=False)[0]
    return await e.store.usage(check, now=e.clock())


def refused(result: Hold | Refusal | None, reason: str, status: int = 402) -> Refusal:
    assert isinstance(result, Refusal), f"expected a {reason} refusal, got {result!r}"
    assert (result.reason, result.status) == (reason, status), result
    return result


def granted(result: Hold | Refusal) -> Hold:
    assert isinstance(result, Hold), f"expected a hold, got {result!r}"
    return result


# -- calendar windows in a time zone ------------------------------------------------------------


async def test_daily_budget_resets_at_local_midnight_not_utc(store: BudgetStore, t0: float) -> None:
    day = ny_day(t0, 1)  # tomorrow in New York
    next_day = day + dt.timedelta(days=1)
    utc_midnight = dt.datetime.combine(next_day, dt.time(0), tzinfo=dt.UTC).timestamp()  # 19:00 or 20:00 local
    assert ny_day(utc_midnight) == day
    clock = Clock(utc_midnight - 30)
    e = enforcer(store, clock, tz="America/New_York")
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=100)])

    await spend(e, agent, 40)
    clock.t = utc_midnight + 30  # UTC's day is over, New York's is not
    r = refused(await reserve(e, agent, 61), "budget_exceeded")
    assert r.remaining == 60

    clock.t = ny(day, 23, 59, 0)  # 23:59 local: still the same day
    await spend(e, agent, 60)
    clock.t = ny(day, 23, 59, 59)
    r = refused(await reserve(e, agent, 1), "budget_exceeded")
    assert r.remaining == 0
    assert r.resets_at == ny(next_day)
    (u,) = await usage(e, agent)
    assert (u.spent, u.reserved, u.remaining, u.resets_at) == (100, 0, 0, ny(next_day))

    clock.t = ny(next_day)  # local midnight: whole again
    (u,) = await usage(e, agent)
    assert (u.spent, u.remaining) == (0, 100)
    granted(await reserve(e, agent, 100))


async def test_weekly_budget_is_the_iso_week_in_local_time_across_a_dst_change(store: BudgetStore, t0: float) -> None:
    # The next week in which New York falls back (on its Sunday): a 169-hour week.
    fall_back = next_ny_day_lasting(t0, 25)
    monday = fall_back - dt.timedelta(days=fall_back.weekday())
    sunday, next_monday = monday + dt.timedelta(days=6), monday + dt.timedelta(days=7)
    assert ny(next_monday) - ny(monday) == 169 * 3600
    clock = Clock(ny(monday))
    e = enforcer(store, clock, tz="America/New_York")
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="week", amount=100)])

    await spend(e, agent, 50)  # Monday 00:00, the first second of the week
    clock.t = ny(sunday, 23, 59, 0)  # Sunday 23:59, 168 h 59 min later
    await spend(e, agent, 50)
    clock.t = ny(sunday, 23, 59, 59)
    r = refused(await reserve(e, agent, 1), "budget_exceeded")
    assert r.resets_at == ny(next_monday)

    clock.t = ny(next_monday)  # Monday 00:00 local
    granted(await reserve(e, agent, 100))


async def test_monthly_budget_resets_on_the_first_at_local_midnight(store: BudgetStore, t0: float) -> None:
    today = ny_day(t0)
    year = today.year if today.month < 2 else today.year + 1  # the next February (28 or 29 days)
    first, march = dt.date(year, 2, 1), dt.date(year, 3, 1)
    last = march - dt.timedelta(days=1)
    clock = Clock(ny(first))
    e = enforcer(store, clock, tz="America/New_York")
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="month", amount=100)])

    await spend(e, agent, 30)  # the first second of February
    clock.t = ny(last, 19, 30, 0)  # already March 1st in UTC, still February in New York
    assert dt.datetime.fromtimestamp(clock.t, dt.UTC).date() == march
    assert refused(await reserve(e, agent, 71), "budget_exceeded").remaining == 70
    clock.t = ny(last, 23, 59, 0)
    await spend(e, agent, 70)
    clock.t = ny(last, 23, 59, 59)
    r = refused(await reserve(e, agent, 1), "budget_exceeded")
    assert r.resets_at == ny(march)

    clock.t = ny(march)
    granted(await reserve(e, agent, 100))


@pytest.mark.parametrize("hours", [23, 25], ids=["spring-forward-23h", "fall-back-25h"])
async def test_daily_budget_on_a_dst_day_resets_at_local_midnight(store: BudgetStore, t0: float, hours: int) -> None:
    day = next_ny_day_lasting(t0, hours)
    clock = Clock(ny(day))
    e = enforcer(store, clock, tz="America/New_York")
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=100)])
    next_midnight = ny(day + dt.timedelta(days=1))
    assert next_midnight - clock.t == hours * 3600

    await spend(e, agent, 100)  # the first second of the day
    clock.t = ny(day, 23, 59, 59)  # 22:59:59 or 24:59:59 of elapsed time
    r = refused(await reserve(e, agent, 1), "budget_exceeded")
    assert r.resets_at == next_midnight

    clock.t = next_midnight
    granted(await reserve(e, agent, 100))


# -- rolling windows ------------------------------------------------------------------------------


async def test_rolling_hour_counts_spend_for_the_hour_then_frees_it(store: BudgetStore, t0: float) -> None:
    t0 = t0 // 60 * 60 + 20  # 20 s into a one-minute bucket
    clock = Clock(t0)
    e = enforcer(store, clock)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="hour", amount=100, rolling=True)])

    await spend(e, agent, 100)
    clock.t = t0 + 59 * 60  # 59 minutes later: still inside the rolling hour
    r = refused(await reserve(e, agent, 1), "budget_exceeded")
    assert r.remaining == 0
    (u,) = await usage(e, agent)
    assert u.rolling and u.spent == 100

    clock.t = t0 + 3600 + 60  # past the hour plus one bucket
    (u,) = await usage(e, agent)
    assert u.spent == 0
    granted(await reserve(e, agent, 100))


async def test_rolling_hour_never_forgives_spend_younger_than_an_hour(store: BudgetStore, t0: float) -> None:
    t0 = t0 // 60 * 60 + 50  # 50 s into a one-minute bucket
    clock = Clock(t0)
    e = enforcer(store, clock)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="hour", amount=100, rolling=True)])

    await spend(e, agent, 100)
    clock.t = t0 + 3599  # 59:59 later the spend is still inside the last hour
    refused(await reserve(e, agent, 100), "budget_exceeded")


# -- policy updates mid-window --------------------------------------------------------------------


async def test_changing_a_limit_mid_window_neither_forgives_nor_double_counts(store: BudgetStore, t0: float) -> None:
    clock = Clock(ny(ny_day(t0, 1), 12))  # noon tomorrow in New York
    e = enforcer(store, clock, tz="America/New_York")
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=100)])
    await spend(e, agent, 60)

    await put(e, "agent", agent, limits=[Limit(period="day", amount=80)])
    (u,) = await usage(e, agent)
    assert (u.limit, u.spent, u.remaining) == (80, 60, 20)
    assert refused(await reserve(e, agent, 21), "budget_exceeded").remaining == 20
    hold = granted(await reserve(e, agent, 20))
    await e.release(hold)

    await put(e, "agent", agent, limits=[Limit(period="day", amount=200)])
    (u,) = await usage(e, agent)
    assert (u.limit, u.spent, u.reserved, u.remaining) == (200, 60, 0, 140)
    assert refused(await reserve(e, agent, 141), "budget_exceeded").remaining == 140
    await spend(e, agent, 140)
    (u,) = await usage(e, agent)
    assert (u.spent, u.remaining) == (200, 0)


async def test_a_policy_change_reaches_the_hot_path_within_the_cache_time(store: BudgetStore) -> None:
    clock = Clock(time.time())  # run once, on the real clock: it sleeps, and the cache reads time.monotonic()
    e = enforcer(store, clock)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=100)])
    await spend(e, agent, 60)
    # another replica (or the admin API) lowers the limit; this enforcer is not told
    await store.put_policy("agent", agent, Policy(network=NET, asset=ASSET, limits=[Limit(period="day", amount=70)]))
    await asyncio.sleep(POLICY_CACHE_S + 0.05)
    assert refused(await reserve(e, agent, 11), "budget_exceeded").remaining == 10


async def test_adding_a_window_mid_day_counts_what_was_already_spent_today(store: BudgetStore, t0: float) -> None:
    clock = Clock(ny(ny_day(t0, 1), 12))  # noon tomorrow in New York
    e = enforcer(store, clock, tz="America/New_York")
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="week", amount=1000)])
    await spend(e, agent, 60)
    await put(e, "agent", agent, limits=[Limit(period="week", amount=1000), Limit(period="day", amount=100)])
    assert refused(await reserve(e, agent, 41), "budget_exceeded").remaining == 40


async def test_moving_an_agent_into_a_group_keeps_its_own_spend(store: BudgetStore, t0: float,
                                                                request: pytest.FixtureRequest) -> None:
    clock = Clock(t0)
    e = enforcer(store, clock)
    agent, team = wallet(), f"team-{uuid.uuid4().hex[:6]}"
    await put(e, "agent", agent, limits=[Limit(period="day", amount=100)])
    await spend(e, agent, 60)
    await put(e, "group", team, limits=[Limit(period="day", amount=1000)])
    await put(e, "agent", agent, limits=[Limit(period="day", amount=100)], group=team)
    assert refused(await reserve(e, agent, 41), "budget_exceeded").remaining == 40


# -- groups -----------------------------------------------------------------------------------


async def test_a_group_budget_binds_its_agents_together_and_its_suspension_stops_both(store: BudgetStore,
                                                                                      t0: float) -> None:
    clock = Clock(t0)
    e = enforcer(store, clock)
    a, b, team = wallet(), wallet(), f"team-{uuid.uuid4().hex[:6]}"
    await put(e, "group", team, limits=[Limit(period="day", amount=100)])
    await put(e, "agent", a, limits=[Limit(period="day", amount=80)], group=team)
    await put(e, "agent", b, limits=[Limit(period="day", amount=80)], group=team)

    await spend(e, a, 70)
    r = refused(await reserve(e, b, 40), "budget_exceeded")  # b's own budget has 80 left, the team 30
    assert r.scope == f"group:{team}:{NET}:{ASSET}" and r.remaining == 30
    assert refused(await reserve(e, a, 11), "budget_exceeded").scope == f"agent:{a}:{NET}:{ASSET}"
    hold = granted(await reserve(e, b, 30))
    (u,) = await usage(e, b)
    assert (u.spent, u.reserved) == (0, 30)  # b's own budget holds what it reserved
    await e.commit(hold, 30, "0x" + "cd" * 32, hold.id)
    assert refused(await reserve(e, a, 1), "budget_exceeded").scope.startswith("group:")

    await put(e, "group", team, limits=[Limit(period="day", amount=10_000)], suspended=True)
    for agent in (a, b):
        assert "group" in refused(await precheck(e, agent), "agent_suspended").message
        refused(await reserve(e, agent, 1), "agent_suspended")
    await put(e, "group", team, limits=[Limit(period="day", amount=10_000)])
    granted(await reserve(e, a, 10))


# -- per-call, model and route rules; the default policy --------------------------------------


async def test_per_call_max_allowed_models_and_routes_are_refused_by_name(store: BudgetStore, t0: float) -> None:
    clock = Clock(t0)
    e = enforcer(store, clock)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=1000)], per_call_max=50,
              allowed_models=["gpt-4o"], allowed_routes=[CHAT])

    r = refused(await reserve(e, agent, 51), "per_call_limit")
    assert r.remaining == 50
    granted(await reserve(e, agent, 50))
    refused(await reserve(e, agent, 10, model="gpt-4o-mini"), "model_not_allowed")
    refused(await reserve(e, agent, 10, model=None), "model_not_allowed")
    refused(await precheck(e, agent, model="gpt-4o-mini"), "model_not_allowed")
    refused(await reserve(e, agent, 10, route=EMBED), "route_not_allowed")
    refused(await precheck(e, agent, route=EMBED), "route_not_allowed")
    assert await precheck(e, agent) is None
    (u,) = await usage(e, agent)
    assert u.reserved == (150 if e.leases else 50)  # the refusals held nothing (a lease holds 3 calls)


async def test_a_group_per_call_max_applies_to_its_agents(store: BudgetStore, t0: float) -> None:
    clock = Clock(t0)
    e = enforcer(store, clock)
    agent, team = wallet(), f"team-{uuid.uuid4().hex[:6]}"
    await put(e, "group", team, per_call_max=20, allowed_models=["gpt-4o"])
    await put(e, "agent", agent, limits=[Limit(period="day", amount=1000)], group=team)
    assert refused(await reserve(e, agent, 21), "per_call_limit").remaining == 20
    refused(await reserve(e, agent, 5, model="other"), "model_not_allowed")
    granted(await reserve(e, agent, 20))


async def test_default_deny_refuses_unlisted_wallets(store: BudgetStore, t0: float) -> None:
    clock = Clock(t0)
    e = enforcer(store, clock, defaults={(NET, ASSET): DefaultPolicy(mode="deny")})
    listed, stranger = wallet(), wallet()
    await put(e, "agent", listed, limits=[Limit(period="day", amount=100)])

    refused(await precheck(e, stranger), "agent_not_allowed")
    refused(await reserve(e, stranger, 1), "agent_not_allowed")
    assert await precheck(e, listed) is None
    granted(await reserve(e, listed, 1))
    # an asset without any default is not open either
    with pytest.raises(Refusal) as exc:
        await e.reserve(stranger, NET, "0x" + "33" * 20, 1, CHAT, "gpt-4o", "r-other-asset")
    assert exc.value.reason == "agent_not_allowed"


async def test_the_default_budget_applies_to_each_unlisted_wallet(store: BudgetStore, t0: float) -> None:
    clock = Clock(t0)
    default = Policy(network=NET, asset=ASSET, limits=[Limit(period="day", amount=100)], per_call_max=60)
    e = enforcer(store, clock, defaults={(NET, ASSET.upper().replace("0X", "0x")): DefaultPolicy(policy=default)})
    one, two = wallet(), wallet()

    assert await precheck(e, one) is None
    refused(await reserve(e, one, 61), "per_call_limit")
    await spend(e, one, 60)
    assert refused(await reserve(e, one, 41), "budget_exceeded").remaining == 40
    await spend(e, one, 40)
    refused(await reserve(e, one, 1), "budget_exceeded")
    await spend(e, two, 60)  # each unlisted wallet has a budget of its own
    (u,) = await usage(e, two)
    assert (u.limit, u.spent, u.remaining) == (100, 60, 40)

    clock.t += 86400
    await spend(e, one, 60)


# -- the pre-check ----------------------------------------------------------------------------


async def test_precheck_refuses_a_suspended_agent(store: BudgetStore, t0: float) -> None:
    clock = Clock(t0)
    e = enforcer(store, clock)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=100)], suspended=True)
    refused(await precheck(e, agent), "agent_suspended")
    refused(await reserve(e, agent, 1), "agent_suspended")
    await put(e, "agent", agent, limits=[Limit(period="day", amount=100)])
    assert await precheck(e, agent) is None
    assert await precheck(e, "") is None  # no claimed payer: nothing to shed before verification


async def test_precheck_peeks_at_the_rate_limit_and_reserve_consumes_it(store: BudgetStore, t0: float) -> None:
    clock = Clock(t0)
    e = enforcer(store, clock)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=1000)], rate_limit=RateLimit(per_minute=2))

    for _ in range(10):
        assert await precheck(e, agent) is None  # peeking consumes nothing
    granted(await reserve(e, agent, 1))
    assert await precheck(e, agent) is None
    granted(await reserve(e, agent, 1))
    r = refused(await precheck(e, agent), "rate_limited", 429)
    assert r.retry_after_s is not None and 1 <= r.retry_after_s <= 30
    r = refused(await reserve(e, agent, 1), "rate_limited", 429)
    assert r.retry_after_s is not None and r.resets_at == clock.t + r.retry_after_s
    (u,) = await usage(e, agent)
    assert u.reserved == 2  # a rate refusal holds no money

    clock.t += 30  # per_minute=2: one call back every 30 s
    assert await precheck(e, agent) is None
    granted(await reserve(e, agent, 1))
    refused(await reserve(e, agent, 1), "rate_limited", 429)


async def test_a_group_rate_limit_is_shared(store: BudgetStore, t0: float) -> None:
    clock = Clock(t0)
    e = enforcer(store, clock)
    a, b, team = wallet(), wallet(), f"team-{uuid.uuid4().hex[:6]}"
    await put(e, "group", team, rate_limit=RateLimit(per_minute=2))
    for agent in (a, b):
        await put(e, "agent", agent, limits=[Limit(period="day", amount=1000)], group=team)
    granted(await reserve(e, a, 1))
    granted(await reserve(e, b, 1))
    refused(await precheck(e, a), "rate_limited", 429)
    refused(await reserve(e, b, 1), "rate_limited", 429)


# -- failing closed and expiring holds ------------------------------------------------------------


async def test_an_unreachable_store_refuses_with_503() -> None:
    from tests.conftest import _port

    store = RedisBudgetStore.from_url(f"redis://127.0.0.1:{_port()}/0", prefix="closed:")  # nothing listens there
    clock = Clock(time.time())
    e = enforcer(store, clock, defaults={(NET, ASSET): DefaultPolicy(policy=Policy(network=NET, asset=ASSET))})
    agent = wallet()
    try:
        started = time.monotonic()
        r = refused(await precheck(e, agent), "budget_store_unavailable", 503)
        assert r.retry_after_s and "nothing was charged" in r.message
        refused(await reserve(e, agent, 1), "budget_store_unavailable", 503)
        await e.release(Hold("h", agent, NET, ASSET, 1, CHAT, None))  # a release that cannot reach it is a no-op
        assert time.monotonic() - started < 10
    finally:
        await store.close()


async def test_a_hold_never_committed_expires_and_frees_the_budget(store: BudgetStore, t0: float) -> None:
    """The replica that reserved was killed: no commit, no release ever comes."""
    clock = Clock(t0)
    e = enforcer(store, clock, hold_s=1)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=100)])

    granted(await reserve(e, agent, 100))
    clock.t = t0 + 0.5
    assert refused(await reserve(e, agent, 1), "budget_exceeded").remaining == 0
    (u,) = await usage(e, agent)
    assert (u.spent, u.reserved) == (0, 100)

    clock.t = t0 + 1.01
    (u,) = await usage(e, agent)
    assert (u.spent, u.reserved, u.remaining) == (0, 0, 100)
    hold = granted(await reserve(e, agent, 100))
    await e.commit(hold, 100, "0x" + "ef" * 32, hold.id)
    (u,) = await usage(e, agent)
    assert (u.spent, u.reserved, u.remaining) == (100, 0, 0)


async def test_release_frees_and_commit_counts_what_was_charged(store: BudgetStore, t0: float) -> None:
    """A reservation larger than the final charge (the `upto` shape): commit counts the charge."""
    clock = Clock(t0)
    e = enforcer(store, clock)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=100)])
    hold = granted(await reserve(e, agent, 70))
    refused(await reserve(e, agent, 31), "budget_exceeded")
    await e.release(hold)
    hold = granted(await reserve(e, agent, 100))
    await e.commit(hold, 25, "0x" + "12" * 32, hold.id)
    await e.commit(hold, 25, "0x" + "12" * 32, hold.id)  # a repeated commit counts once
    (u,) = await usage(e, agent)
    assert (u.spent, u.reserved, u.remaining) == (25, 0, 75)
    entries = await store.ledger(agent=agent, start=t0 - 60, end=t0 + 60, limit=10)
    assert [(x.amount, x.request_id) for x in entries] == [(25, hold.id)]


async def test_leaving_a_group_keeps_the_agent_s_spend_and_holds(store: BudgetStore, t0: float) -> None:
    clock = Clock(t0)
    e = enforcer(store, clock)
    agent, team = wallet(), f"team-{uuid.uuid4().hex[:6]}"
    await put(e, "group", team, limits=[Limit(period="day", amount=1000)])
    await put(e, "agent", agent, limits=[Limit(period="day", amount=100), Limit(period="hour", amount=100, rolling=True)],
              group=team)
    await spend(e, agent, 50)
    granted(await reserve(e, agent, 20))  # a call in flight while the operator changes the policy
    await put(e, "agent", agent, limits=[Limit(period="day", amount=100), Limit(period="hour", amount=100, rolling=True)])
    assert refused(await reserve(e, agent, 31), "budget_exceeded").remaining == 30


# -- pinning a hold before settlement ------------------------------------------------------------


async def test_a_hold_that_outlives_the_settlement_is_not_pinned_and_one_that_may_not_is(store: BudgetStore,
                                                                                        t0: float) -> None:
    """pin(within_s): the usual paid call (settled within the intent's lease, far inside hold_s)
    makes no round trip and the hold keeps its expiry; a hold too close to its expiry for the
    promise, or a pin without one (recovery's), is pinned: it never expires on its own."""
    clock = Clock(t0)
    e = enforcer(store, clock, hold_s=600)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=1000)])
    calls: list[str] = []
    real_pin = store.pin

    async def counted_pin(*args: object, **kwargs: object) -> bool:
        calls.append("pin")
        return await real_pin(*args, **kwargs)  # type: ignore[arg-type]

    store.pin = counted_pin  # type: ignore[method-assign]
    quick = granted(await reserve(e, agent, 100))
    clock.t = t0 + 30
    await e.pin(quick, within_s=60)
    assert calls == []  # no round trip
    late = granted(await reserve(e, agent, 200))
    clock.t = t0 + 30 + 600 - 90  # 90 s of this hold's life left: less than 60 s + the margin
    await e.pin(late, within_s=60)
    # out of a lease (which has no hold of its own to pin): a first pin finds none, then one is reserved and pinned
    first = 2 if late.lease else 1
    assert calls == ["pin"] * first
    clock.t = t0 + 30 + 600 + 1
    (u,) = await usage(e, agent)
    assert u.reserved == 200  # the unpinned one (or the lease) expired; the pinned one never does
    await e.pin(late)
    assert calls == ["pin"] * (first + 1)  # without a promise (recovery): always pinned
