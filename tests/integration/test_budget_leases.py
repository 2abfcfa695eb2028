"""Budget leases (budgets/leases.py) on a real Redis: one reserve for several calls, handed out from
memory, each call ended once in the store. Exactness is the point: replicas sharing a budget never
pass it and, calls being equal, use all of it; what a lease holds unused goes back; recovery on
another replica, a killed replica, a policy change and the rate bucket all come out exact."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from budgets.enforcer import BudgetEnforcer
from budgets.models import Hold, Limit, Policy, RateLimit, Refusal
from budgets.redis_store import RedisBudgetStore
from budgets.sqlite_store import SQLiteBudgetStore
from tests.integration.test_budget_enforcer import Clock, wallet

pytestmark = pytest.mark.integration

NET = "eip155:84532"
ASSET = "0x" + "33" * 20
CHAT = "POST /v1/chat/completions"
AMT = 1_000_000_000_000_000  # 0.001 of an 18-decimal token


@pytest.fixture
async def store(redis_server: Any) -> AsyncIterator[RedisBudgetStore]:
    s = RedisBudgetStore.from_url(redis_server.url, prefix=f"lease{uuid.uuid4().hex[:8]}:")
    yield s
    await s.close()


class Counted:
    """The store's reserve calls, counted."""

    def __init__(self, store: RedisBudgetStore) -> None:
        self.leases = self.reserves = 0
        real_lease = store.reserve_lease

        async def lease(*args: Any, **kwargs: Any) -> Any:
            self.leases += 1
            return await real_lease(*args, **kwargs)

        async def reserve(*args: Any, **kwargs: Any) -> Any:
            self.reserves += 1
            return await real_lease(*args, **kwargs, calls=1)

        store.reserve_lease = lease  # type: ignore[method-assign]
        store.reserve = reserve  # type: ignore[method-assign]


def enforcer(store: RedisBudgetStore, clock: Clock, *, calls: int = 4, lease_s: float = 30.0,
             hold_s: float = 600.0) -> BudgetEnforcer:
    return BudgetEnforcer(store, lease_calls=calls, lease_s=lease_s, hold_s=hold_s, clock=clock)


async def put(e: BudgetEnforcer, kind: str, owner: str, **fields: Any) -> None:
    await e.put_policy(kind, owner, Policy(network=NET, asset=ASSET, **fields))


async def reserve(e: BudgetEnforcer, agent: str, amount: int = AMT, *, rid: str | None = None) -> Hold | Refusal:
    try:
        return await e.reserve(agent, NET, ASSET, amount, CHAT, None, rid or f"r-{uuid.uuid4().hex}")
    except Refusal as refusal:
        return refusal


def granted(result: Hold | Refusal) -> Hold:
    assert isinstance(result, Hold), f"expected a hold, got {result!r}"
    return result


async def commit(e: BudgetEnforcer, hold: Hold, amount: int | None = None) -> bool:
    tx = "0x" + uuid.uuid4().hex * 2
    return await e.commit(hold, hold.amount if amount is None else amount, tx, hold.id, once=tx)


async def usage(e: BudgetEnforcer, agent: str) -> tuple[int, int]:
    """(spent today, reserved) of the agent's budget."""
    policy, group, _ = await e.policies_for(agent, NET, ASSET)
    check = e.checks(agent, policy, group, NET, ASSET, e.clock(), with_rate=False)[0]
    (u,) = await e.store.usage(check, now=e.clock())
    return u.spent, u.reserved


async def test_calls_out_of_a_lease_cost_one_reserve_per_lease_and_count_exactly(store: RedisBudgetStore) -> None:
    clock = Clock(1_900_000_000.0)
    e = enforcer(store, clock, calls=4)
    counted = Counted(store)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=1000 * AMT)])
    for _ in range(8):
        hold = granted(await reserve(e, agent))
        assert hold.lease
        assert await commit(e, hold)
    assert (counted.leases, counted.reserves) == (2, 0)
    spent, reserved = await usage(e, agent)
    assert (spent, reserved) == (8 * AMT, 0)  # the second lease is used up: nothing left held
    hold = granted(await reserve(e, agent))  # a third lease: 4 held, 1 in use
    assert await usage(e, agent) == (8 * AMT, 4 * AMT)
    await e.release(hold)
    assert await usage(e, agent) == (8 * AMT, 3 * AMT)
    await e.close()  # a replica shutting down gives back what its leases hold
    assert await usage(e, agent) == (8 * AMT, 0)
    ledger = await store.ledger(agent=agent, start=clock.t - 60, end=clock.t + 60, limit=100)
    assert [x.amount for x in ledger] == [AMT] * 8


