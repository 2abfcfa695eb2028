"""Budgets in the running gateway: real gateway processes (each with its facilitator in-process),
a real Redis shared by replicas, the stand-in upstream and money moving on the dev chain.

- the race: two replicas, one agent, 200 concurrent paid calls, a budget of exactly 37;
- failure paths release their reservation: upstream 5xx, a definitive settle failure, the client
  going away, a replica killed mid-call (its hold expires);
- Redis stopped under load: 503s, nothing forwarded unpaid, service back when Redis is (on a
  redis-server of its own); two deterministic cases around the outage are strict xfails: they
  show bugs (see their reasons).

Every test uses a fresh agent (a key derived from a fixed seed, funded here) and a fresh payee,
so balances start from known values and nothing else pays the same addresses.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from tests.budget_helpers import (
    CHAT,
    CHAT_PRICE_OPG,
    Admin,
    Reply,
    approve_permit2,
    chat_count,
    derived,
    fund,
    gateway_config,
    gateway_env,
    opg_balance,
    opg_policy,
    opg_requirement,
    post,
    receipt_statuses,
    set_hostile_mode,
    sign_payments,
    unique_prefix,
)

pytestmark = pytest.mark.e2e

PRICE = CHAT_PRICE_OPG


def budgets_section(store_url: str, prefix: str, policies: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"store_url": store_url, "store_prefix": f"{prefix}b:", "timezone": "UTC", "default": "deny",
            "policies": policies, **extra}


def served(reply: Reply) -> bool:
    settle = reply.settle
    return reply.status == 200 and settle is not None and settle.success and bool(settle.transaction)


# -- the race -------------------------------------------------------------------------------------


@pytest.mark.parametrize("lease_calls", [0, 8], ids=["per-call", "leases"])
async def test_two_replicas_200_concurrent_calls_a_budget_of_exactly_37(
        devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
        tmp_path: Path, lease_calls: int) -> None:
    """Also with budget leases (budgets/leases.py): each replica hands calls out of leases of 8,
    the last 5 calls' worth goes one by one; still exactly 37, and nothing left reserved."""
    label = "race" if not lease_calls else "race-leases"
    agent, payee = derived(f"{label}-agent"), derived(f"{label}-payee").address
    fund(devchain, agent)
    upstream = spawn_upstream()
    prefix = unique_prefix(label)
    config = gateway_config(tmp_path / "gateway.json", devchain, devchain_file, upstream.url, redis_server.url,
                            pay_to=payee, budgets=budgets_section(redis_server.url, prefix,
                                                                  [opg_policy(devchain, agent.address, 37 * PRICE)],
                                                                  lease_calls=lease_calls))
    g1 = spawn_gateway(upstream.url, redis_server.url, config=config, env=gateway_env(devchain, 0, prefix))
    g2 = spawn_gateway(upstream.url, redis_server.url, config=config, env=gateway_env(devchain, 1, prefix))

    requirement = await opg_requirement(g1.url + CHAT, devchain)
    assert int(requirement["amount"]) == PRICE and requirement["payTo"].lower() == payee.lower()
    started = time.perf_counter()
    payments = await sign_payments(agent, requirement, 200, g1.url + CHAT)
    sign_s = time.perf_counter() - started
    payer_before, payee_before = opg_balance(devchain, agent.address), opg_balance(devchain, payee)
    upstream_before = chat_count(upstream)

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=90)) as http:
        replies = await asyncio.gather(*(post(http, (g1, g2)[i % 2].url + CHAT, payment=p)
                                         for i, p in enumerate(payments)))
    burst_s = time.perf_counter() - started
    print(f"\nrace: signed 200 payments in {sign_s:.2f}s; 200 concurrent calls answered in {burst_s:.2f}s")

    ok = [r for r in replies if served(r)]
    refused = [r for r in replies if r.status == 402 and r.error == "budget_exceeded"]
    others = [r for r in replies if r not in ok and r not in refused]
    assert (len(ok), len(refused), others) == (37, 163, [])
    assert all(r.json()["choices"][0]["message"]["content"] == "Echo: budgeted call" for r in ok)
    assert {r.settle.payer.lower() for r in ok} == {agent.address.lower()}  # type: ignore[union-attr]
    for r in refused:
        doc = r.json()
        assert doc["remaining"] == "0" and doc["resets_at"].endswith("T00:00:00Z"), doc
        assert doc["budget"] == f"agent:{agent.address.lower()}:{devchain['network']}:{requirement['asset'].lower()}"
    served_by = [sum(1 for i, r in enumerate(replies) if served(r) and i % 2 == k) for k in (0, 1)]
    print(f"race: served by replica 1: {served_by[0]}, by replica 2: {served_by[1]}")

    txs = sorted(r.settle.transaction for r in ok)  # type: ignore[union-attr]
    assert len(set(txs)) == 37 and receipt_statuses(devchain, txs) == [1] * 37
    admin1, admin2 = Admin(g1.url), Admin(g2.url)
    ledger = await admin1.ledger(agent.address)
    assert len(ledger) == 37 and sum(int(e["amount"]) for e in ledger) == 37 * PRICE
    assert sorted(e["tx_hash"] for e in ledger) == txs
    assert await admin2.ledger(agent.address) == ledger  # either replica's admin API, one ledger
    usage = await admin2.usage(agent.address)
    assert (usage["spent"], usage["reserved"], usage["remaining"], usage["limit"]) == (37 * PRICE, 0, 0, 37 * PRICE)
    assert opg_balance(devchain, payee) - payee_before == 37 * PRICE
    assert payer_before - opg_balance(devchain, agent.address) == 37 * PRICE
    assert chat_count(upstream) - upstream_before == 37  # the refused 163 never reached the provider


