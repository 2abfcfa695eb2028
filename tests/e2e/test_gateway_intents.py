"""A replica killed exactly between the facilitator's settlement and the budget commit (issue 16):
real gateway processes on one Redis (records, intents, budgets and the facilitators' exactly-once
store), the stand-in provider, money moving on the dev chain. Replica A runs with the fault hook
GATEWAY_FAULT_EXIT_AFTER_SETTLE=1: its process exits the moment settle returns "settled". Replica
B's recovery loop finds A's intent once its lease lapsed, asks its own facilitator (which answers
from the shared store with A's transaction), commits the budget and writes the ledger, once."""

from __future__ import annotations

import asyncio
import io
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from budgets.cli import main as budgets_cli
from devtools.devchain import calldata
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
from tests.payments import send_transactions

pytestmark = pytest.mark.e2e

PRICE = CHAT_PRICE_OPG
FAST = {"GATEWAY_SETTLE_TIMEOUT_S": "3", "GATEWAY_RECORD_LEASE_S": "2", "GATEWAY_RECOVERY_INTERVAL_S": "0.5"}


def block_number(devchain: dict) -> int:
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        return int(rpc.call("eth_blockNumber"), 16)
    finally:
        rpc.close()


async def reconcile(gateway_url: str, from_block: int, to_block: int, *, json_out: bool = False) -> tuple[int, str]:
    """`x402-budgets reconcile` against the gateway's admin API: (exit code, what it printed)."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["--url", gateway_url + "/admin", "--token", ADMIN_TOKEN, *(["--json"] if json_out else []),
            "reconcile", "--from", str(from_block), "--to", str(to_block)]
    code = await asyncio.to_thread(budgets_cli, argv, out=out, err=err)
    return code, out.getvalue() + err.getvalue()


async def wait_ledger(admin: Admin, agent: str, n: int, timeout_s: float) -> list[dict[str, Any]]:
    end = time.monotonic() + timeout_s
    while True:
        entries = await admin.ledger(agent)
        if len(entries) >= n or time.monotonic() > end:
            return entries
        await asyncio.sleep(0.2)


async def test_a_replica_killed_between_settlement_and_commit_is_committed_once_by_another(
        devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
        tmp_path: Path) -> None:
    agent, payee = derived("intent-agent"), derived("intent-payee").address
    fund(devchain, agent)
    upstream = spawn_upstream()
    prefix = unique_prefix("intent")
    budgets = {"store_url": redis_server.url, "store_prefix": f"{prefix}b:", "timezone": "UTC", "default": "deny",
               "policies": [opg_policy(devchain, agent.address, 10 * PRICE)]}
    config = gateway_config(tmp_path / "gateway.json", devchain, devchain_file, upstream.url, redis_server.url,
                            pay_to=payee, budgets=budgets)
    a = spawn_gateway(upstream.url, redis_server.url, config=config,
                      env=gateway_env(devchain, 0, prefix) | FAST | {"GATEWAY_FAULT_EXIT_AFTER_SETTLE": "1"})
    b = spawn_gateway(upstream.url, redis_server.url, config=config, env=gateway_env(devchain, 1, prefix) | FAST)
    admin = Admin(b.url)
    requirement = await opg_requirement(a.url + CHAT, devchain)
    (payment,) = await sign_payments(agent, requirement, 1, a.url + CHAT)
    payer_before, payee_before = opg_balance(devchain, agent.address), opg_balance(devchain, payee)
    first_block = block_number(devchain) + 1

    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            await post(http, a.url + CHAT, payment=payment)
        assert a.proc.wait(10) == 70  # the fault hook: exited right after the facilitator said settled
        assert opg_balance(devchain, payee) - payee_before == PRICE  # the money moved ...
        u = await admin.usage(agent.address)
        assert (u["spent"], u["reserved"]) == (0, PRICE), u  # ... nothing counted yet, the hold pinned

        entries = await wait_ledger(admin, agent.address, 1, timeout_s=30)  # B's recovery finishes A's work
        assert [int(e["amount"]) for e in entries] == [PRICE], entries
        tx = entries[0]["tx_hash"]
        u = await admin.usage(agent.address)
        assert (u["spent"], u["reserved"]) == (PRICE, 0), u  # no hold left

        served = await post(http, b.url + CHAT, payment=payment)  # the call is owed to its agent: served once
        assert served.status == 200 and b"Echo: budgeted call" in served.body, served
        assert served.settle is not None and served.settle.transaction == tx
        done = await post(http, b.url + CHAT, payment=payment)  # kept before it was sent: replayed, not refused
        assert done.status == 200 and done.body == served.body and done.settle is not None, done
        assert done.settle.transaction == tx

    await asyncio.sleep(1.5)  # three more recovery rounds: nothing is counted twice
    entries = await admin.ledger(agent.address)
    assert [(int(e["amount"]), e["tx_hash"]) for e in entries] == [(PRICE, tx)]
    # ledger = on-chain transfers to the payee, to the base unit; the agent was charged once
    assert sum(int(e["amount"]) for e in entries) == opg_balance(devchain, payee) - payee_before
    assert payer_before - opg_balance(devchain, agent.address) == PRICE
    u = await admin.usage(agent.address)
    assert (u["spent"], u["reserved"], u["remaining"]) == (PRICE, 0, 9 * PRICE)

    # x402-budgets reconcile over the blocks of this test: clean (the payee is fresh, so every
    # transfer to it in the range is this test's) ...
    last_block = block_number(devchain)
    code, text = await reconcile(b.url, first_block, last_block)
    print(f"\n$ x402-budgets reconcile --from {first_block} --to {last_block}\n{text}")
    assert code == 0 and "no differences" in text, text
    code, doc_text = await reconcile(b.url, first_block, last_block, json_out=True)
    doc = json.loads(doc_text)
    assert [(t["chain"], t["ledger"], t["difference"]) for t in doc["totals"]
            if t["asset"] == devchain["tokens"]["OPG"]["address"].lower()] == [(str(PRICE), str(PRICE), "0")]

    # ... then a transfer to the payee made outside the gateway: listed, with its transaction
    outsider = derived("intent-outsider")
    fund(devchain, outsider)
    token = devchain["tokens"]["OPG"]["address"]
    send_transactions(devchain, [(outsider, token, calldata("transfer(address,uint256)", ["address", "uint256"],
                                                             [payee, 1234]))])
    last_block = block_number(devchain)
    code, text = await reconcile(b.url, first_block, last_block)
    print(f"\n$ x402-budgets reconcile --from {first_block} --to {last_block}\n{text}")
    assert code == 0 and "1 difference" in text and "not_in_ledger" in text and "1234" in text, text
    code, doc_text = await reconcile(b.url, first_block, last_block, json_out=True)
    (diff,) = json.loads(doc_text)["differences"]
    assert (diff["kind"], diff["chain"], diff["ledger"], diff["difference"]) == ("not_in_ledger", "1234", "0", "1234")
    assert diff["tx"].startswith("0x") and diff["tx"] != tx
    metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(b.url + "/metrics", timeout=5).read().decode())
    assert f'x402_gateway_reconcile_difference_atomic{{asset="{token.lower()}",network="{devchain["network"]}"}} 1234.0' \
        in metrics, [line for line in metrics.splitlines() if "reconcile" in line]


async def test_a_replica_killed_after_settling_a_call_out_of_a_budget_lease_is_counted_once(
        devchain: dict, devchain_file: str, redis_server: Any, spawn_upstream: Any, spawn_gateway: Any,
        tmp_path: Path) -> None:
    """Budget leases (budgets/leases.py): A hands the call out of a lease of 4 calls, settles it and
    dies. B's recovery commits it once from the intent (the hold names the lease); the rest of the
    dead replica's lease expires with hold_s; then the budget is exact: 9 more calls, not 10."""
    agent, payee = derived("lease-kill-agent"), derived("lease-kill-payee").address
    fund(devchain, agent)
    upstream = spawn_upstream()
    prefix = unique_prefix("leasekill")
    budgets = {"store_url": redis_server.url, "store_prefix": f"{prefix}b:", "timezone": "UTC", "default": "deny",
               "policies": [opg_policy(devchain, agent.address, 10 * PRICE)], "lease_calls": 4, "hold_s": 4}
    config = gateway_config(tmp_path / "gateway.json", devchain, devchain_file, upstream.url, redis_server.url,
                            pay_to=payee, budgets=budgets)
    a = spawn_gateway(upstream.url, redis_server.url, config=config,
                      env=gateway_env(devchain, 0, prefix) | FAST | {"GATEWAY_FAULT_EXIT_AFTER_SETTLE": "1"})
    b = spawn_gateway(upstream.url, redis_server.url, config=config, env=gateway_env(devchain, 1, prefix) | FAST)
    admin = Admin(b.url)
    requirement = await opg_requirement(a.url + CHAT, devchain)
    payments = await sign_payments(agent, requirement, 11, a.url + CHAT)
    payer_before = opg_balance(devchain, agent.address)

    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            await post(http, a.url + CHAT, payment=payments[0])
        assert a.proc.wait(10) == 70  # exited right after the facilitator said settled
        entries = await wait_ledger(admin, agent.address, 1, timeout_s=30)
        assert [int(e["amount"]) for e in entries] == [PRICE], entries
        u = await admin.wait_usage(agent.address, reserved=0, timeout_s=15)  # the dead lease's rest expired
        assert (u["spent"], u["reserved"], u["remaining"]) == (PRICE, 0, 9 * PRICE), u
        replies = [await post(http, b.url + CHAT, payment=p) for p in payments[1:]]
    assert [r.status for r in replies] == [200] * 9 + [402] and replies[-1].error == "budget_exceeded", replies
    await asyncio.sleep(1.5)  # more recovery rounds: nothing counted twice
    entries = await admin.ledger(agent.address)
    assert len(entries) == 10 and sum(int(e["amount"]) for e in entries) == 10 * PRICE
    assert payer_before - opg_balance(devchain, agent.address) == 10 * PRICE
    await asyncio.sleep(2.5)  # B's leases lapse (lease_s 2) and give back what they hold
    u = await admin.usage(agent.address)
    assert (u["spent"], u["reserved"], u["remaining"]) == (10 * PRICE, 0, 0), u