async def test_two_replicas_sharing_a_budget_never_pass_it_and_use_all_of_it(store: RedisBudgetStore,
                                                                            redis_server: Any) -> None:
    """200 concurrent calls, 100 on each replica, for a budget of exactly 37 calls: 37 served."""
    clock = Clock(1_900_000_000.0)
    other = RedisBudgetStore.from_url(redis_server.url, prefix=store._p)
    a, b = enforcer(store, clock, calls=5), enforcer(other, clock, calls=5)
    agent = wallet()
    await put(a, "agent", agent, limits=[Limit(period="day", amount=37 * AMT)])

    async def call(e: BudgetEnforcer) -> bool:
        hold = await reserve(e, agent)
        if isinstance(hold, Refusal):
            assert hold.reason == "budget_exceeded", hold
            return False
        await asyncio.sleep(0.01)  # the upstream and the settlement
        assert await commit(e, hold)
        return True

    served = await asyncio.gather(*(call((a, b)[i % 2]) for i in range(200)))
    assert sum(served) == 37
    await a.close()
    await b.close()
    assert await usage(a, agent) == (37 * AMT, 0)
    ledger = await store.ledger(agent=agent, start=clock.t - 60, end=clock.t + 60, limit=100)
    assert sum(x.amount for x in ledger) == 37 * AMT and len(ledger) == 37
    await other.close()


async def test_a_lease_gives_back_its_room_before_a_call_that_does_not_fit_it_is_refused(
        store: RedisBudgetStore) -> None:
    clock = Clock(1_900_000_000.0)
    e = enforcer(store, clock, calls=4)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=10 * AMT)])
    first = granted(await reserve(e, agent))  # a lease of 4: 3 unused
    assert first.lease and await usage(e, agent) == (0, 4 * AMT)
    big = granted(await reserve(e, agent, 7 * AMT))  # 10 - 1 in use = 9 left: fits once the 3 go back
    assert not big.lease  # a lease of 28 does not fit: reserved on its own
    assert await usage(e, agent) == (0, 8 * AMT)
    assert isinstance(await reserve(e, agent, 3 * AMT), Refusal)
    await commit(e, first)
    await commit(e, big)
    await e.close()
    assert await usage(e, agent) == (8 * AMT, 0)


async def test_another_replica_ending_a_leased_call_counts_it_once(store: RedisBudgetStore, redis_server: Any) -> None:
    """Recovery: the replica that handed the call out was slow, and another one took its intent
    and committed it; then the first commits it too."""
    clock = Clock(1_900_000_000.0)
    other = RedisBudgetStore.from_url(redis_server.url, prefix=store._p)
    a, b = enforcer(store, clock), enforcer(other, clock)
    agent = wallet()
    await put(a, "agent", agent, limits=[Limit(period="day", amount=100 * AMT)])
    hold = granted(await reserve(a, agent))
    await b.pin(hold)  # recovery pins first: the call gets a hold of its own, pinned
    assert await usage(a, agent) == (0, 5 * AMT)
    tx = "0x" + "ab" * 32
    assert await b.commit(hold, AMT, tx, hold.id, once=tx)
    assert await usage(a, agent) == (AMT, 3 * AMT)  # the lease's other 3 calls
    assert await a.commit(hold, AMT, tx, hold.id, once=tx)
    assert await usage(a, agent) == (AMT, 3 * AMT)
    await a.close()
    assert await usage(a, agent) == (AMT, 0)
    ledger = await store.ledger(agent=agent, start=clock.t - 60, end=clock.t + 60, limit=10)
    assert [x.tx_hash for x in ledger] == [tx]
    await other.close()


