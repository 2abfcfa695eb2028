"""The periodic ledger-vs-chain reconciliation (budgets/reconcile.py ReconcileJob) on the dev chain:
it covers the trailing window of blocks that ends `lag_blocks` before the head, lists a transfer
to the payee made outside the gateway, and sets the gauge through the reconciler's report hook."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from budgets.models import LedgerEntry
from budgets.reconcile import ReconcileJob, Reconciler, Report
from budgets.sqlite_store import SQLiteBudgetStore
from devtools.devchain import calldata
from devtools.rpc import BlockingRpc
from facilitator.evm.rpc import JsonRpcClient
from tests.budget_helpers import derived, fund
from tests.payments import send_transactions

pytestmark = pytest.mark.integration


async def test_the_job_reconciles_the_trailing_window_behind_the_lag(devchain: dict[str, Any]) -> None:
    agent, payee = derived(f"reconcile-job:{uuid.uuid4().hex}"), derived(f"reconcile-job-payee:{uuid.uuid4().hex}")
    fund(devchain, agent)
    token, network = devchain["tokens"]["OPG"]["address"], devchain["network"]

    def pay(amount: int) -> str:
        send_transactions(devchain, [(agent, token, calldata("transfer(address,uint256)", ["address", "uint256"],
                                                              [payee.address, amount]))])
        rpc = BlockingRpc(devchain["rpc_url"])
        try:
            return str(rpc.call("eth_getBlockByNumber", "latest", True)["transactions"][0]["hash"])
        finally:
            rpc.close()

    through_gateway = pay(1000)
    outside = pay(7)  # the next block: a transfer nobody's ledger has
    store = SQLiteBudgetStore(":memory:")
    await store.commit([], "r1", 1000, LedgerEntry(ts=time.time(), agent=agent.address, group=None, route="POST /x",
                                                   model=None, amount=1000, asset=token.lower(), network=network,
                                                   tx_hash=through_gateway, request_id="r1"), now=time.time())
    client = JsonRpcClient(devchain["rpc_url"])
    seen: list[Report] = []
    try:
        reconciler = Reconciler(store, payee=payee.address, assets=[(network, token)], rpcs={network: client.call},
                                clock=time.time, on_report=seen.append)
        (behind,) = await ReconcileJob(reconciler, every_s=60, window_blocks=20, lag_blocks=1).run_once()
        assert [(t.chain, t.ledger, t.difference) for t in behind.totals] == [(1000, 1000, 0)]  # the last block waits
        assert behind.differences == []
        (now,) = await ReconcileJob(reconciler, every_s=60, window_blocks=20, lag_blocks=0).run_once()
        assert [(t.chain, t.ledger, t.difference) for t in now.totals] == [(1007, 1000, 7)]
        assert [(d.tx, d.kind, d.chain, d.ledger) for d in now.differences] == [(outside.lower(), "not_in_ledger", 7, 0)]
        assert seen == [behind, now]  # each run reports (the gateway sets its gauge from it)
    finally:
        await client.close()
        await store.close()
