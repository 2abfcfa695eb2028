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
from gateway.console.reconcile import ReconcileRow, chain_reconciler
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

        # the console's Reconciliation page asks by time: the blocks mined in the range
        rpc = BlockingRpc(devchain["rpc_url"])
        try:
            mined = int(rpc.call("eth_getTransactionReceipt", through_gateway)["blockNumber"], 16)
            started = int(rpc.call("eth_getBlockByNumber", hex(mined), False)["timestamp"], 16)
        finally:
            rpc.close()
        (row,) = await chain_reconciler(reconciler)(started, time.time() + 5)
        assert (row.asset, row.ledger_total, row.chain_total, row.difference) == (token.lower(), 1000, 1007, 7)
        assert "1 difference" in row.note and "x402-budgets reconcile" in row.note, row.note
        assert await chain_reconciler(reconciler)(time.time() + 3600, time.time() + 7200) == [
            ReconcileRow(network, token.lower(), 0, 0, "no block in the range")]
    finally:
        await client.close()
        await store.close()
