"""Budget policies and the values enforcement works with. Money is an int in the asset's base
units, everywhere.

A policy applies to one agent wallet (the verified payer) or one group, on one network and
asset. An agent belongs to at most one group; a call must fit the agent's budget and its
group's. Windows are calendar windows in the operator's time zone (the hour, day, ISO week or
month in progress) or rolling windows (the last hour/day/week/30 days, at 1/60 resolution; spend
counts for between one and 61/60 of the window, never less).

A limit added mid-window sees the spend already made in it: the enforcer's commit passes every
period's window (`commit_windows`); SQLite counts in all of them, Redis in those the budget is
limited by plus the spend of each hour, from which it rebuilds a window limited later
(budgets/lua.py).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
GROUP_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
Period = Literal["hour", "day", "week", "month"]
PERIOD_SECONDS = {"hour": 3600, "day": 86400, "week": 7 * 86400, "month": 30 * 86400}
ROLLING_BUCKETS = 60
MAX_AMOUNT = 2**256 - 1


def _amount(value: object) -> object:
    """Base units: a whole number, or a string of ASCII digits only ("1_000", " 5", "+5", "1e3"
    and true are refused, where lax int parsing would take them)."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            raise ValueError("amounts are whole numbers of base units, as a string of digits")
        value = int(value) if len(value.lstrip("0")) <= 78 else MAX_AMOUNT + 1
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_AMOUNT:
        raise ValueError("amounts are at most 2^256 - 1")
    return value  # strict int validation refuses bools, floats and the rest


Amount = Annotated[int, BeforeValidator(_amount), Field(ge=0)]


class _Model(BaseModel):
    # Strict: "yes" is not a boolean and "60" not an integer (policies come from operators' JSON
    # and TOML, where a silent coercion would grant a budget nobody wrote).
    model_config = ConfigDict(extra="forbid", strict=True)


class Limit(_Model):
    period: Period
    amount: Amount = Field(description="most that may be spent in the window, in base units")
    rolling: bool = Field(default=False, description="rolling window instead of the calendar one")


class RateLimit(_Model):
    per_minute: int = Field(ge=1, le=1_000_000)
    burst: int = Field(default=0, ge=0, le=1_000_000, description="extra calls allowed at once (0: per_minute)")


class Policy(_Model):
    """What one agent (or group) may spend on one network and asset."""

    network: str = Field(pattern=r"^eip155:[0-9]+$")
    asset: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$")
    limits: list[Limit] = Field(default_factory=list)
    per_call_max: Amount | None = None
    allowed_routes: list[str] | None = Field(default=None, description='route ids ("POST /v1/chat/completions")')
    allowed_models: list[str] | None = None
    rate_limit: RateLimit | None = None
    suspended: bool = False
    group: str | None = Field(default=None, description="agent policies: the group whose budget also applies")

    @field_validator("asset")
    @classmethod
    def _lower_asset(cls, v: str) -> str:
        return v.lower()

    @field_validator("group")
    @classmethod
    def _group_id(cls, v: str | None) -> str | None:
        if v is not None and not GROUP_ID.match(v):
            raise ValueError("group ids are 1-64 of [A-Za-z0-9_.-]")
        return v


class DefaultPolicy(_Model):
    """For wallets the operator has not listed: deny them, or give each a (small) budget."""

    mode: Literal["deny", "budget"] = "budget"
    policy: Policy | None = None


@dataclass(frozen=True, slots=True)
class Scope:
    """One budget: an agent's or a group's, on a network and asset. `tag` is the Redis Cluster
    hash tag shared by everything one atomic script touches (the group if any, else the agent)."""

    kind: Literal["agent", "group"]
    id: str
    network: str
    asset: str
    tag: str

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.id}:{self.network}:{self.asset}"


@dataclass(frozen=True, slots=True)
class Window:
    """A limit resolved at a moment: which counter it uses and when it resets."""

    period: str
    rolling: bool
    limit: int
    key: str  # calendar: the window's id (e.g. "day:2026-11-24"); rolling: "roll:day"
    bucket: int  # rolling: the current bucket number; calendar: 0
    bucket_s: int  # rolling: bucket length in seconds
    resets_at: float  # unix seconds when the window (calendar) or its oldest bucket (rolling) rolls over
    ttl_s: int  # how long the counter must live
    start: float = 0.0  # unix seconds when the window (calendar) or its oldest bucket (rolling) began


