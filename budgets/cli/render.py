"""The CLI's tables and lines, from the API's JSON documents. Pure: the assets (symbols and
decimals) are passed in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from budgets.amounts import Assets, format_units, symbol_of

POLICY_HEADERS = ("KIND", "ID", "NETWORK", "ASSET", "LIMITS", "PER-CALL", "RATE", "MODELS", "ROUTES", "GROUP", "STATE")
USAGE_HEADERS = ("NETWORK", "ASSET", "SCOPE", "ID", "PERIOD", "LIMIT", "SPENT", "RESERVED", "REMAINING", "RESETS AT")
LEDGER_HEADERS = ("TIME", "AGENT", "GROUP", "ROUTE", "MODEL", "AMOUNT", "TX")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _amount(base: str | int | None, shown: str | None) -> str:
    return "-" if base is None else (shown or str(base))


def policies_table(items: list[dict[str, Any]], assets: Assets) -> str:
    rows = []
    for it in items:
        p, d = it["policy"], it["display"]
        limits = ", ".join(f"{_amount(lim['amount'], shown)}/{lim['period']}{' rolling' if lim['rolling'] else ''}"
                           for lim, shown in zip(p["limits"], d["limits"], strict=False)) or "-"
        rate = p["rate_limit"]
        rows.append([it["kind"], it["id"], p["network"], symbol_of(p["network"], p["asset"], assets), limits,
                     _amount(p["per_call_max"], d["per_call_max"]),
                     f"{rate['per_minute']}/min" + (f" +{rate['burst']}" if rate["burst"] else "") if rate else "-",
                     ",".join(p["allowed_models"]) if p["allowed_models"] is not None else "*",
                     ",".join(p["allowed_routes"]) if p["allowed_routes"] is not None else "*",
                     p["group"] or "-", "suspended" if p["suspended"] else "active"])
    return table(POLICY_HEADERS, rows)


def usage_text(doc: dict[str, Any], assets: Assets) -> str:
    """A line for the agent, one per policy, then the windows' table."""
    rows = [[b["network"], symbol_of(b["network"], b["asset"], assets), b["scope"], b["scope_id"],
             b["period"] + (" rolling" if b["rolling"] else ""), _amount(b["limit"], b["limit_display"]),
             _amount(b["spent"], b["spent_display"]), _amount(b["reserved"], b["reserved_display"]),
             _amount(b["remaining"], b["remaining_display"]), b["resets_at"]] for b in doc["budgets"]]
    head = [f"agent {doc['agent']}" + ("  SUSPENDED" if doc["suspended"] else "")]
    for p in doc["policies"]:
        rate = p["rate_limit"]
        head.append(f"  {p['network']} {symbol_of(p['network'], p['asset'], assets)}: "
                    f"{'listed' if p['listed'] else 'default policy'}"
                    f"{', group ' + p['group'] if p['group'] else ''}"
                    f"{', rate ' + str(rate['per_minute']) + '/min' if rate else ''}"
                    f"{', suspended' if p['suspended'] else ''}")
    return "\n".join(head) + "\n" + (table(USAGE_HEADERS, rows) if rows else "no spend limits")


def suspension_text(doc: dict[str, Any], assets: Assets) -> str:
    return "\n".join(
        f"{doc['kind']} {doc['id']} {'suspended' if doc['suspended'] else 'resumed'} on {it['policy']['network']}"
        f" {symbol_of(it['policy']['network'], it['policy']['asset'], assets)}" for it in doc["policies"])


def ledger_text(entries: list[dict[str, Any]], assets: Assets) -> str:
    """The entries' table (when there are any), then a count and the total per network and asset."""
    rows = [[e["ts"], e["agent"], e["group"] or "-", e["route"], e["model"] or "-",
             _amount(e["amount"], e["amount_display"]), e["tx_hash"]] for e in entries]
    totals: dict[tuple[str, str], int] = {}
    for e in entries:
        totals[(e["network"], e["asset"])] = totals.get((e["network"], e["asset"]), 0) + int(e["amount"])
    summary = [f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"]
    summary += [f"total {_total(n, a, t, assets)} on {n}" for (n, a), t in totals.items()]
    return (table(LEDGER_HEADERS, rows) + "\n" if rows else "") + "; ".join(summary)


def _total(network: str, asset: str, amount: int, assets: Assets) -> str:
    known = assets.get((network, asset.lower()))
    if known is None:
        return f"{amount} base units of {asset}"
    symbol, decimals = known
    return f"{format_units(amount, decimals)} {symbol} ({amount})"


def reconcile_text(doc: dict[str, Any], assets: Assets) -> str:
    """Totals per asset, then every difference (chain - ledger) with its transaction; the last
    line says whether the books agree."""
    lines = [f"{doc['network']} blocks {doc['from_block']}..{doc['to_block']}, payee {doc['payee']}"]
    rows = [[symbol_of(t["network"], t["asset"], assets), t["chain"], t["ledger"], t["difference"]] for t in doc["totals"]]
    lines.append(table(["asset", "on-chain", "ledger", "difference"], rows))
    diffs = doc["differences"]
    if diffs:
        lines.append(table(["tx", "block", "asset", "kind", "on-chain", "ledger", "difference"], [
            [d["tx"], "-" if d["block"] is None else str(d["block"]), symbol_of(d["network"], d["asset"], assets),
             d["kind"], d["chain"], d["ledger"], d["difference"]] for d in diffs]))
    lines.append(f"{len(diffs)} difference{'' if len(diffs) == 1 else 's'}" if diffs else
                 "no differences: the ledger matches the chain to the base unit")
    return "\n".join(lines)