# -- failure paths release their reservation ---------------------------------------------------------


@dataclass
class Single:
    agent: Any
    payee: str
    upstream: Any
    gateway: Any
    admin: Admin
    url: str


@pytest.fixture
def single(devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
           tmp_path: Path, request: pytest.FixtureRequest) -> Single:
    """One gateway (budgets, records and settlements on Redis) and a fresh agent with a budget of 10 calls."""
    label = request.node.name.removeprefix("test_")[:40]
    agent, payee = derived(f"{label}-agent"), derived(f"{label}-payee").address
    fund(devchain, agent)
    upstream = spawn_upstream()
    prefix = unique_prefix(label[:12])
    config = gateway_config(tmp_path / "gateway.json", devchain, devchain_file, upstream.url, redis_server.url,
                            pay_to=payee, budgets=budgets_section(redis_server.url, prefix,
                                                                  [opg_policy(devchain, agent.address, 10 * PRICE)]))
    gateway = spawn_gateway(upstream.url, redis_server.url, config=config, env=gateway_env(devchain, 2, prefix))
    return Single(agent, payee, upstream, gateway, Admin(gateway.url), gateway.url + CHAT)


async def charged(devchain: dict, s: Single, payer_before: int) -> tuple[int, int, int, int]:
    """(paid on-chain by the agent, budget spent, budget reserved, ledger total)."""
    u = await s.admin.usage(s.agent.address)
    ledger = await s.admin.ledger(s.agent.address)
    return (payer_before - opg_balance(devchain, s.agent.address), u["spent"], u["reserved"],
            sum(int(e["amount"]) for e in ledger))


async def test_two_calls_sent_with_one_request_id_cannot_share_a_budget_hold(devchain: dict,
                                                                            single: Single) -> None:
    """X-Request-Id is the client's: two paid calls in flight with the same one (and the budget
    room for exactly one more) must not both be served: each holds its own amount."""
    s = single
    payments = await sign_payments(s.agent, await opg_requirement(s.url, devchain), 11, s.url)
    payer_before = opg_balance(devchain, s.agent.address)
    async with aiohttp.ClientSession() as http:
        for p in payments[:9]:  # 9 of the 10 calls' budget spent
            assert served(await post(http, s.url, payment=p))
        replies = await asyncio.gather(*(post(http, s.url, payment=p, fault="slow:300", request_id="agent-fixed-id-1")
                                         for p in payments[9:]))
    assert sorted(served(r) for r in replies) == [False, True], replies
    (refused,) = [r for r in replies if not served(r)]
    assert refused.status == 402 and refused.error == "budget_exceeded", refused
    u = await s.admin.usage(s.agent.address)
    assert (u["spent"], u["reserved"], u["remaining"]) == (10 * PRICE, 0, 0), u
    assert payer_before - opg_balance(devchain, s.agent.address) == 10 * PRICE
    assert len(await s.admin.ledger(s.agent.address)) == 10


