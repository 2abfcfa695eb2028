"""The CLI's arguments: the parser, the checks argparse cannot express, and the argument values
(amounts, times, rates, lists) turned into what the API takes."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
from decimal import Decimal, localcontext

DEFAULT_URL = "http://127.0.0.1:8402/admin"
PERIODS = {"hourly": "hour", "daily": "day", "weekly": "week", "monthly": "month"}
AMOUNT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z][A-Za-z0-9.]*)?\s*$")
AMOUNT_UNIT = re.compile(r"[A-Za-z]")
RELATIVE = re.compile(r"^([0-9]+)([smhdw])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageError(Exception):
    """Bad arguments: exit 2."""


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
    rec = sub.add_parser("reconcile", help="the ledger against on-chain transfers to the payee over a block range")
    rec.add_argument("--from", dest="from_block", type=int, required=True, metavar="BLOCK", help="first block")
    rec.add_argument("--to", dest="to_block", type=int, required=True, metavar="BLOCK", help="last block")
    rec.add_argument("--network", help="CAIP-2 network (needed when the gateway has several)")
    return p


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot say: one owner, options that go together (exits 2 like argparse)."""
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
        raise UsageError(f"{text!r} is not a whole number of base units; give --decimals D or a unit"
                         f" (e.g. {number}USDC)")
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
        raise UsageError(f"{text!r}: give ISO 8601 (2026-01-31T12:00Z), unix seconds,"
                         " or an age like 1h, 24h, 7d") from None
    return text


def parse_rate(text: str) -> int:
    m = re.fullmatch(r"([0-9]+)(?:/min)?", text.strip())
    if m is None or int(m.group(1)) < 1:
        raise UsageError(f"--rate {text!r}: give calls per minute, e.g. 60/min")
    return int(m.group(1))


def parse_list(text: str) -> list[str] | None:
    """"a,b" -> ["a", "b"]; "*" or "any" -> None (anything allowed)."""
    return None if text.strip() in ("*", "any") else [x.strip() for x in text.split(",") if x.strip()]