def commit_windows(limits: list[Limit], now: float, tz: ZoneInfo) -> list[Window]:
    """The windows a commit must count in: the policy's and every other period's."""
    configured = {(lim.period, lim.rolling) for lim in limits}
    extra = [Limit(period=p, amount=0, rolling=r) for r in (False, True) for p in ("hour", "day", "week", "month")
             if (p, r) not in configured]
    return resolve_windows(limits + extra, now, tz)


def resolve_windows(limits: list[Limit], now: float, tz: ZoneInfo) -> list[Window]:
    out: list[Window] = []
    local = dt.datetime.fromtimestamp(now, tz)
    for lim in limits:
        length = PERIOD_SECONDS[lim.period]
        if lim.rolling:
            bucket_s = length // ROLLING_BUCKETS
            bucket = int(now // bucket_s)
            # Spend in bucket b counts until bucket b + 61 starts: at least a full window, never less.
            out.append(Window(lim.period, True, lim.amount, f"roll:{lim.period}", bucket, bucket_s,
                              (bucket + 1) * bucket_s, length + 3 * bucket_s, (bucket - ROLLING_BUCKETS) * bucket_s))
            continue
        if lim.period == "hour":
            start = local.replace(minute=0, second=0, microsecond=0)
            end = start + dt.timedelta(hours=1)
        elif lim.period == "day":
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
            end = (start + dt.timedelta(days=1, hours=2)).replace(hour=0)  # DST-safe next midnight
        elif lim.period == "week":
            start = (local - dt.timedelta(days=local.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
            end = (start + dt.timedelta(days=7, hours=2)).replace(hour=0)
        else:
            start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            end = (start + dt.timedelta(days=32)).replace(day=1)
        start = start.replace(tzinfo=tz)
        end = end.replace(tzinfo=tz)
        out.append(Window(lim.period, False, lim.amount, f"{lim.period}:{start.strftime('%Y-%m-%dT%H')}", 0, 0,
                          end.timestamp(), int(end.timestamp() - now) + 3600, start.timestamp()))
    return out


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    scopes: tuple[Scope, ...]
    amount: int
    expires_at: float


def hold_id_for(request_id: str) -> str:
    """A hold's id: the request's, made unique. A request id may come from the client
    (X-Request-Id): two calls sent with one must not share a hold (a reserve of an id replaces
    that hold) nor a settlement intent (keyed by the hold)."""
    return f"{request_id}.{os.urandom(6).hex()}"


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation the gateway must end with exactly one commit or release."""

    id: str
    agent: str
    network: str
    asset: str
    amount: int
    route: str
    model: str | None
    group: str | None = None
    reserved_at: float = 0.0  # the enforcer's clock when reserved (0: unknown, as if long ago)
    lease: str = ""  # the lease it was handed out of (budgets/leases.py), else "": a hold of its own


class BudgetReason(StrEnum):
    """Why budgets refuse a call (the `error` an agent gets)."""

    BUDGET_EXCEEDED = "budget_exceeded"
    PER_CALL_LIMIT = "per_call_limit"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    ROUTE_NOT_ALLOWED = "route_not_allowed"
    RATE_LIMITED = "rate_limited"
    AGENT_SUSPENDED = "agent_suspended"
    AGENT_NOT_ALLOWED = "agent_not_allowed"
    BUDGET_STORE_UNAVAILABLE = "budget_store_unavailable"


@dataclass
class Refusal(Exception):
    """Why a call does not fit; `status` 402 for money, 429 for rate, 503 store down."""

    reason: str  # budget_exceeded, per_call_limit, model_not_allowed, route_not_allowed, rate_limited,
    # agent_suspended, agent_not_allowed, budget_store_unavailable
    message: str
    status: int = 402
    scope: str | None = None
    remaining: int | None = None
    resets_at: float | None = None
    retry_after_s: int | None = None


@dataclass
class BudgetUsage:
    scope: str
    period: str
    rolling: bool
    limit: int
    spent: int
    reserved: int
    remaining: int
    resets_at: float


@dataclass
class LedgerEntry:
    ts: float
    agent: str
    group: str | None
    route: str
    model: str | None
    amount: int
    asset: str
    network: str
    tx_hash: str
    request_id: str
    extra: dict = field(default_factory=dict)