async def test_an_upstream_5xx_releases_the_reservation(devchain: dict, single: Single) -> None:
    s = single
    (payment,) = await sign_payments(s.agent, await opg_requirement(s.url, devchain), 1, s.url)
    before = opg_balance(devchain, s.agent.address)
    async with aiohttp.ClientSession() as http:
        failed = await post(http, s.url, payment=payment, fault="500")
        assert failed.status == 502 and failed.headers.get("PAYMENT-RESPONSE") is None, failed
        assert await charged(devchain, s, before) == (0, 0, 0, 0)
        assert (await s.admin.usage(s.agent.address))["remaining"] == 10 * PRICE
        # the payment was not used up: the same one buys the call once the upstream works
        retry = await post(http, s.url, payment=payment)
    assert served(retry), retry
    assert await charged(devchain, s, before) == (PRICE, PRICE, 0, PRICE)


async def test_a_settle_failure_releases_the_reservation(devchain: dict, single: Single) -> None:
    """A definitive settle failure: the agent revokes its Permit2 allowance while the upstream
    works (after verify and reserve, before settle). The facilitator re-reads the chain before
    sending and refuses (permit2_allowance_required, no transaction), the gateway releases."""
    s = single
    (payment,) = await sign_payments(s.agent, await opg_requirement(s.url, devchain), 1, s.url)
    before, upstream_before = opg_balance(devchain, s.agent.address), chat_count(s.upstream)
    async with aiohttp.ClientSession() as http:
        call = asyncio.ensure_future(post(http, s.url, payment=payment, fault="slow:1500"))
        held = await s.admin.wait_usage(s.agent.address, reserved=PRICE, timeout_s=5)
        assert held["reserved"] == PRICE and not call.done(), held  # verified and reserved, upstream working
        await asyncio.to_thread(approve_permit2, devchain, s.agent, 0)
        reply = await call
    try:
        assert reply.status == 402 and reply.error == "permit2_allowance_required", reply  # a new challenge
        assert reply.headers.get("PAYMENT-REQUIRED"), reply
        assert reply.settle is not None and not reply.settle.success and not reply.settle.transaction
        assert chat_count(s.upstream) - upstream_before == 1
        assert await charged(devchain, s, before) == (0, 0, 0, 0)
        assert (await s.admin.usage(s.agent.address))["remaining"] == 10 * PRICE
    finally:
        await asyncio.to_thread(approve_permit2, devchain, s.agent, 2**256 - 1)
    async with aiohttp.ClientSession() as http:
        retry = await post(http, s.url, payment=payment)  # the payment is still good: nothing moved
    assert served(retry), retry
    assert await charged(devchain, s, before) == (PRICE, PRICE, 0, PRICE)


async def test_a_client_that_goes_away_is_charged_at_most_once_and_the_budget_agrees(devchain: dict, single: Single) -> None:
    """The client hangs up 0.3 s into a 2 s upstream call. What the gateway does: the call runs to
    its end (uvicorn does not cancel the handler, settlement is shielded), settles, commits the hold
    and keeps the response for a replay; the same payment sent again gets that response with the
    same transaction and no second charge. So: charged exactly once, and the budget, the ledger and
    the chain all say one call; nothing stays reserved."""
    s = single
    (payment,) = await sign_payments(s.agent, await opg_requirement(s.url, devchain), 1, s.url)
    before, upstream_before = opg_balance(devchain, s.agent.address), chat_count(s.upstream)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(post(http, s.url, payment=payment, fault="slow:2000"), 0.3)
    assert (await s.admin.usage(s.agent.address))["reserved"] == PRICE  # the call goes on without its client
    settled = await s.admin.wait_usage(s.agent.address, reserved=0, spent=PRICE, timeout_s=10)
    assert (settled["reserved"], settled["spent"]) == (0, PRICE), settled
    assert await charged(devchain, s, before) == (PRICE, PRICE, 0, PRICE)
    (entry,) = await s.admin.ledger(s.agent.address)

    async with aiohttp.ClientSession() as http:
        replay = await post(http, s.url, payment=payment)
    assert served(replay) and replay.settle.transaction == entry["tx_hash"], replay  # type: ignore[union-attr]
    assert replay.json()["choices"][0]["message"]["content"] == "Echo: budgeted call"
    assert await charged(devchain, s, before) == (PRICE, PRICE, 0, PRICE)
    assert chat_count(s.upstream) - upstream_before == 1  # the replay did not call the provider again


