"""Reconciliation of the ledger with the chain: over a block range, every ERC-20 `Transfer` to the
payee (per network and asset) against the ledger's entries for the same transactions, to the base
unit. Each difference is listed with its transaction:

- `not_in_ledger`: money reached the payee and the ledger does not have it (a commit lost, or a
  transfer made outside the gateway);
- `not_on_chain`: the ledger counts a transaction whose block is in the range but that paid the
  payee nothing (or that has no receipt at all);
- `amount`: both have it, with different amounts.

`difference` is always chain − ledger. The ledger is read by time: from an hour before the range's
first block (clock skew, a settlement mined before its commit) to now (a commit recovered late
still belongs to the block its transaction is in); entries whose transaction is outside the range
are left out by their receipt's block.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from budgets.models import LedgerEntry
from budgets.store import BudgetStore

log = logging.getLogger("budgets.reconcile")

TRANSFER = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"  # Transfer(address,address,uint256)
LOG_CHUNK = 5_000  # blocks per eth_getLogs (providers cap the range)
LEDGER_SLACK_S = 3_600

RpcCall = Callable[[str, list[Any]], Awaitable[Any]]


class ReconcileError(Exception):
    """The range cannot be reconciled (no RPC for the network, a bad range, the node refused)."""


@dataclass(frozen=True, slots=True)
class Difference:
    network: str
    asset: str
    tx: str
    block: int | None
    chain: int
    ledger: int
    kind: str  # not_in_ledger | not_on_chain | amount

    @property
    def difference(self) -> int:
        return self.chain - self.ledger


@dataclass(slots=True)
class Total:
    network: str
    asset: str
    chain: int = 0
    ledger: int = 0

    @property
    def difference(self) -> int:
        return self.chain - self.ledger


@dataclass(slots=True)
class Report:
    network: str
    from_block: int
    to_block: int
    payee: str
    totals: list[Total] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "network": self.network, "from_block": self.from_block, "to_block": self.to_block, "payee": self.payee,
            "totals": [{"network": t.network, "asset": t.asset, "chain": str(t.chain), "ledger": str(t.ledger),
                        "difference": str(t.difference)} for t in self.totals],
            "differences": [{"network": d.network, "asset": d.asset, "tx": d.tx, "block": d.block, "kind": d.kind,
                             "chain": str(d.chain), "ledger": str(d.ledger), "difference": str(d.difference)}
                            for d in self.differences],
        }  # fmt: skip


def _topic(address: str) -> str:
    return "0x" + address.lower().removeprefix("0x").rjust(64, "0")


class Reconciler:
    """`rpcs`: network -> JSON-RPC caller; `assets`: the (network, asset) pairs the payee is paid
    in; `on_report`: called with every report (the gateway sets its gauge from it)."""

    def __init__(self, store: BudgetStore, *, payee: str, assets: Iterable[tuple[str, str]], rpcs: dict[str, RpcCall],
                 clock: Callable[[], float], on_report: Callable[[Report], None] | None = None) -> None:
        self.store = store
        self.payee = payee.lower()
        self.assets = sorted({(n, a.lower()) for n, a in assets})
        self.rpcs = rpcs
        self.clock = clock
        self.on_report = on_report

    def networks(self) -> list[str]:
        return sorted({n for n, _ in self.assets if n in self.rpcs})

    async def run(self, from_block: int, to_block: int, network: str | None = None) -> Report:
        if network is None:
            known = self.networks()
            if len(known) != 1:
                raise ReconcileError(f"name the network: one of {', '.join(known) or '(none with an RPC URL)'}")
            network = known[0]
        rpc = self.rpcs.get(network)
        if rpc is None:
            raise ReconcileError(f"no RPC URL for {network}")
        if not 0 <= from_block <= to_block:
            raise ReconcileError("from must be at most to, both block numbers")
        assets = [a for n, a in self.assets if n == network]
        transfers = await self._transfers(rpc, assets, from_block, to_block)
        first = await rpc("eth_getBlockByNumber", [hex(from_block), False])
        if first is None:
            raise ReconcileError(f"block {from_block} is not on the chain yet")
        start = int(first["timestamp"], 16) - LEDGER_SLACK_S
        entries = [e for e in await self.store.ledger(agent=None, start=start, end=self.clock() + 60, limit=10_000_000)
                   if e.network == network and e.asset.lower() in assets and e.tx_hash.startswith("0x")]
        report = await self._compare(network, rpc, assets, transfers, entries, from_block, to_block)
        if self.on_report is not None:
            self.on_report(report)
        return report

    async def _transfers(self, rpc: RpcCall, assets: list[str], from_block: int,
                         to_block: int) -> dict[tuple[str, str], tuple[int, int]]:
        """(tx, asset) -> (block, amount) of every Transfer to the payee in the range."""
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for lo in range(from_block, to_block + 1, LOG_CHUNK):
            hi = min(to_block, lo + LOG_CHUNK - 1)
            logs = await rpc("eth_getLogs", [{"fromBlock": hex(lo), "toBlock": hex(hi), "address": assets,
                                              "topics": [TRANSFER, None, _topic(self.payee)]}])
            for log in logs or []:
                if log.get("removed"):
                    continue
                key = (log["transactionHash"].lower(), log["address"].lower())
                block, amount = out.get(key, (int(log["blockNumber"], 16), 0))
                out[key] = (block, amount + int(log["data"], 16))
        return out

    async def _compare(self, network: str, rpc: RpcCall, assets: list[str],
                       transfers: dict[tuple[str, str], tuple[int, int]], entries: list[LedgerEntry],
                       from_block: int, to_block: int) -> Report:
        ledger: dict[tuple[str, str], int] = {}
        for e in entries:
            key = (e.tx_hash.lower(), e.asset.lower())
            ledger[key] = ledger.get(key, 0) + e.amount
        unmatched = sorted({tx for (tx, asset) in ledger if (tx, asset) not in transfers})
        blocks = dict(zip(unmatched, await asyncio.gather(*(self._block_of(rpc, tx) for tx in unmatched)), strict=False))
        report = Report(network, from_block, to_block, self.payee)
        totals = {a: Total(network, a) for a in assets}
        for (tx, asset), (block, amount) in sorted(transfers.items(), key=lambda kv: (kv[1][0], kv[0])):
            counted = ledger.get((tx, asset), 0)
            totals[asset].chain += amount
            totals[asset].ledger += counted
            if counted != amount:
                kind = "not_in_ledger" if counted == 0 else "amount"
                report.differences.append(Difference(network, asset, tx, block, amount, counted, kind))
        for (tx, asset), counted in sorted(ledger.items()):
            if (tx, asset) in transfers:
                continue
            mined = blocks.get(tx)
            if mined is not None and not from_block <= mined <= to_block:
                continue  # another range's
            totals[asset].ledger += counted
            report.differences.append(Difference(network, asset, tx, mined, 0, counted, "not_on_chain"))
        report.totals = list(totals.values())
        return report

    @staticmethod
    async def _block_of(rpc: RpcCall, tx: str) -> int | None:
        receipt = await rpc("eth_getTransactionReceipt", [tx])
        return int(receipt["blockNumber"], 16) if receipt else None


class ReconcileJob:
    """The periodic reconciliation behind the chart's alert: every `every_s`, each network's
    trailing `window_blocks` ending `lag_blocks` before the head (a settlement mined in the last
    blocks may not be committed yet: it is not a difference) is reconciled, and the report sets
    the gauge through the reconciler's `on_report`. The windows overlap, so a difference stays
    on the gauge for as long as it is inside the window, not one interval only."""

    def __init__(self, reconciler: Reconciler, *, every_s: float, window_blocks: int, lag_blocks: int) -> None:
        self.reconciler = reconciler
        self.every_s = every_s
        self.window_blocks = window_blocks
        self.lag_blocks = lag_blocks

    async def run_once(self) -> list[Report]:
        reports = []
        for network in self.reconciler.networks():
            head = int(await self.reconciler.rpcs[network]("eth_blockNumber", []), 16)
            to_block = head - self.lag_blocks
            if to_block < 0:
                continue
            reports.append(await self.reconciler.run(max(0, to_block - self.window_blocks + 1), to_block, network))
        return reports

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                for report in await self.run_once():
                    if report.differences:
                        log.error("ledger_differs_from_chain", extra={
                            "network": report.network, "from_block": report.from_block, "to_block": report.to_block,
                            "differences": len(report.differences)})
            except Exception:  # the node or the store is away: the next round tries again
                log.exception("reconcile_failed")