async def test_a_killed_replica_s_lease_expires_and_recovery_still_counts_its_call(store: RedisBudgetStore,
                                                                                    redis_server: Any) -> None:
    clock = Clock(1_900_000_000.0)
    other = RedisBudgetStore.from_url(redis_server.url, prefix=store._p)
    a, b = enforcer(store, clock, hold_s=60), enforcer(other, clock, calls=0)
    agent = wallet()
    await put(b, "agent", agent, limits=[Limit(period="day", amount=4 * AMT)])
    hold = granted(await reserve(a, agent))  # the whole budget leased; then the replica is killed
    assert isinstance(await reserve(b, agent), Refusal)
    clock.t += 61
    assert await usage(b, agent) == (0, 0)
    tx = "0x" + "cd" * 32
    assert await b.commit(hold, AMT, tx, hold.id, once=tx)  # its intent, recovered
    assert await usage(b, agent) == (AMT, 0)
    for _ in range(3):
        granted(await reserve(b, agent))
    assert isinstance(await reserve(b, agent), Refusal)
    await other.close()


async def test_a_policy_change_stops_the_lease(store: RedisBudgetStore) -> None:
    clock = Clock(1_900_000_000.0)
    e = enforcer(store, clock, calls=4)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=100 * AMT)])
    hold = granted(await reserve(e, agent))
    await put(e, "agent", agent, limits=[Limit(period="day", amount=2 * AMT)])  # the operator lowers it
    assert isinstance(await reserve(e, agent), Hold)  # 2 fit: 1 in use, 1 more (reserved on its own)
    assert isinstance(await reserve(e, agent), Refusal)
    await commit(e, hold)
    await e.close()


async def test_rate_tokens_a_lease_did_not_use_go_back(store: RedisBudgetStore, redis_server: Any) -> None:
    clock = Clock(1_900_000_000.0)
    other = RedisBudgetStore.from_url(redis_server.url, prefix=store._p)
    a, b = enforcer(store, clock, calls=4), enforcer(other, clock, calls=0)
    agent = wallet()
    await put(a, "agent", agent, limits=[Limit(period="day", amount=100 * AMT)],
              rate_limit=RateLimit(per_minute=10, burst=10))
    hold = granted(await reserve(a, agent))  # 4 tokens taken
    assert hold.lease
    await commit(a, hold)
    await a.close()  # 3 go back
    for _ in range(9):
        granted(await reserve(b, agent))
    refusal = await reserve(b, agent)
    assert isinstance(refusal, Refusal) and refusal.reason == "rate_limited", refusal
    await other.close()


async def test_a_lease_lapses_after_lease_s_and_gives_back_its_room(store: RedisBudgetStore) -> None:
    clock = Clock(1_900_000_000.0)
    e = enforcer(store, clock, calls=4, lease_s=0.2)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=100 * AMT)])
    hold = granted(await reserve(e, agent))
    await asyncio.sleep(0.4)
    assert await usage(e, agent) == (0, AMT)  # the 3 unused went back; the open call keeps its own
    await commit(e, hold)
    await asyncio.sleep(0.05)
    assert await usage(e, agent) == (AMT, 0)


async def test_leases_need_a_store_that_can_lease(tmp_path: Any) -> None:
    store = SQLiteBudgetStore(str(tmp_path / "b.sqlite3"))
    with pytest.raises(ValueError, match="lease"):
        BudgetEnforcer(store, lease_calls=4)
    await store.close()


