"""`x402-budgets`: the operator's command line over the budgets admin API.

Tables by default, `--json` for the API's own JSON. Exit codes: 0 ok, 1 the API (or the network)
refused, 2 a usage error. The token comes from --token, BUDGETS_ADMIN_TOKEN or
BUDGETS_ADMIN_TOKEN_FILE and is never printed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from decimal import Decimal, localcontext
from typing import Any, TextIO

DEFAULT_URL = "http://127.0.0.1:8402/admin"
PERIODS = {"hourly": "hour", "daily": "day", "weekly": "week", "monthly": "month"}
AMOUNT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z][A-Za-z0-9.]*)?\s*$")
AMOUNT_UNIT = re.compile(r"[A-Za-z]")
RELATIVE = re.compile(r"^([0-9]+)([smhdw])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageError(Exception):
    """Bad arguments: exit 2."""


class ApiError(Exception):
    """The API refused (or could not be reached): exit 1."""

    def __init__(self, message: str, errors: list[dict] | None = None, *, status: int = 0) -> None:
        super().__init__(message)
        self.errors = errors or []
        self.status = status


class AdminClient:
    def __init__(self, url: str, token: str | None, *, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self._assets: dict[tuple[str, str], tuple[str, int]] | None = None

    def open(self, method: str, path: str, *, query: dict[str, Any] | None = None, body: Any = None):
        q = {k: v for k, v in (query or {}).items() if v is not None}
        url = self.url + path + (f"?{urllib.parse.urlencode(q)}" if q else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"} | ({"Content-Type": "application/json"} if data is not None else {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                doc = json.loads(raw)
            except ValueError:
                raise ApiError(f"HTTP {exc.code}: {raw[:200].decode(errors='replace')}", status=exc.code) from None
            if exc.code == 401 and not self.token:
                raise ApiError(f"{doc.get('message')} (set BUDGETS_ADMIN_TOKEN or pass --token)", status=401) from None
            message = doc.get("message") or ("invalid request" if exc.code == 422 else doc.get("error")) or f"HTTP {exc.code}"
            raise ApiError(message, doc.get("errors"), status=exc.code) from None
        except OSError as exc:
            raise ApiError(f"cannot reach {self.url}: {getattr(exc, 'reason', exc)}") from None

    def call(self, method: str, path: str, **kw: Any) -> tuple[bytes, Any]:
        with self.open(method, path, **kw) as resp:
            raw = resp.read()
        return raw, (json.loads(raw) if raw else None)

    def assets(self) -> dict[tuple[str, str], tuple[str, int]]:
        if self._assets is None:
            _, doc = self.call("GET", "/v1/assets")
            self._assets = {(a["network"], a["asset"].lower()): (a["symbol"], a["decimals"]) for a in doc["assets"]}
        return self._assets


def _seg(value: str) -> str:
    return urllib.parse.quote(value, safe=":")


def _owner_path(args: argparse.Namespace) -> str:
    return f"/v1/groups/{_seg(args.group)}" if args.group else f"/v1/agents/{_seg(args.agent)}"


# -- argument values --------------------------------------------------------------------------------


def parse_amount(text: str, *, decimals: int | None, unit: tuple[str, int] | None) -> int:
    """Base units ("5000"), a decimal with --decimals ("0.2"), or with the asset's symbol ("5OPG")."""
    m = AMOUNT.match(text)
    if m is None:
        raise UsageError(f"{text!r} is not an amount (base units like 5000, or 0.2 with --decimals, or 5OPG)")
    number, symbol = m.groups()
    if symbol is not None:
        if unit is None or symbol.lower() != unit[0].lower():
            known = f"this asset is {unit[0]}" if unit else "the gateway does not know this asset's symbol"
            raise UsageError(f"{text!r}: unit {symbol} does not match ({known}); use base units or --decimals")
        decimals = unit[1]
    elif "." in number and decimals is None:
        raise UsageError(f"{text!r} is not a whole number of base units; give --decimals D or a unit (e.g. {number}USDC)")
    if decimals is None:
        return int(number)
    with localcontext() as ctx:
        ctx.prec = 200
        scaled = Decimal(number).scaleb(decimals)
    if scaled != scaled.to_integral_value():
        raise UsageError(f"{text!r} is finer than {decimals} decimals")
    return int(scaled)


def parse_when(text: str, now: float) -> str:
    if m := RELATIVE.match(text):
        return str(int(now - int(m.group(1)) * UNIT_S[m.group(2)]))
    if text.replace(".", "", 1).isdigit():
        return text
    try:
        dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{text!r}: give ISO 8601 (2026-01-31T12:00Z), unix seconds, or an age like 1h, 24h, 7d") from None
    return text