async def test_a_killed_replica_s_reservation_expires_and_the_budget_is_whole_again(
        devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
        tmp_path: Path) -> None:
    """Replica 1 reserves the agent's whole budget (one call) and is killed (SIGKILL) while the
    upstream works: no commit, no release. Replica 2 refuses the agent until the hold expires
    (hold_s = 3), then serves it."""
    agent, payee = derived("killed-agent"), derived("killed-payee").address
    fund(devchain, agent)
    upstream = spawn_upstream()
    prefix = unique_prefix("killed")
    config = gateway_config(tmp_path / "gateway.json", devchain, devchain_file, upstream.url, redis_server.url,
                            pay_to=payee, budgets=budgets_section(redis_server.url, prefix,
                                                                  [opg_policy(devchain, agent.address, PRICE)], hold_s=3))
    g1 = spawn_gateway(upstream.url, redis_server.url, config=config, env=gateway_env(devchain, 0, prefix))
    g2 = spawn_gateway(upstream.url, redis_server.url, config=config, env=gateway_env(devchain, 1, prefix))
    admin = Admin(g2.url)
    requirement = await opg_requirement(g1.url + CHAT, devchain)
    first, second = await sign_payments(agent, requirement, 2, g1.url + CHAT)
    payer_before, payee_before = opg_balance(devchain, agent.address), opg_balance(devchain, payee)

    async with aiohttp.ClientSession() as http:
        doomed = asyncio.ensure_future(post(http, g1.url + CHAT, payment=first, fault="slow:5000"))
        held = await admin.wait_usage(agent.address, reserved=PRICE, timeout_s=5)
        reserved_at = time.monotonic()
        assert held["reserved"] == PRICE and not doomed.done(), held
        refused = await post(http, g2.url + CHAT, payment=second)
        assert refused.status == 402 and refused.error == "budget_exceeded", refused  # the budget is held
        assert refused.json()["remaining"] == "0"

        g1.kill()
        with pytest.raises(aiohttp.ClientError):
            await doomed
        freed = await admin.wait_usage(agent.address, reserved=0, timeout_s=10)
        waited = time.monotonic() - reserved_at
        print(f"\nkilled replica: hold freed {waited:.2f}s after it was seen (hold_s = 3)")
        assert (freed["reserved"], freed["spent"], freed["remaining"]) == (0, 0, PRICE), freed
        assert 2.0 <= waited <= 5.0

        retry = await post(http, g2.url + CHAT, payment=second)  # refused at reserve: still unused
    assert served(retry), retry
    u = await admin.usage(agent.address)
    assert (u["spent"], u["reserved"], u["remaining"]) == (PRICE, 0, 0)
    ledger = await admin.ledger(agent.address)
    assert [(int(e["amount"]), e["tx_hash"]) for e in ledger] == [(PRICE, retry.settle.transaction)]  # type: ignore[union-attr]
    assert payer_before - opg_balance(devchain, agent.address) == PRICE  # the killed call never settled
    assert opg_balance(devchain, payee) - payee_before == PRICE


# -- Redis stopped under load (its own redis-server: this one is stopped and restarted) ---------------


@pytest.fixture
def own_redis() -> Any:
    import shutil

    from tests.conftest import RedisServer

    server = RedisServer()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


STORE_DOWN = {"store_unavailable", "budget_store_unavailable"}
PENDING = {"settlement_pending", "unexpected_settle_error", "invalid_transaction_state"}  # "resend, do not pay again"


def pending(reply: Reply) -> bool:
    return reply.status == 402 and reply.error in PENDING


