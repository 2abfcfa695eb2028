"""A bounded chaos run (issue 16): two gateway replicas on one Redis of their own (AOF, fsync
always), each with its facilitator in process, the stand-in provider, money moving on the dev chain.
Four agents with budgets of 12 calls each spend 16 pre-signed payments each, at concurrency 8,
while
- each replica exits right after 10% of its settlements (the fault hook: between the facilitator's
  "settled" and the budget commit) and is started again,
- a replica is killed (SIGKILL) at random points every 2-4 s (5 times) and started again,
- Redis is killed (SIGKILL) once and started again from its AOF.
An agent resends a payment until it gets an answer that is final (served, or refused by its
budget), as the gateway's answers ask. Afterwards, whatever the timing:
- the ledger equals the on-chain transfers to the payee, per agent and in total, to the base unit,
  and `x402-budgets reconcile` over the run's blocks finds no difference;
- no budget is exceeded on-chain;
- every payment that moved money was served (charged and undelivered: 0);
- no hold is left reserved and no settlement intent is left open.
"""

from __future__ import annotations

import asyncio
import io
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from budgets.cli import main as budgets_cli
from devtools.rpc import BlockingRpc
from tests.budget_helpers import (
    ADMIN_TOKEN,
    CHAT,
    CHAT_PRICE_OPG,
    Admin,
    derived,
    fund,
    gateway_config,
    gateway_env,
    opg_balance,
    opg_policy,
    opg_requirement,
    post,
    sign_payments,
    unique_prefix,
)
from tests.conftest import RedisServer

pytestmark = pytest.mark.e2e

PRICE = CHAT_PRICE_OPG
AGENTS, PAYMENTS, BUDGET_CALLS, CONCURRENCY = 4, 16, 12, 8
KILLS = 5  # SIGKILLs of a replica (each restart takes a few seconds of a 2-core machine)
ENV = {"GATEWAY_SETTLE_TIMEOUT_S": "5", "GATEWAY_RECORD_LEASE_S": "2", "GATEWAY_RECOVERY_INTERVAL_S": "0.5",
       "GATEWAY_FAULT_EXIT_AFTER_SETTLE": "0.1", "FACILITATOR_CLAIM_LEASE_S": "15"}
RETRY = {409, 502, 503}  # in progress, the upstream or a store briefly away: resend the same payment
PENDING = {"settlement_pending", "unexpected_settle_error", "invalid_transaction_state", "store_unavailable",
           "budget_store_unavailable"}