async def test_commits_and_releases_ended_together_count_exactly(store: RedisBudgetStore, redis_server: Any) -> None:
    """Three agents of one group on two replicas, calls of different sizes, some released: the
    calls ended while an END runs go together in the next (one hash tag), each lease shrunk and each
    scope counted once per batch; the totals are still exact, per agent and for the group."""
    clock = Clock(1_900_000_000.0)
    other = RedisBudgetStore.from_url(redis_server.url, prefix=store._p)
    a, b = enforcer(store, clock, calls=3), enforcer(other, clock, calls=3)
    team, agents = f"team-{uuid.uuid4().hex[:6]}", [wallet() for _ in range(3)]
    await put(a, "group", team, limits=[Limit(period="day", amount=60 * AMT)])
    for agent in agents:
        await put(a, "agent", agent, limits=[Limit(period="day", amount=30 * AMT)], group=team)
    ends: list[int] = []
    batches: list[int] = []
    real_end = store._end

    async def end(calls: list[Any]) -> list[int]:
        batches.append(len(calls))
        return await real_end(calls)

    store._end = end  # type: ignore[method-assign]

    async def call(i: int) -> None:
        e, agent = (a, b)[i % 2], agents[i % 3]
        amount = (1 + i % 4) * AMT // 2
        hold = await reserve(e, agent, amount)
        if isinstance(hold, Refusal):
            return
        await asyncio.sleep(0.001 * (i % 5))
        if i % 5 == 0:
            assert await e.release(hold)
        else:
            charged = amount - (AMT // 4 if i % 3 == 0 else 0)  # upto: less than reserved
            assert await commit(e, hold, charged)
            ends.append(charged)

    await asyncio.gather(*(call(i) for i in range(300)))
    await a.close()
    await b.close()
    assert max(batches) > 1  # calls did go together
    total = sum(ends)
    assert total <= 60 * AMT
    ledger = []
    for agent in agents:
        entries = await store.ledger(agent=agent, start=clock.t - 60, end=clock.t + 60, limit=1000)
        spent, reserved = await usage(a, agent)
        assert (spent, reserved) == (sum(x.amount for x in entries), 0)
        assert spent <= 30 * AMT
        ledger += entries
    assert sum(x.amount for x in ledger) == total and len(ledger) == len(ends)
    policy, group, _ = await a.policies_for(agents[0], NET, ASSET)
    check = a.checks(agents[0], policy, group, NET, ASSET, clock.t, with_rate=False)[1]
    (u,) = await store.usage(check, now=clock.t)
    assert (u.spent, u.reserved) == (total, 0)
    await other.close()


async def test_a_commit_whose_caller_went_away_still_ends_the_call_and_the_lease_retires(
        store: RedisBudgetStore) -> None:
    clock = Clock(1_900_000_000.0)
    e = enforcer(store, clock, calls=4)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=100 * AMT)])
    hold = granted(await reserve(e, agent))
    task = asyncio.ensure_future(commit(e, hold))
    await asyncio.sleep(0)  # the END is on its way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    await e.close()
    assert await usage(e, agent) == (AMT, 0)  # counted, and nothing left held by the lease
    assert e.leases is not None and not e.leases._by_id  # retired (its unused rate tokens went back)


# -- found by review: each fails on the first version of the batched END / leases -------------------


async def test_a_settlement_committed_in_a_batch_behind_another_agent_and_again_by_recovery_counts_once(
        store: RedisBudgetStore, redis_server: Any) -> None:
    """No leases: A's commit goes in an END whose first call is B's (one group, one hash tag); then
    recovery commits the same settlement alone. Its `done` key must be A's either way."""
    clock = Clock(1_900_000_000.0)
    other = RedisBudgetStore.from_url(redis_server.url, prefix=store._p)
    serving, recovery = enforcer(store, clock, calls=0), enforcer(other, clock, calls=0)
    team, a, b = f"team-{uuid.uuid4().hex[:6]}", wallet(), wallet()
    await put(serving, "group", team, limits=[Limit(period="day", amount=100 * AMT)])
    for w in (a, b):
        await put(serving, "agent", w, limits=[Limit(period="day", amount=100 * AMT)], group=team)
    ha, hb = granted(await reserve(serving, a)), granted(await reserve(serving, b))
    ta, tb = "0x" + "a1" * 32, "0x" + "b1" * 32
    assert await asyncio.gather(serving.commit(hb, AMT, tb, hb.id, once=tb),
                                serving.commit(ha, AMT, ta, ha.id, once=ta)) == [True, True]
    clock.t += 5
    await recovery.commit(ha, AMT, ta, ha.id, once=ta)
    ledger = await store.ledger(agent=a, start=clock.t - 60, end=clock.t + 60, limit=100)
    assert (await usage(serving, a), len(ledger)) == ((AMT, 0), 1)
    await other.close()