def outage_gateway(devchain: dict, devchain_file: str, own_redis: Any, spawn_upstream: Any, spawn_gateway: Any,
                   tmp_path: Path, label: str, budget_calls: int) -> tuple[Any, Any, Any, str]:
    """(agent, upstream, gateway, payee): records, settlements and budgets all in `own_redis`, which
    is told to save on shutdown (as a production Redis with persistence would), so policies and
    spend survive its restart."""
    agent, payee = derived(f"{label}-agent"), derived(f"{label}-payee").address
    fund(devchain, agent)
    upstream = spawn_upstream()
    prefix = unique_prefix(label)
    config = gateway_config(tmp_path / "gateway.json", devchain, devchain_file, upstream.url, own_redis.url,
                            pay_to=payee, budgets=budgets_section(own_redis.url, prefix,
                                                                  [opg_policy(devchain, agent.address, budget_calls * PRICE)],
                                                                  hold_s=5))
    gateway = spawn_gateway(upstream.url, own_redis.url, config=config,
                            env=gateway_env(devchain, 2, prefix) | {"FACILITATOR_CLAIM_LEASE_S": "15"})
    with redis.Redis.from_url(own_redis.url) as r:
        r.config_set("save", "3600 1")
    return agent, upstream, gateway, payee


async def test_redis_stopped_under_load_fails_closed_and_service_resumes(
        devchain: dict, devchain_file: str, own_redis: Any, spawn_upstream: Any, spawn_gateway: Any,
        tmp_path: Path) -> None:
    """Four clients keep paying for calls; after 4 are served Redis is stopped for 1.5 s, then
    started again; the clients go on until the budget (20 calls) refuses them. A client told its
    settlement is pending resends the same payment, as the 402 asks.

    What must hold whatever the timing: while Redis is down every call is a 503 naming the store
    and nothing reaches the provider; no 2xx without a settled transfer; no other 5xx; service and
    the budget come back with Redis; the ledger and the budget counters agree. Calls caught in
    flight by the stop or hitting stale connections right after the restart are the subject of the
    two xfail tests below (they can leave chain, ledger and provider counts apart); this test
    prints those counts."""
    budget_calls = 20
    agent, upstream, gateway, payee = outage_gateway(devchain, devchain_file, own_redis, spawn_upstream,
                                                     spawn_gateway, tmp_path, "outage", budget_calls)
    url = gateway.url + CHAT
    payments = await sign_payments(agent, await opg_requirement(url, devchain), 150, url)
    payee_before, upstream_before = opg_balance(devchain, payee), chat_count(upstream)

    phase = {"now": "up-before"}
    results: list[tuple[str, float, Reply | BaseException]] = []  # (phase when sent, seconds, reply)
    done = asyncio.Event()
    queue = iter(payments)

    async def client(http: aiohttp.ClientSession) -> None:
        while not done.is_set():
            payment = next(queue, None)
            if payment is None:
                return
            for _ in range(100):  # the same payment again only while its settlement is pending
                if done.is_set():
                    return
                sent_in, t0 = phase["now"], time.monotonic()
                try:
                    reply: Reply | BaseException = await post(http, url, payment=payment)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    reply = exc
                results.append((sent_in, time.monotonic() - t0, reply))
                await asyncio.sleep(0.2 if isinstance(reply, Reply) and reply.status in (402, 503) else 0.02)
                if not (isinstance(reply, Reply) and pending(reply)):
                    break

    def count(pred, sent_in: str | None = None) -> int:
        return sum(1 for p, _, r in results if (sent_in is None or p == sent_in) and isinstance(r, Reply) and pred(r))

    async def until(pred, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while not pred() and time.monotonic() < end:  # noqa: ASYNC110 - polls other tasks' results
            await asyncio.sleep(0.02)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        clients = [asyncio.ensure_future(client(http)) for _ in range(4)]
        await until(lambda: count(served) >= 4, 20)
        phase["now"] = "stopping"
        await asyncio.to_thread(own_redis.stop)
        await asyncio.sleep(0.5)  # calls in flight when it stopped finish
        phase["now"] = "down"
        upstream_down = await asyncio.to_thread(chat_count, upstream)
        await asyncio.sleep(1.5)
        upstream_down = await asyncio.to_thread(chat_count, upstream) - upstream_down
        phase["now"] = "starting"
        await asyncio.to_thread(own_redis.start)
        phase["now"] = "up-after"
        started = time.monotonic()
        await until(lambda: count(lambda r: r.error == "budget_exceeded", "up-after") >= 3, 30)
        recovered_s = time.monotonic() - started
        done.set()
        await asyncio.gather(*clients)

    summary: dict[str, dict[str, int]] = {}
    for sent_in, _, r in results:
        key = repr(r) if not isinstance(r, Reply) else f"{r.status} {r.error or ('served' if served(r) else '?')}"
        summary.setdefault(sent_in, {}).setdefault(key, 0)
        summary[sent_in][key] += 1
    down_s = [s for p, s, r in results if p == "down"]
    admin = Admin(gateway.url)
    # Holds stranded by the outage expire (hold_s); those of settlements the facilitator refused
    # for its store outage stay pinned until recovery learns the outcome: the facilitator may hold a
    # claim on the payment it could not clear (its claim lease: 15 s here).
    usage = await admin.wait_usage(agent.address, reserved=0, timeout_s=90)
    ledger = await admin.ledger(agent.address)
    n, on_chain = count(served), (opg_balance(devchain, payee) - payee_before) // PRICE
    print(f"\nredis outage: {summary}\n  budget reached {recovered_s:.1f}s after the restart;"
          f" calls while down took {min(down_s, default=0):.2f}-{max(down_s, default=0):.2f}s;"
          f" served {n}, transfers on chain {on_chain}, ledger {len(ledger)} (budget {budget_calls}),"
          f" provider calls {chat_count(upstream) - upstream_before}")

    for sent_in, _, r in results:
        assert isinstance(r, Reply), (sent_in, r)  # no dropped connections
        assert not (200 <= r.status < 300 and not served(r)), r  # nothing served unpaid
        assert r.status < 500 or (r.status == 503 and r.error in STORE_DOWN), (sent_in, r)  # 503 naming the store
        assert served(r) or r.error in STORE_DOWN | {"budget_exceeded"} or \
            (sent_in != "down" and (r.error == "unexpected_verify_error" or pending(r))), (sent_in, r)
    assert count(lambda r: True, "down") >= 4
    assert count(lambda r: r.status == 503, "down") == count(lambda r: True, "down")  # all refused while down
    assert upstream_down == 0  # and none of them reached the provider
    # Back in service: served once Redis answered again (its start returns on the first PONG, so
    # calls sent while it started may be served; when the calls in flight at the stop used up
    # the budget, the budget's refusals below are the service).
    served_before = sum(count(served, p) for p in ("up-before", "stopping", "down"))
    assert count(served, "starting") + count(served, "up-after") >= 1 or served_before == budget_calls
    assert count(lambda r: r.error == "budget_exceeded", "up-after") >= 3  # and the budget binds again
    served_txs = [r.settle.transaction for _, _, r in results if isinstance(r, Reply) and served(r)]  # type: ignore[union-attr]
    assert receipt_statuses(devchain, served_txs) == [1] * n and n <= on_chain  # every served call was paid
    assert (usage["spent"], usage["reserved"]) == (sum(int(e["amount"]) for e in ledger), 0)  # ledger = counters
    async with aiohttp.ClientSession() as http:  # the budget binds by its counters once stranded holds expired
        last = await post(http, url, payment=next(queue))
    assert served(last) if usage["remaining"] >= PRICE else last.error == "budget_exceeded", (usage, last)


async def test_the_first_calls_after_redis_returns_are_not_left_pending(
        devchain: dict, devchain_file: str, own_redis: Any, spawn_upstream: Any, spawn_gateway: Any,
        tmp_path: Path) -> None:
    agent, upstream, gateway, payee = outage_gateway(devchain, devchain_file, own_redis, spawn_upstream,
                                                     spawn_gateway, tmp_path, "restart", 100)
    url = gateway.url + CHAT
    payments = iter(await sign_payments(agent, await opg_requirement(url, devchain), 24, url))
    payer_before, upstream_before = opg_balance(devchain, agent.address), chat_count(upstream)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        warm = await asyncio.gather(*(post(http, url, payment=next(payments)) for _ in range(4)))  # pools in use
        assert all(served(r) for r in warm), warm
        await asyncio.to_thread(own_redis.stop)
        await asyncio.to_thread(own_redis.start)
        after = []
        for payment in payments:  # one call at a time, until three in a row are served
            after.append(await post(http, url, payment=payment))
            if len(after) >= 3 and all(served(r) for r in after[-3:]):
                break
    print("\nafter the restart:", [r.error or ("served" if served(r) else r.status) for r in after])
    n = sum(served(r) for r in warm + after)
    ledger = await Admin(gateway.url).ledger(agent.address)
    statuses = receipt_statuses(devchain, [e["tx_hash"] for e in ledger if e["tx_hash"]])
    # fail closed, then recover: a 503 naming the store, or served; nothing left half-done
    assert all(served(r) or (r.status == 503 and r.error in STORE_DOWN) for r in after), [
        (r.status, r.error) for r in after]
    assert chat_count(upstream) - upstream_before == n
    assert payer_before - opg_balance(devchain, agent.address) == n * PRICE
    assert len(ledger) == n and statuses == [1] * n


async def test_a_call_settled_as_redis_goes_down_is_still_counted(
        devchain: dict, devchain_file: str, own_redis: Any, redis_server: Any, spawn_upstream: Any,
        spawn_gateway: Any, spawn_facilitator: Any, spawn_hostile: Any, tmp_path: Path) -> None:
    """Deterministic: the facilitator settles (money moves), then holds its answer for 3 s
    (hostile facilitator, proxy-then-sleep); Redis (records and budgets) is stopped meanwhile and
    started again after the answer came back. The agent's budget is one call."""
    agent, payee = derived("settled-down-agent"), derived("settled-down-payee").address
    fund(devchain, agent)
    upstream = spawn_upstream()
    prefix = unique_prefix("setdown")
    real = spawn_facilitator(redis_server.url, extra_env={  # its own store: it stays up
        "FACILITATOR_SIGNER_KEYS": devchain["accounts"]["facilitator"][2]["private_key"],
        "FACILITATOR_STORE_PREFIX": f"{prefix}fac:"})
    hostile = spawn_hostile(real.url)
    config = gateway_config(tmp_path / "gateway.json", devchain, devchain_file, upstream.url, own_redis.url,
                            pay_to=payee, budgets=budgets_section(own_redis.url, prefix,
                                                                  [opg_policy(devchain, agent.address, PRICE)], hold_s=3))
    gateway = spawn_gateway(upstream.url, own_redis.url, facilitator_url=hostile.url, config=config,
                            env=gateway_env(devchain, 2, prefix))
    with redis.Redis.from_url(own_redis.url) as r:
        r.config_set("save", "3600 1")
    url = gateway.url + CHAT
    first, second = await sign_payments(agent, await opg_requirement(url, devchain), 2, url)
    payer_before = opg_balance(devchain, agent.address)
    set_hostile_mode(hostile, settle="proxy-then-sleep", sleep_s=3)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        call = asyncio.ensure_future(post(http, url, payment=first))
        end = time.monotonic() + 10
        while opg_balance(devchain, agent.address) == payer_before and time.monotonic() < end:  # noqa: ASYNC110 - polls the chain
            await asyncio.sleep(0.05)
        assert payer_before - opg_balance(devchain, agent.address) == PRICE and not call.done()  # paid, not answered
        await asyncio.to_thread(own_redis.stop)
        reply = await call
        await asyncio.to_thread(own_redis.start)
        set_hostile_mode(hostile, settle="proxy")
        admin = Admin(gateway.url)
        usage = await admin.wait_usage(agent.address, reserved=0, spent=PRICE, timeout_s=15)
        again = await post(http, url, payment=second)
    charged_calls = (payer_before - opg_balance(devchain, agent.address)) // PRICE
    print(f"\nsettled as Redis went down: reply {reply!r}; budget after restart {usage};"
          f" a second call: {again.status} {again.error}; charged on chain: {charged_calls} call(s) of a 1-call budget")
    assert usage["spent"] == PRICE  # the settled call counts against the budget ...
    assert again.status == 402 and again.error == "budget_exceeded", again  # ... so the budget is spent
    assert charged_calls == 1
    assert served(reply) or b"nothing was charged" not in reply.body, reply  # and nobody is told it was free