@pytest.fixture
def aof_redis() -> Any:
    server = RedisServer(["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


def block_number(devchain: dict) -> int:
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        return int(rpc.call("eth_blockNumber"), 16)
    finally:
        rpc.close()


@dataclass
class Run:
    served: dict[str, str] = field(default_factory=dict)  # payment -> tx of its PAYMENT-RESPONSE
    refused: dict[str, str] = field(default_factory=dict)  # payment -> final refusal
    attempts: int = 0
    answers: dict[str, int] = field(default_factory=dict)  # what the agents saw, for the printout
    history: dict[str, list[str]] = field(default_factory=dict)  # payment -> its answers, when it fails

    def saw(self, what: str) -> None:
        self.answers[what] = self.answers.get(what, 0) + 1


async def pay_until_final(http: aiohttp.ClientSession, replicas: list[Any], payment: str, run: Run,
                          rng: random.Random) -> None:
    """Resend one payment until its answer is final (an agent following the gateway's answers)."""
    # A replica killed between its facilitator's claim and the broadcast leaves that claim to
    # lapse (60 s) before any other can settle or refuse it: meanwhile the answer is "pending".
    deadline = time.monotonic() + 150
    seen = run.history.setdefault(payment, [])
    while time.monotonic() < deadline:
        run.attempts += 1
        replica = rng.choice(replicas)
        try:
            reply = await asyncio.wait_for(post(http, replica.url + CHAT, payment=payment), 20)
        except (TimeoutError, aiohttp.ClientError) as exc:
            run.saw("connection lost")
            seen.append(f"{type(exc).__name__} {replica.port} {time.monotonic():.1f}")
            await asyncio.sleep(0.3)
            continue
        run.saw(f"{reply.status} {reply.error or ''}".strip())
        seen.append(f"{reply.status} {reply.error} {replica.port} {time.monotonic():.1f}")
        if reply.status == 200:
            assert reply.settle is not None and reply.settle.success and reply.settle.transaction, reply
            run.served[payment] = reply.settle.transaction
            return
        if reply.status == 402 and reply.error in ("budget_exceeded", "payment_already_used"):
            run.refused[payment] = reply.error or ""
            return
        assert reply.status in RETRY or (reply.status == 402 and reply.error in PENDING), reply
        await asyncio.sleep(min(2.0, float(reply.headers.get("Retry-After", "0.3"))))
    raise AssertionError(f"a payment never got a final answer: {seen[-6:]}")


async def chaos(replicas: list[Any], store: RedisServer, rng: random.Random, stop: asyncio.Event,
                log: list[str]) -> None:
    """Restart replicas the fault hook ended; kill one every 2-4 s; kill Redis once."""
    next_kill = time.monotonic() + rng.uniform(2, 4)
    kills, redis_killed = 0, False
    started = time.monotonic()
    while not stop.is_set():
        for r in replicas:
            if r.proc.poll() is not None:
                log.append(f"{time.monotonic():.1f} replica {r.port} exited {r.proc.returncode}: started again")
                await asyncio.to_thread(r.start)
        if kills < KILLS and time.monotonic() > next_kill:
            kills += 1
            victim = rng.choice(replicas)
            log.append(f"{time.monotonic():.1f} replica {victim.port} killed")
            victim.kill()
            await asyncio.to_thread(victim.start)
            next_kill = time.monotonic() + rng.uniform(2, 4)
        if not redis_killed and time.monotonic() - started > 5:
            log.append(f"{time.monotonic():.1f} redis killed")
            store.kill()
            await asyncio.sleep(0.5)
            await asyncio.to_thread(store.start)
            redis_killed = True
        await asyncio.sleep(0.1)


async def reconcile_text(url: str, first: int, last: int) -> str:
    out = io.StringIO()
    code = await asyncio.to_thread(budgets_cli, ["--url", url + "/admin", "--token", ADMIN_TOKEN, "reconcile",
                                                 "--from", str(first), "--to", str(last)], out=out, err=out)
    assert code == 0, out.getvalue()
    return out.getvalue()



def wait_until_closed(url: str, intents_key: str, timeout_s: float) -> int:
    """How many intents are still open once none are, or the time is up."""
    deadline = time.monotonic() + timeout_s
    with redis.Redis.from_url(url) as r:
        while r.zcard(intents_key) and time.monotonic() < deadline:
            time.sleep(0.5)
        return int(r.zcard(intents_key))


def ledger_txs(ledger: list[dict]) -> list[str]:
    return [e["tx_hash"] for e in ledger]


def read_logs(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.glob("gateway.cli-*.log"))


async def test_chaos_ledger_budgets_and_chain_agree(devchain: dict, devchain_file: str, aof_redis: RedisServer,
                                                     spawn_upstream: Any, spawn_gateway: Any, tmp_path: Path) -> None:
    rng = random.Random(16)
    agents = [derived(f"chaos-agent-{n}") for n in range(AGENTS)]
    payee = derived("chaos-payee").address
    fund(devchain, *agents)
    upstream = spawn_upstream()
    prefix = unique_prefix("chaos")
    budgets = {"store_url": aof_redis.url, "store_prefix": f"{prefix}b:", "timezone": "UTC", "default": "deny",
               "hold_s": 5, "policies": [opg_policy(devchain, a.address, BUDGET_CALLS * PRICE) for a in agents]}
    config = gateway_config(tmp_path / "gateway.json", devchain, devchain_file, upstream.url, aof_redis.url,
                            pay_to=payee, budgets=budgets)
    replicas = [spawn_gateway(upstream.url, aof_redis.url, config=config, env=gateway_env(devchain, n, prefix) | ENV)
                for n in range(2)]
    requirement = await opg_requirement(replicas[0].url + CHAT, devchain)
    payments = {a.address: await sign_payments(a, requirement, PAYMENTS, replicas[0].url + CHAT) for a in agents}
    before = {a.address: opg_balance(devchain, a.address) for a in agents}
    payee_before = opg_balance(devchain, payee)
    first_block = block_number(devchain) + 1

    run, log, stop = Run(), [], asyncio.Event()
    queue = [p for n in range(PAYMENTS) for a in agents for p in [payments[a.address][n]]]
    chaos_task = asyncio.ensure_future(chaos(replicas, aof_redis, rng, stop, log))
    async with aiohttp.ClientSession() as http:
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(payment: str) -> None:
            async with sem:
                await pay_until_final(http, replicas, payment, run, rng)

        try:
            await asyncio.gather(*(one(p) for p in queue))
        finally:
            stop.set()
            await chaos_task
        for r in replicas:  # the survivors finish what the dead left
            if r.proc.poll() is not None:
                r.start()

    admin = Admin(replicas[0].url)
    intents_key = f"{prefix}gw:intents:{{i}}:lease"
    open_intents = await asyncio.to_thread(wait_until_closed, aof_redis.url, intents_key, 90)
    usage = {a.address: await admin.wait_usage(a.address, reserved=0, timeout_s=15) for a in agents}
    last_block = block_number(devchain)

    print(f"\nchaos: {len(queue)} payments, {run.attempts} requests, {len(run.served)} served, "
          f"{len(run.refused)} refused; answers {dict(sorted(run.answers.items()))}")
    print("\n".join(log))
    logs = await asyncio.to_thread(read_logs, tmp_path)
    print(f"recovery: {logs.count('settlement_intent_recovered')} intents committed by recovery, "
          f"{logs.count('settlement_intent_released')} released")
    assert open_intents == 0
    text = await reconcile_text(replicas[0].url, first_block, last_block)
    print(f"$ x402-budgets reconcile --from {first_block} --to {last_block}\n{text}")
    for line in text.splitlines():
        if line.startswith("0x"):
            tx = line.split()[0]
            print(tx, "served:", [p[-12:] for p, t in run.served.items() if t == tx])
            print("\n".join(row[:300] for row in logs.splitlines() if tx in row))
    paid_total = 0
    for a in agents:
        moved = before[a.address] - opg_balance(devchain, a.address)
        ledger = await admin.ledger(a.address)
        served = [p for p in payments[a.address] if p in run.served]
        assert sum(int(e["amount"]) for e in ledger) == moved, (a.address, ledger)  # ledger = chain, per agent
        unserved = {p[-12:]: (set(ledger_txs(ledger)) - set(run.served.values()), run.history[p])
                    for p in payments[a.address] if p not in run.served}
        assert moved == len(served) * PRICE, unserved  # every charged payment was served, once
        assert sorted(e["tx_hash"] for e in ledger) == sorted(run.served[p] for p in served)
        assert moved <= BUDGET_CALLS * PRICE  # no budget exceeded on-chain
        assert (usage[a.address]["spent"], usage[a.address]["reserved"]) == (moved, 0), usage[a.address]
        paid_total += moved
    assert opg_balance(devchain, payee) - payee_before == paid_total
    assert not [p for p, why in run.refused.items() if why == "payment_already_used"]  # none delivered unseen
    assert "no differences" in text, text