def parse_rate(text: str) -> int:
    m = re.fullmatch(r"([0-9]+)(?:/min)?", text.strip())
    if m is None or int(m.group(1)) < 1:
        raise UsageError(f"--rate {text!r}: give calls per minute, e.g. 60/min")
    return int(m.group(1))


def _list(text: str) -> list[str] | None:
    return None if text.strip() in ("*", "any") else [x.strip() for x in text.split(",") if x.strip()]


# -- rendering ---------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _amount(base: str | int | None, shown: str | None) -> str:
    return "-" if base is None else (shown or str(base))


def _asset(client: AdminClient, network: str, asset: str) -> str:
    known = client.assets().get((network, asset.lower()))
    return known[0] if known else asset


def policy_rows(client: AdminClient, items: list[dict]) -> list[list[str]]:
    rows = []
    for it in items:
        p, d = it["policy"], it["display"]
        limits = ", ".join(f"{_amount(lim['amount'], shown)}/{lim['period']}{' rolling' if lim['rolling'] else ''}"
                           for lim, shown in zip(p["limits"], d["limits"])) or "-"
        rate = p["rate_limit"]
        rows.append([it["kind"], it["id"], p["network"], _asset(client, p["network"], p["asset"]), limits,
                     _amount(p["per_call_max"], d["per_call_max"]),
                     f"{rate['per_minute']}/min" + (f" +{rate['burst']}" if rate["burst"] else "") if rate else "-",
                     ",".join(p["allowed_models"]) if p["allowed_models"] is not None else "*",
                     ",".join(p["allowed_routes"]) if p["allowed_routes"] is not None else "*",
                     p["group"] or "-", "suspended" if p["suspended"] else "active"])
    return rows


POLICY_HEADERS = ("KIND", "ID", "NETWORK", "ASSET", "LIMITS", "PER-CALL", "RATE", "MODELS", "ROUTES", "GROUP", "STATE")


# -- commands ----------------------------------------------------------------------------------------


