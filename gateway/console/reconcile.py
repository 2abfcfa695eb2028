"""The Reconciliation page's source: the ledger's total against the on-chain transfers to the
payee, per asset over a range. The console asks a `Reconciler`; the default one reads the budgets
admin API's GET /v1/reconcile and answers None (not available) when the API has no such route."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.console.admin_calls import AdminCalls


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


def admin_reconciler(calls: AdminCalls) -> Reconciler:
    async def reconcile(start: float, end: float) -> list[ReconcileRow] | None:
        reply = await calls.get("/v1/reconcile", start=start, end=end)
        if reply.status in (404, 405) or not isinstance(reply.doc, dict):
            return None
        if reply.status >= 400:
            raise ReconcileError(str(reply.doc.get("message") or reply.doc.get("error") or reply.status))
        rows = reply.doc.get("rows") or reply.doc.get("assets") or []
        return [_row(r) for r in rows if isinstance(r, dict)]

    return reconcile


class ReconcileError(Exception):
    pass


def _row(doc: dict[str, Any]) -> ReconcileRow:
    def amount(*names: str) -> int:
        for n in names:
            if doc.get(n) is not None:
                return int(doc[n])
        return 0

    return ReconcileRow(str(doc.get("network", "")), str(doc.get("asset", "")),
                        amount("ledger_total", "ledger"), amount("chain_total", "onchain_total", "onchain", "chain"),
                        str(doc.get("note", "")))