async def test_a_leased_call_ended_in_two_batches_shrinks_its_lease_once(store: RedisBudgetStore,
                                                                          redis_server: Any) -> None:
    clock = Clock(1_900_000_000.0)
    other = RedisBudgetStore.from_url(redis_server.url, prefix=store._p)
    serving, recovery = enforcer(store, clock, calls=4), enforcer(other, clock, calls=0)
    team, a, b = f"team-{uuid.uuid4().hex[:6]}", wallet(), wallet()
    await put(serving, "group", team, limits=[Limit(period="day", amount=100 * AMT)])
    await put(serving, "agent", a, limits=[Limit(period="day", amount=4 * AMT)], group=team)
    await put(serving, "agent", b, limits=[Limit(period="day", amount=100 * AMT)], group=team)
    holds = [granted(await reserve(serving, a)) for _ in range(4)]  # one lease of 4, all handed out
    assert {h.lease for h in holds} == {holds[0].lease}
    hb = granted(await reserve(serving, b))
    tb, t0 = "0x" + "b2" * 32, "0x" + "a2" * 32
    await asyncio.gather(serving.commit(hb, AMT, tb, hb.id, once=tb),
                         serving.commit(holds[0], AMT, t0, holds[0].id, once=t0))
    await recovery.commit(holds[0], AMT, t0, holds[0].id, once=t0)
    assert await usage(serving, a) == (AMT, 3 * AMT)  # the 3 calls in flight stay held
    await other.close()


async def test_a_call_ended_twice_on_one_replica_does_not_retire_its_lease_early(store: RedisBudgetStore) -> None:
    """The serving path's late commit and this replica's own recovery both end one call: the lease
    must still hold the other call in flight, so the limit holds when it is committed."""
    clock = Clock(1_900_000_000.0)
    e = enforcer(store, clock, calls=4, lease_s=2)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=4 * AMT)])
    h1, h2 = granted(await reserve(e, agent)), granted(await reserve(e, agent))
    assert h1.lease and h1.lease == h2.lease
    t1 = "0x" + "c1" * 32
    assert await e.commit(h1, AMT, t1, h1.id, once=t1)
    assert await e.commit(h1, AMT, t1, h1.id, once=t1)
    clock.t += 3  # the lease lapses
    for hold in [h for h in [await reserve(e, agent) for _ in range(3)] if isinstance(h, Hold)]:
        await commit(e, hold)
    await commit(e, h2)  # in flight all along
    await e.close()
    assert (await usage(e, agent))[0] <= 4 * AMT


async def test_a_lease_granted_to_a_caller_that_went_away_goes_back(store: RedisBudgetStore) -> None:
    clock = Clock(1_900_000_000.0)
    e = enforcer(store, clock, calls=10)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=10 * AMT)])
    real = store.reserve_lease

    async def slow(*args: Any, **kwargs: Any) -> Any:
        granted_ = asyncio.ensure_future(real(*args, **kwargs))  # it reaches Redis
        await asyncio.sleep(0.2)
        return await granted_

    store.reserve_lease = slow  # type: ignore[method-assign]
    task = asyncio.ensure_future(reserve(e, agent))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.3)
    store.reserve_lease = real  # type: ignore[method-assign]
    assert await usage(e, agent) == (0, 0)
    hold = granted(await reserve(e, agent))  # the whole budget is there again
    await e.release(hold)
    await e.close()
    assert await usage(e, agent) == (0, 0)


# -- found by the second review ----------------------------------------------------------------------


@pytest.mark.parametrize("calls", [0, 4], ids=["per-call", "leases"])
async def test_calls_sent_with_one_request_id_hold_the_budget_each(store: RedisBudgetStore, calls: int) -> None:
    """X-Request-Id comes from the client: two calls in flight with one must each hold their
    amount (a reserve of an id would replace the other's hold), and both end."""
    clock = Clock(1_900_000_000.0)
    e = enforcer(store, clock, calls=calls)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=(4 if calls else 1) * AMT)])
    holds = [await reserve(e, agent, rid="client-fixed-id-0001") for _ in range(5 if calls else 2)]
    assert [isinstance(h, Hold) for h in holds] == ([True] * 4 + [False] if calls else [True, False])
    for h in holds:
        if isinstance(h, Hold):
            await commit(e, h)
    await e.close()
    assert await usage(e, agent) == ((4 if calls else 1) * AMT, 0)


