"""The Reconciliation page's source: the ledger's total against the on-chain transfers to the
payee, per asset over a range. The console asks a `Reconciler`: the gateway gives it
`chain_reconciler` (budgets/reconcile.py over the blocks mined in the range); the default one
answers None (not available), as when no chain can be read."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from budgets import reconcile as ledger_vs_chain


@dataclass(frozen=True)
class ReconcileRow:
    network: str
    asset: str
    ledger_total: int  # base units the ledger says were paid to the payee
    chain_total: int  # base units the chain shows transferred to the payee
    note: str = ""

    @property
    def difference(self) -> int:
        """Chain minus ledger: positive is money received that the ledger lacks."""
        return self.chain_total - self.ledger_total


# (start, end) in unix seconds -> the rows, or None when reconciliation is not available.
Reconciler = Callable[[float, float], Awaitable[list[ReconcileRow] | None]]


async def unavailable(start: float, end: float) -> list[ReconcileRow] | None:
    """No chain to read (the gateway gives `chain_reconciler` when there is one)."""
    return None


class ReconcileError(Exception):
    pass


def chain_reconciler(reconciler: ledger_vs_chain.Reconciler) -> Reconciler:
    """The blocks mined between start and end, reconciled per network (None: no chain to read)."""

    async def reconcile(start: float, end: float) -> list[ReconcileRow] | None:
        networks = reconciler.networks()
        if not networks:
            return None
        rows = []
        for network in networks:
            rpc = reconciler.rpcs[network]
            first, last = await first_block_at(rpc, start), await first_block_at(rpc, end + 1) - 1
            if first > last:
                rows += [ReconcileRow(network, asset, 0, 0, "no block in the range")
                         for n, asset in reconciler.assets if n == network]
                continue
            try:
                report = await reconciler.run(first, last, network)
            except ledger_vs_chain.ReconcileError as exc:
                raise ReconcileError(str(exc)) from None
            listed = f"x402-budgets reconcile --network {network} --from {first} --to {last}"
            for t in report.totals:
                n = sum(1 for d in report.differences if d.asset == t.asset)
                note = f"blocks {first}..{last}" + (f"; {n} difference(s): {listed} lists them" if n else "")
                rows.append(ReconcileRow(t.network, t.asset, t.ledger, t.chain, note))
        return rows

    return reconcile


async def first_block_at(rpc: ledger_vs_chain.RpcCall, when: float) -> int:
    """The first block whose timestamp is at or after `when` (head + 1 if none is yet)."""
    head = int(await rpc("eth_blockNumber", []), 16)
    lo, hi = 0, head + 1
    while lo < hi:  # binary search: blocks' timestamps never go down
        mid = (lo + hi) // 2
        block = await rpc("eth_getBlockByNumber", [hex(mid), False])
        if int(block["timestamp"], 16) >= when:
            hi = mid
        else:
            lo = mid + 1
    return lo