def cmd_set(client: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    path = f"{_owner_path(args)}/policies/{_seg(args.network)}/{_seg(args.asset)}"
    policy: dict[str, Any] = {}
    if not args.replace:
        try:
            _, doc = client.call("GET", path)
            policy = doc["policy"]
        except ApiError as exc:
            if exc.status != 404:
                raise

    def amount(text: str) -> int:
        unit = client.assets().get((args.network, args.asset.lower())) if AMOUNT_UNIT.search(text) else None
        return parse_amount(text, decimals=args.decimals, unit=unit)

    limits = list(policy.get("limits", []))
    for flag, period in PERIODS.items():
        value = getattr(args, flag)
        if value is not None:
            limits = [lim for lim in limits if lim["period"] != period]
            if value != "none":
                limits.append({"period": period, "amount": str(amount(value)), "rolling": args.rolling})
    policy["limits"] = limits
    if args.per_call is not None:
        policy["per_call_max"] = None if args.per_call == "none" else str(amount(args.per_call))
    if args.models is not None:
        policy["allowed_models"] = _list(args.models)
    if args.routes is not None:
        policy["allowed_routes"] = _list(args.routes)
    rate = policy.get("rate_limit")
    if args.rate is not None:
        rate = None if args.rate == "none" else {"per_minute": parse_rate(args.rate), "burst": (rate or {}).get("burst", 0)}
    if args.burst is not None:
        if rate is None:
            raise UsageError("--burst needs a rate limit (--rate N/min)")
        rate = {**rate, "burst": args.burst}
    policy["rate_limit"] = rate
    if args.member_of is not None:
        policy["group"] = None if args.member_of == "none" else args.member_of
    policy.update(network=args.network, asset=args.asset)
    raw, doc = client.call("PUT", path, body=policy)
    _emit(args, out, raw, lambda: table(POLICY_HEADERS, policy_rows(client, [doc])))


def cmd_show(client: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    if args.network and args.asset:
        raw, doc = client.call("GET", f"{_owner_path(args)}/policies/{_seg(args.network)}/{_seg(args.asset)}")
        _emit(args, out, raw, lambda: table(POLICY_HEADERS, policy_rows(client, [doc])))
        return
    raw, doc = client.call("GET", "/v1/policies", query={"group": args.group} if args.group else {"agent": args.agent})
    if not doc["policies"]:
        raise ApiError(f"{'group ' + args.group if args.group else 'agent ' + args.agent} has no policy")
    _emit(args, out, raw, lambda: table(POLICY_HEADERS, policy_rows(client, doc["policies"])))


def cmd_list(client: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    raw, doc = client.call("GET", "/v1/policies")
    _emit(args, out, raw, lambda: table(POLICY_HEADERS, policy_rows(client, doc["policies"]))
          if doc["policies"] else "no policies")


def cmd_usage(client: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    raw, doc = client.call("GET", f"/v1/agents/{_seg(args.agent)}/usage",
                           query={"network": args.network, "asset": args.asset})

    def render() -> str:
        rows = [[b["network"], _asset(client, b["network"], b["asset"]), b["scope"], b["scope_id"],
                 b["period"] + (" rolling" if b["rolling"] else ""), _amount(b["limit"], b["limit_display"]),
                 _amount(b["spent"], b["spent_display"]), _amount(b["reserved"], b["reserved_display"]),
                 _amount(b["remaining"], b["remaining_display"]), b["resets_at"]] for b in doc["budgets"]]
        head = [f"agent {doc['agent']}" + ("  SUSPENDED" if doc["suspended"] else "")]
        for p in doc["policies"]:
            rate = p["rate_limit"]
            head.append(f"  {p['network']} {_asset(client, p['network'], p['asset'])}: "
                        f"{'listed' if p['listed'] else 'default policy'}"
                        f"{', group ' + p['group'] if p['group'] else ''}"
                        f"{', rate ' + str(rate['per_minute']) + '/min' if rate else ''}"
                        f"{', suspended' if p['suspended'] else ''}")
        headers = ("NETWORK", "ASSET", "SCOPE", "ID", "PERIOD", "LIMIT", "SPENT", "RESERVED", "REMAINING", "RESETS AT")
        return "\n".join(head) + "\n" + (table(headers, rows) if rows else "no spend limits")

    _emit(args, out, raw, render)


def cmd_suspension(client: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    body = {"network": args.network, "asset": args.asset} if args.network or args.asset else None
    body = {k: v for k, v in (body or {}).items() if v} or None
    raw, doc = client.call("POST", f"{_owner_path(args)}/{args.command}", body=body)
    _emit(args, out, raw, lambda: "\n".join(
        f"{doc['kind']} {doc['id']} {'suspended' if doc['suspended'] else 'resumed'} on {it['policy']['network']}"
        f" {_asset(client, it['policy']['network'], it['policy']['asset'])}" for it in doc["policies"]))


def cmd_ledger(client: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    now = time.time()
    fmt = "json" if args.json and args.format == "table" else args.format
    query = {"agent": args.agent, "limit": args.limit, "format": "json" if fmt == "table" else fmt,
             "start": parse_when(args.since, now) if args.since else None,
             "end": parse_when(args.until, now) if args.until else None}
    if fmt in ("jsonl", "csv", "json"):
        with client.open("GET", "/v1/ledger", query=query) as resp:
            while chunk := resp.read(65536):
                out.write(chunk.decode())
        if fmt == "json":
            out.write("\n")
        return
    _, doc = client.call("GET", "/v1/ledger", query=query)
    entries = doc["entries"]
    rows = [[e["ts"], e["agent"], e["group"] or "-", e["route"], e["model"] or "-",
             _amount(e["amount"], e["amount_display"]), e["tx_hash"]] for e in entries]
    totals: dict[tuple[str, str], int] = {}
    for e in entries:
        totals[(e["network"], e["asset"])] = totals.get((e["network"], e["asset"]), 0) + int(e["amount"])
    summary = [f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"]
    summary += [f"total {_total(client, n, a, t)} on {n}" for (n, a), t in totals.items()]
    out.write((table(("TIME", "AGENT", "GROUP", "ROUTE", "MODEL", "AMOUNT", "TX"), rows) + "\n" if rows else "")
              + "; ".join(summary) + "\n")


def _total(client: AdminClient, network: str, asset: str, amount: int) -> str:
    known = client.assets().get((network, asset.lower()))
    if known is None:
        return f"{amount} base units of {asset}"
    symbol, decimals = known
    with localcontext() as ctx:
        ctx.prec = 200
        shown = format(Decimal(amount).scaleb(-decimals).normalize(), "f")
    return f"{shown} {symbol} ({amount})"


def _emit(args: argparse.Namespace, out: TextIO, raw: bytes, render) -> None:
    out.write(raw.decode() + "\n" if args.json else render() + "\n")


# -- the parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="x402-budgets", description="Per-agent budgets: the operator's command line"
                                " over the gateway's admin API.")
    p.add_argument("--url", default=os.environ.get("BUDGETS_ADMIN_URL", DEFAULT_URL),
                   help="admin API base URL (env BUDGETS_ADMIN_URL; default %(default)s)")
    p.add_argument("--token", help="bearer token (default: env BUDGETS_ADMIN_TOKEN or BUDGETS_ADMIN_TOKEN_FILE)")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of tables")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def owner(sp: argparse.ArgumentParser, *, group: bool = True, where: bool = True) -> None:
        sp.add_argument("agent", nargs="?", metavar="AGENT", help="the agent's wallet address")
        if group:
            sp.add_argument("--group", metavar="NAME", help="a group instead of an agent")
        if where:
            sp.add_argument("--network", help="CAIP-2 network, e.g. eip155:8453")
            sp.add_argument("--asset", help="token contract address")

    s = sub.add_parser("set", help="create or update a policy (only the options given change)")
    owner(s)
    for flag in PERIODS:
        s.add_argument(f"--{flag}", metavar="X", help=f"{flag} limit (base units; 0.2 with --decimals; 5OPG; none)")
    s.add_argument("--rolling", action="store_true", help="the limits given here are rolling windows")
    s.add_argument("--per-call", metavar="X", help="per-call maximum (or none)")
    s.add_argument("--decimals", type=int, metavar="D", help="amounts are in display units with D decimals")
    s.add_argument("--models", metavar="M1,M2", help="allowed models (* for any)")
    s.add_argument("--routes", metavar="R1,R2", help='allowed routes, e.g. "POST /v1/chat/completions" (* for any)')
    s.add_argument("--rate", metavar="N/min", help="rate limit in calls per minute (or none)")
    s.add_argument("--burst", type=int, metavar="N", help="extra calls allowed at once")
    s.add_argument("--member-of", metavar="GROUP", help="agent policies: the group whose budget also applies (or none)")
    s.add_argument("--replace", action="store_true", help="start from an empty policy instead of the stored one")
    owner(sub.add_parser("show", help="an agent's or group's policies"))
    sub.add_parser("list", help="every policy")
    owner(sub.add_parser("usage", help="spent, reserved and remaining per window"), group=False)
    owner(sub.add_parser("suspend", help="refuse an agent's (or group's) calls until resumed"))
    owner(sub.add_parser("resume", help="lift a suspension"))
    led = sub.add_parser("ledger", help="settled spend")
    led.add_argument("--agent", help="only this agent")
    led.add_argument("--since", metavar="WHEN", help="ISO 8601, unix seconds, or an age: 1h, 24h, 7d (default 24h)")
    led.add_argument("--until", metavar="WHEN", help="same forms (default now)")
    led.add_argument("--limit", type=int, default=1000, help="most entries (default %(default)s, max 100000)")
    led.add_argument("--format", choices=("table", "json", "jsonl", "csv"), default="table")
    return p


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command in ("set", "show", "usage", "suspend", "resume"):
        group = getattr(args, "group", None)
        if (args.agent is None) == (group is None):
            parser.error(f"{args.command}: give an AGENT address or --group NAME (one of them)")
    if args.command == "set" and not (args.network and args.asset):
        parser.error("set: --network and --asset are required")
    if args.command in ("show", "usage") and bool(args.network) != bool(args.asset):
        parser.error(f"{args.command}: give --network and --asset together")
    if args.command == "set" and args.rolling and not any(getattr(args, f) for f in PERIODS):
        parser.error("set: --rolling applies to the limits given with it (--daily …)")


COMMANDS = {"set": cmd_set, "show": cmd_show, "list": cmd_list, "usage": cmd_usage, "suspend": cmd_suspension,
            "resume": cmd_suspension, "ledger": cmd_ledger}


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    parser = build_parser()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
            _check(parser, args)
    except SystemExit as exc:  # argparse: 2 for usage errors, 0 for --help
        return int(exc.code or 0)
    token = args.token
    if token is None:
        from budgets.settings import admin_token

        try:
            secret = admin_token()
        except OSError as exc:
            err.write(f"x402-budgets: error: cannot read BUDGETS_ADMIN_TOKEN_FILE: {exc.strerror}\n")
            return 2
        token = secret.get_secret_value() if secret else None
    client = AdminClient(args.url, token)
    try:
        COMMANDS[args.command](client, args, out)
    except UsageError as exc:
        err.write(f"x402-budgets: error: {exc}\n")
        return 2
    except ApiError as exc:
        err.write(f"error: {exc}\n" + "".join(f"  {e.get('loc')}: {e.get('msg')}\n" for e in exc.errors))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