async def test_a_failed_renewal_is_not_retried_by_every_call_waiting_for_it(store: RedisBudgetStore) -> None:
    """The store is away: the calls of one agent that waited for a lease renewal do not each try
    one after it failed (each would wait out the store's timeout in turn)."""
    from budgets.store import BudgetStoreUnavailableError

    clock = Clock(1_900_000_000.0)
    e = enforcer(store, clock, calls=10)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=1000 * AMT)])
    await e.policies_for(agent, NET, ASSET)  # cached before the store goes away
    takes: list[int] = []

    async def away(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("calls", 1) > 1:
            takes.append(1)
        await asyncio.sleep(0.05)
        raise BudgetStoreUnavailableError("Timeout reading from socket")

    store.reserve_lease = away  # type: ignore[method-assign]
    results = await asyncio.gather(*(reserve(e, agent) for _ in range(20)))
    assert {r.reason for r in results if isinstance(r, Refusal)} == {"budget_store_unavailable"}
    assert len(takes) == 1


async def test_a_replica_closing_while_a_lease_is_taken_gives_it_back(store: RedisBudgetStore) -> None:
    """Shutdown: the call taking a lease is cancelled, then the enforcer closes: the lease the
    store granted meanwhile does not stay held until hold_s."""
    clock = Clock(1_900_000_000.0)
    e = enforcer(store, clock, calls=10)
    agent = wallet()
    await put(e, "agent", agent, limits=[Limit(period="day", amount=10 * AMT)])
    real = store.reserve_lease

    async def slow(*args: Any, **kwargs: Any) -> Any:
        granted_ = asyncio.ensure_future(real(*args, **kwargs))
        await asyncio.sleep(0.2)
        return await granted_

    store.reserve_lease = slow  # type: ignore[method-assign]
    task = asyncio.ensure_future(reserve(e, agent))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await e.close()
    assert await usage(e, agent) == (0, 0)
    assert isinstance(await reserve(e, agent), Hold) and e.leases is not None and not e.leases._by_id  # closed: no lease


async def test_two_replicas_with_a_round_trip_still_use_all_of_a_budget(store: RedisBudgetStore,
                                                                        redis_server: Any) -> None:
    """As the race of 37 above, with 2 ms added to every store call (a network between the
    replicas and Redis): calls waiting for their agent's renewal wait it out instead of falling
    back while a new lease goes unused (the first version served 27)."""
    clock = Clock(1_900_000_000.0)
    other = RedisBudgetStore.from_url(redis_server.url, prefix=store._p)
    for s in (store, other):
        for name in ("reserve_lease", "_end"):
            real = getattr(s, name)

            async def slowed(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                await asyncio.sleep(0.002)
                return await _real(*args, **kwargs)

            setattr(s, name, slowed)
    a, b = enforcer(store, clock, calls=5), enforcer(other, clock, calls=5)
    agent = wallet()
    await put(a, "agent", agent, limits=[Limit(period="day", amount=37 * AMT)])

    async def call(e: BudgetEnforcer) -> bool:
        hold = await reserve(e, agent)
        if isinstance(hold, Refusal):
            return False
        await asyncio.sleep(0.01)
        assert await commit(e, hold)
        return True

    served = await asyncio.gather(*(call((a, b)[i % 2]) for i in range(200)))
    await a.close()
    await b.close()
    assert sum(served) == 37 and await usage(a, agent) == (37 * AMT, 0)
    await other.close()


@pytest.mark.parametrize("calls", [0, 4], ids=["per-call", "leases"])
async def test_a_settlement_ended_before_and_after_its_agent_joins_a_group_counts_once(
        store: RedisBudgetStore, calls: int) -> None:
    """An agent's keys carry its group's hash tag: joining one moves its spend and holds, and the
    record of what was counted (`done:`) and of which leased calls ended (`out:`) must go with them,
    else recovery committing the same settlement after the move counts it again."""
    clock = Clock(1_900_000_000.0)
    e = enforcer(store, clock, calls=calls)
    agent, team = wallet(), f"team-{uuid.uuid4().hex[:6]}"
    await put(e, "group", team, limits=[Limit(period="day", amount=100 * AMT)])
    await put(e, "agent", agent, limits=[Limit(period="day", amount=10 * AMT)])
    hold, other = granted(await reserve(e, agent)), granted(await reserve(e, agent))
    tx = "0x" + "d1" * 32
    assert await e.commit(hold, AMT, tx, hold.id, once=tx)
    await put(e, "agent", agent, limits=[Limit(period="day", amount=10 * AMT)], group=team)  # joins the team
    assert await e.commit(hold, AMT, tx, hold.id, once=tx)  # recovery ends it again
    await commit(e, other)
    await e.close()
    spent, _ = await usage(e, agent)
    ledger = await store.ledger(agent=agent, start=clock.t - 60, end=clock.t + 60, limit=10)
    assert (spent, len(ledger)) == (2 * AMT, 2)
