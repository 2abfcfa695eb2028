"""The CLI's commands: each calls the admin API through AdminClient and prints the API's JSON
(--json) or a table from render.py."""

from __future__ import annotations

import argparse
import codecs
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from budgets.admin_client import AdminApiError, AdminClient, Owner, Reply
from budgets.amounts import Assets
from budgets.cli.parser import AMOUNT_UNIT, PERIODS, UsageError, parse_amount, parse_list, parse_rate, parse_when
from budgets.cli.render import ledger_text, policies_table, reconcile_text, suspension_text, usage_text

Command = Callable[[AdminClient, argparse.Namespace, TextIO], Awaitable[None]]


def _owner(args: argparse.Namespace) -> Owner:
    return Owner.group(args.group) if args.group else Owner.agent(args.agent)


async def _emit(client: AdminClient, args: argparse.Namespace, out: TextIO, reply: Reply,
                render: Callable[[Any, Assets], str]) -> None:
    out.write(reply.text + "\n" if args.json else render(reply.json(), await client.assets()) + "\n")


async def cmd_set(client: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    owner = _owner(args)
    policy: dict[str, Any] = {}
    if not args.replace:
        try:
            policy = (await client.get_policy(owner, args.network, args.asset)).json()["policy"]
        except AdminApiError as exc:
            if exc.status != 404:
                raise
    unit = await _unit(client, args)
    policy = apply_options(policy, args, lambda text: parse_amount(text, decimals=args.decimals, unit=unit))
    reply = await client.put_policy(owner, args.network, args.asset, policy)
    await _emit(client, args, out, reply, lambda doc, assets: policies_table([doc], assets))


async def _unit(client: AdminClient, args: argparse.Namespace) -> tuple[str, int] | None:
    """The asset's (symbol, decimals), asked for only when an amount is written with a symbol."""
    texts = [getattr(args, flag) for flag in PERIODS] + [args.per_call]
    if not any(text not in (None, "none") and AMOUNT_UNIT.search(text) for text in texts):
        return None
    return (await client.assets()).get((args.network, args.asset.lower()))


def apply_options(policy: dict[str, Any], args: argparse.Namespace, amount: Callable[[str], int]) -> dict[str, Any]:
    """The PUT body: the stored policy (or an empty one) with only the options given changed."""
    policy = dict(policy)
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
        policy["allowed_models"] = parse_list(args.models)
    if args.routes is not None:
        policy["allowed_routes"] = parse_list(args.routes)
    rate = policy.get("rate_limit")
    if args.rate is not None:
        rate = None if args.rate == "none" else {"per_minute": parse_rate(args.rate),
                                                 "burst": (rate or {}).get("burst", 0)}
    if args.burst is not None:
        if rate is None:
            raise UsageError("--burst needs a rate limit (--rate N/min)")
        rate = {**rate, "burst": args.burst}
    policy["rate_limit"] = rate
    if args.member_of is not None:
        policy["group"] = None if args.member_of == "none" else args.member_of
    policy.update(network=args.network, asset=args.asset)
    return policy


async def cmd_show(client: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    if args.network and args.asset:
        reply = await client.get_policy(_owner(args), args.network, args.asset)
        await _emit(client, args, out, reply, lambda doc, assets: policies_table([doc], assets))
        return
    reply = await (client.policies(group=args.group) if args.group else client.policies(agent=args.agent))
    if not reply.json()["policies"]:
        raise AdminApiError(f"{'group ' + args.group if args.group else 'agent ' + args.agent} has no policy")
    await _emit(client, args, out, reply, lambda doc, assets: policies_table(doc["policies"], assets))


async def cmd_list(client: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    reply = await client.policies()
    if not (args.json or reply.json()["policies"]):
        out.write("no policies\n")
        return
    await _emit(client, args, out, reply, lambda doc, assets: policies_table(doc["policies"], assets))


async def cmd_usage(client: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    reply = await client.usage(args.agent, network=args.network, asset=args.asset)
    await _emit(client, args, out, reply, usage_text)


async def cmd_suspension(client: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    change = client.suspend if args.command == "suspend" else client.resume
    reply = await change(_owner(args), network=args.network, asset=args.asset)
    await _emit(client, args, out, reply, suspension_text)


async def cmd_ledger(client: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    now = time.time()
    fmt = "json" if args.json and args.format == "table" else args.format
    query = {"agent": args.agent, "limit": args.limit, "format": "json" if fmt == "table" else fmt,
             "start": parse_when(args.since, now) if args.since else None,
             "end": parse_when(args.until, now) if args.until else None}
    if fmt in ("jsonl", "csv", "json"):  # the API's own bytes, as they arrive
        decoder = codecs.getincrementaldecoder("utf-8")()
        async for chunk in client.ledger_stream(**query):
            out.write(decoder.decode(chunk))
        out.write(decoder.decode(b"", final=True) + ("\n" if fmt == "json" else ""))
        return
    entries = (await client.ledger(**query)).json()["entries"]
    out.write(ledger_text(entries, await client.assets() if entries else {}) + "\n")


async def cmd_reconcile(client: AdminClient, args: argparse.Namespace, out: TextIO) -> None:
    reply = await client.reconcile(args.from_block, args.to_block, network=args.network)
    await _emit(client, args, out, reply, reconcile_text)


COMMANDS: dict[str, Command] = {"set": cmd_set, "show": cmd_show, "list": cmd_list, "usage": cmd_usage,
                                "suspend": cmd_suspension, "resume": cmd_suspension, "ledger": cmd_ledger,
                                "reconcile": cmd_reconcile}
