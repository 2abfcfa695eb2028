"""What the admin API accepts: path and query parameters, policy bodies, suspension bodies and
ledger queries, checked into plain values or an InvalidRequestError naming each bad field."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from pydantic import ValidationError
from starlette.requests import Request

from budgets.admin.errors import InvalidRequestError, invalid
from budgets.models import ADDRESS, GROUP_ID, LedgerEntry, Policy

MAX_AMOUNT = 2**256 - 1
LEDGER_MAX = 100_000
LEDGER_FORMATS = ("json", "jsonl", "csv")
LEDGER_FILTERS = ("group", "route", "model", "asset", "network")
MUST = {"address": "must be an address (0x + 40 hex digits)",
        "asset": "must be an asset address (0x + 40 hex digits)",
        "network": "must be a CAIP-2 EVM network (eip155:<chain id>)",
        "group": "must be a group id (1-64 of A-Za-z0-9_.-)"}


def is_network(value: str) -> bool:
    head, _, chain = value.partition(":")
    return head == "eip155" and chain.isascii() and chain.isdigit()


# -- path parameters -------------------------------------------------------------------------------


def path_param(request: Request, name: str) -> str:
    value: str = request.path_params[name]
    ok = is_network(value) if name == "network" else bool((GROUP_ID if name == "group" else ADDRESS).match(value))
    if not ok:
        raise invalid(f"path.{name}", MUST[name])
    return value.lower() if name in ("address", "asset") else value


def owner_of(request: Request) -> tuple[str, str]:
    """("agent", address) or ("group", name) from the path."""
    if "address" in request.path_params:
        return "agent", path_param(request, "address")
    return "group", path_param(request, "group")


def policy_target(request: Request) -> tuple[str, str, str, str]:
    """(kind, owner, network, asset) of a .../policies/{network}/{asset} path."""
    return *owner_of(request), path_param(request, "network"), path_param(request, "asset")


# -- query parameters ------------------------------------------------------------------------------


def parse_policy_filter(query: Mapping[str, str]) -> tuple[str, str] | None:
    """?agent= or ?group= of GET /v1/policies as the (kind, owner) wanted; None for all."""
    agent, group = query.get("agent"), query.get("group")
    if agent is not None and not ADDRESS.match(agent):
        raise invalid("query.agent", MUST["address"])
    if group is not None and not GROUP_ID.match(group):
        raise invalid("query.group", MUST["group"])
    return ("agent", agent.lower()) if agent else ("group", group) if group else None


def parse_usage_query(query: Mapping[str, str]) -> tuple[str, str] | None:
    """?network=&asset= of GET .../usage (both or neither) as (network, lowercase asset)."""
    network, asset = query.get("network"), query.get("asset")
    if (network is None) != (asset is None):
        raise invalid("query", "give both network and asset, or neither")
    if network is not None and not is_network(network):
        raise invalid("query.network", MUST["network"])
    if asset is not None and not ADDRESS.match(asset):
        raise invalid("query.asset", MUST["asset"])
    return (network, asset.lower()) if network and asset else None


@dataclass(frozen=True)
class LedgerQuery:
    agent: str | None
    start: float
    end: float
    limit: int
    format: str
    # Narrowing by entry field (the operator's console filters on them): equal values only.
    where: tuple[tuple[str, str], ...] = ()

    def matches(self, entry: LedgerEntry) -> bool:
        return all((getattr(entry, name) or "").lower() == value for name, value in self.where)

    @classmethod
    def parse(cls, query: Mapping[str, str], now: float) -> LedgerQuery:
        """Defaults: the last 24 hours up to now, 1000 entries, JSON."""
        agent = query.get("agent")
        if agent is not None and not ADDRESS.match(agent):
            raise invalid("query.agent", MUST["address"])
        end = parse_time(query["end"], "query.end") if "end" in query else now
        start = parse_time(query["start"], "query.start") if "start" in query else end - 86400
        if start > end:
            raise invalid("query.start", "must not be after end")
        raw_limit = query.get("limit", "1000")
        if not (raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= LEDGER_MAX):
            raise invalid("query.limit", f"must be a whole number from 1 to {LEDGER_MAX}")
        fmt = query.get("format", "json")
        if fmt not in LEDGER_FORMATS:
            raise invalid("query.format", "must be json, jsonl or csv")
        where = []
        for name in LEDGER_FILTERS:
            value = query.get(name)
            if value:
                if name == "asset" and not ADDRESS.match(value):
                    raise invalid("query.asset", MUST["asset"])
                if name == "network" and not is_network(value):
                    raise invalid("query.network", MUST["network"])
                if name == "group" and not GROUP_ID.match(value):
                    raise invalid("query.group", MUST["group"])
                where.append((name, value.lower()))
        return cls(agent, start, end, int(raw_limit), fmt, tuple(where))


SUMMARY_MAX_BUCKETS = 1000
SUMMARY_BY = ("asset", "agent")


@dataclass(frozen=True)
class SummaryQuery:
    """GET /v1/ledger/summary: the ledger query's selection (agent, time, filters), grouped by
    asset or by agent and asset, optionally in time buckets of `bucket_s` seconds."""

    ledger: LedgerQuery
    by: str
    bucket_s: int | None

    @classmethod
    def parse(cls, query: Mapping[str, str], now: float) -> SummaryQuery:
        q = LedgerQuery.parse({k: v for k, v in query.items() if k not in ("by", "bucket_s")}, now)
        by = query.get("by", "asset")
        if by not in SUMMARY_BY:
            raise invalid("query.by", "must be asset or agent")
        raw = query.get("bucket_s")
        if raw is None:
            return cls(q, by, None)
        if not (raw.isascii() and raw.isdigit() and 60 <= int(raw) <= 31 * 86400):
            raise invalid("query.bucket_s", "must be whole seconds from 60 to 2678400")
        if (q.end - q.start) / int(raw) > SUMMARY_MAX_BUCKETS:
            raise invalid("query.bucket_s", f"at most {SUMMARY_MAX_BUCKETS} buckets between start and end")
        return cls(q, by, int(raw))


def parse_time(value: str, loc: str) -> float:
    """ISO 8601 (naive means UTC) or unix seconds."""
    try:
        return float(value) if value.replace(".", "", 1).isdigit() else _iso_seconds(value)
    except (ValueError, OverflowError):
        raise invalid(loc, "must be ISO 8601 (2026-01-31T12:00:00Z) or unix seconds") from None


def _iso_seconds(value: str) -> float:
    parsed = dt.datetime.fromisoformat(value)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()


# -- bodies ----------------------------------------------------------------------------------------


def parse_suspension(body: dict) -> tuple[str | None, str | None]:
    """A suspend/resume body: optional network and asset (as given) that limit the change."""
    unknown = sorted(set(body) - {"network", "asset"})
    if unknown:
        raise InvalidRequestError([{"loc": f"body.{k}", "msg": "unknown field"} for k in unknown])
    network, asset = body.get("network"), body.get("asset")
    if network is not None and not (isinstance(network, str) and is_network(network)):
        raise invalid("body.network", MUST["network"])
    if asset is not None and not (isinstance(asset, str) and ADDRESS.match(asset)):
        raise invalid("body.asset", MUST["asset"])
    return network, asset


def parse_policy(body: dict, kind: str, network: str, asset: str) -> Policy:
    """A PUT body as a Policy: network and asset may be omitted (taken from the path) but must
    match it when given."""
    errors: list[dict[str, str]] = []
    doc = dict(body)
    for name, want in (("network", network), ("asset", asset)):
        given = doc.setdefault(name, want)
        if isinstance(given, str) and given.lower() != want.lower():
            errors.append({"loc": f"body.{name}", "msg": f"must equal the path's {name} ({want}) or be omitted"})
    if kind == "group" and doc.get("group") is not None:
        errors.append({"loc": "body.group", "msg": "a group's policy cannot belong to another group"})
    if isinstance(doc.get("limits"), list):
        doc["limits"] = [dict(lim) if isinstance(lim, dict) else lim for lim in doc["limits"]]
        for i, lim in enumerate(doc["limits"]):
            if isinstance(lim, dict) and "amount" in lim:
                lim["amount"] = _amount(lim["amount"], f"body.limits.{i}.amount", errors)
    if doc.get("per_call_max") is not None:
        doc["per_call_max"] = _amount(doc["per_call_max"], "body.per_call_max", errors)
    try:
        policy = Policy.model_validate(doc)
    except ValidationError as exc:
        seen = {e["loc"] for e in errors}
        errors += [e for e in ({"loc": ".".join(["body", *map(str, err["loc"])]), "msg": err["msg"]}
                               for err in exc.errors(include_url=False)) if e["loc"] not in seen]
    if errors:
        raise InvalidRequestError(errors)
    return policy


def _amount(value: object, loc: str, errors: list[dict[str, str]]) -> object:
    """The wire form of an amount: digits in a string, or a whole JSON number. Sizes are checked
    before converting ("1e100000000" costs nothing); a refused value is replaced by 0 so that
    pydantic never converts it."""
    if isinstance(value, (list, dict)) or value is None:
        return value  # pydantic names the type error
    if isinstance(value, float):
        value = Decimal(value) if value == value and abs(value) != float("inf") else "nan"
    if isinstance(value, Decimal) and value == value.to_integral_value():
        value = int(value) if value.adjusted() < 78 else MAX_AMOUNT + 1
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value) if len(value.lstrip("0")) <= 78 else MAX_AMOUNT + 1
    if not isinstance(value, int) or isinstance(value, bool):
        errors.append({"loc": loc, "msg": "amounts are whole numbers of base units, as a string of digits"})
        return 0
    if value > MAX_AMOUNT:
        errors.append({"loc": loc, "msg": "amounts are at most 2^256 - 1"})
        return 0
    return value


def parse_block_range(query: Mapping[str, str]) -> tuple[int, int, str | None]:
    """?from=&to=[&network=] of GET /v1/reconcile: block numbers, from <= to."""
    blocks = []
    for name in ("from", "to"):
        text = query.get(name, "")
        if not text.isdigit() or len(text) > 15:
            raise invalid(f"query.{name}", "a block number is required (decimal)")
        blocks.append(int(text))
    if blocks[0] > blocks[1]:
        raise invalid("query.from", "from must be at most to")
    network = query.get("network")
    if network is not None and not is_network(network):
        raise invalid("query.network", MUST["network"])
    return blocks[0], blocks[1], network
