"""What the admin API answers: policies, usage rows and ledger entries as JSON documents, amounts
as decimal strings with a display form when the asset is known, the ledger also as JSON lines or
CSV."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson

from budgets.amounts import Assets, display
from budgets.models import BudgetUsage, LedgerEntry, Policy
from budgets.store import Check

LEDGER_COLUMNS = ("ts", "agent", "group", "route", "model", "amount", "asset", "network", "tx_hash", "request_id")


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def policy_doc(policy: Policy) -> dict:
    """The policy as it is stored, amounts as strings: a valid PUT body as it stands."""
    doc = policy.model_dump(mode="json")
    for lim in doc["limits"]:
        lim["amount"] = str(lim["amount"])
    if doc["per_call_max"] is not None:
        doc["per_call_max"] = str(doc["per_call_max"])
    return doc


@dataclass(frozen=True)
class ResponseBodies:
    """The response documents, with display forms for the assets the gateway knows."""

    assets: Assets

    def _display(self, amount: int, network: str, asset: str) -> str | None:
        return display(amount, network, asset, self.assets)

    def assets_list(self) -> dict:
        return {"assets": [{"network": n, "asset": a, "symbol": s, "decimals": d}
                           for (n, a), (s, d) in sorted(self.assets.items())]}

    def policy_item(self, kind: str, owner: str, policy: Policy) -> dict:
        limits = [self._display(lim.amount, policy.network, policy.asset) for lim in policy.limits]
        cap = policy.per_call_max
        per_call = None if cap is None else self._display(cap, policy.network, policy.asset)
        return {"kind": kind, "id": owner, "policy": policy_doc(policy),
                "display": {"limits": limits, "per_call_max": per_call}}

    @staticmethod
    def usage_policy(network: str, asset: str, policy: Policy, group: Policy | None, listed: bool) -> dict:
        return {"network": network, "asset": asset, "listed": listed, "group": policy.group,
                "suspended": policy.suspended or bool(group and group.suspended),
                "rate_limit": policy.rate_limit.model_dump() if policy.rate_limit else None}

    def usage_row(self, network: str, asset: str, check: Check, u: BudgetUsage) -> dict:
        row = {"network": network, "asset": asset, "scope": check.scope.kind, "scope_id": check.scope.id,
               "period": u.period, "rolling": u.rolling, "resets_at": iso(u.resets_at)}
        for name in ("limit", "spent", "reserved", "remaining"):
            row[name] = str(getattr(u, name))
            row[f"{name}_display"] = self._display(getattr(u, name), network, asset)
        return row

    def ledger_entry(self, e: LedgerEntry) -> dict:
        return {"ts": iso(e.ts), "ts_unix": e.ts, "agent": e.agent, "group": e.group, "route": e.route,
                "model": e.model, "amount": str(e.amount),
                "amount_display": self._display(e.amount, e.network, e.asset), "asset": e.asset,
                "network": e.network, "tx_hash": e.tx_hash, "request_id": e.request_id, "extra": e.extra}

    def ledger_summary(self, entries: list[LedgerEntry], start: float, end: float, by: str, bucket_s: int | None,
                       *, truncated: bool) -> dict:
        """Calls and amounts per asset (or per agent and asset), with per-bucket counts when asked;
        buckets are aligned to multiples of bucket_s (unix time) and cover start..end."""
        first = int(start // bucket_s) * bucket_s if bucket_s else 0
        n = int(end // bucket_s) - int(start // bucket_s) + 1 if bucket_s else 0
        rows: dict[tuple[str, ...], dict] = {}
        for e in entries:
            key = (e.agent.lower(), e.network, e.asset.lower()) if by == "agent" else (e.network, e.asset.lower())
            row = rows.get(key)
            if row is None:
                row = rows[key] = {"network": e.network, "asset": e.asset.lower(), "calls": 0, "amount": 0,
                                   "buckets": [[0, 0] for _ in range(n)]}
                if by == "agent":
                    row["agent"] = key[0]
            row["calls"] += 1
            row["amount"] += e.amount
            if bucket_s:
                b = row["buckets"][min(n - 1, max(0, int(e.ts // bucket_s) - first // bucket_s))]
                b[0] += 1
                b[1] += e.amount
        out = []
        for row in rows.values():
            row["amount_display"] = self._display(row["amount"], row["network"], row["asset"])
            row["buckets"] = [{"start": iso(first + i * bucket_s), "start_unix": first + i * bucket_s, "calls": c,
                               "amount": str(a)} for i, (c, a) in enumerate(row["buckets"])] if bucket_s else None
            row["amount"] = str(row["amount"])
            out.append(row)
        out.sort(key=lambda r: (r.get("agent", ""), r["network"], r["asset"]))
        return {"start": iso(start), "end": iso(end), "by": by, "bucket_s": bucket_s, "rows": out,
                "truncated": truncated}

    async def ledger_lines(self, entries: list[LedgerEntry], fmt: str) -> AsyncIterator[bytes]:
        """The entries as JSON lines ("jsonl") or CSV with a header row ("csv")."""
        if fmt == "jsonl":
            for e in entries:
                yield orjson.dumps(self.ledger_entry(e)) + b"\n"
            return
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(LEDGER_COLUMNS)
        for e in entries:
            doc = self.ledger_entry(e)
            writer.writerow(["" if doc[c] is None else doc[c] for c in LEDGER_COLUMNS])
            yield buf.getvalue().encode()
            buf.seek(0)
            buf.truncate()
        if buf.tell():
            yield buf.getvalue().encode()
