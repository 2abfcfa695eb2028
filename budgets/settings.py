"""The `[budgets]` section of the gateway's configuration.

    [budgets]
    store_url = "redis://redis:6379/0"     # default: the embedded SQLite store
    timezone = "Europe/Berlin"            # calendar windows (day, week, month) in this zone
    default = "budget"                    # unlisted wallets: "budget" (default_* below) or "deny"
    default_daily = "1"                   # display units of each accepted asset per day
    default_per_call = "0.1"
    default_rate_per_minute = 60
    lease_calls = 16                      # Redis only: one reserve per 16 calls of an agent (budgets/leases.py); 0: off
    lease_s = 2                           # a lease hands out calls this long, then gives back what is unused

    [[budgets.policies]]                  # loaded at start (GitOps); the admin API persists changes
    agent = "0xAgent…"                    # a group's own policy names group_name = "team-a" instead
    network = "eip155:8453"
    asset = "0xFbC2…"
    limits = [{ period = "day", amount = "5000000000000000000" }]
    per_call_max = "200000000000000000"
    allowed_models = ["gpt-4o"]
    rate_limit = { per_minute = 60, burst = 10 }
    group = "team-a"                      # the agent is a member: team-a's budget applies too

The admin API's bearer token comes from the environment (BUDGETS_ADMIN_TOKEN), or a file
(BUDGETS_ADMIN_TOKEN_FILE, e.g. a mounted Kubernetes secret); never from this file.
"""

from __future__ import annotations

import os
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from budgets.models import GROUP_ID, Limit, Policy, RateLimit


class PolicyEntry(Policy):
    agent: str | None = Field(default=None, pattern=r"^0x[0-9a-fA-F]{40}$")
    group_id: str | None = Field(default=None, alias="group_name")

    @model_validator(mode="after")
    def _one_owner(self) -> PolicyEntry:
        if (self.agent is None) == (self.group_id is None):
            raise ValueError("a policy entry names exactly one of agent or group_name")
        if self.group_id is not None and not GROUP_ID.match(self.group_id):
            raise ValueError("group names are 1-64 of [A-Za-z0-9_.-]")
        return self

    def owner(self) -> tuple[str, str]:
        return ("agent", self.agent.lower()) if self.agent else ("group", self.group_id or "")

    def policy(self) -> Policy:
        return Policy.model_validate(self.model_dump(exclude={"agent", "group_id"}))


class BudgetSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    store_url: str | None = None  # None: the embedded store next to the gateway's records
    store_prefix: str = "x402b:"
    timezone: str = "UTC"
    hold_s: float = Field(default=600.0, gt=0, description="a reservation not committed by then is released")
    # budget leases (budgets/leases.py; Redis only): one reserve for this many calls of an agent,
    # handed out by this replica for at most lease_s; 0: every call reserves on its own
    lease_calls: int = Field(default=0, ge=0, le=10_000)
    lease_s: float = Field(default=2.0, gt=0, le=60)
    default: Literal["deny", "budget"] = "budget"
    default_daily: str = "1"
    default_per_call: str | None = None
    default_rate_per_minute: int | None = Field(default=60, ge=1)
    policies: list[PolicyEntry] = Field(default_factory=list)
    admin_prefix: str = Field(default="/admin", pattern=r"^/[A-Za-z0-9_/-]*$")
    # network -> JSON-RPC URL that reconciliation reads Transfer logs from (the in-process
    # facilitator's own chains are used for networks not named here)
    rpc_urls: dict[str, str] = Field(default_factory=dict)
    # The periodic reconciliation (budgets/reconcile.py ReconcileJob) that keeps the
    # ledger-vs-chain gauge current: every this often (0: only on demand), over the trailing
    # window of blocks ending `reconcile_lag_blocks` before the head.
    reconcile_every_s: float = Field(default=600.0, ge=0)
    reconcile_window_blocks: int = Field(default=1800, ge=1)
    reconcile_lag_blocks: int = Field(default=30, ge=0)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v

    def default_policy(self, network: str, asset: str, decimals: int) -> Policy:
        scale = Decimal(10) ** decimals
        return Policy(
            network=network,
            asset=asset,
            limits=[Limit(period="day", amount=int(Decimal(self.default_daily) * scale))],
            per_call_max=int(Decimal(self.default_per_call) * scale) if self.default_per_call else None,
            rate_limit=RateLimit(per_minute=self.default_rate_per_minute) if self.default_rate_per_minute else None,
        )


def admin_token(env: dict[str, str] | None = None) -> SecretStr | None:
    env = dict(os.environ) if env is None else env
    if token := env.get("BUDGETS_ADMIN_TOKEN"):
        return SecretStr(token)
    if path := env.get("BUDGETS_ADMIN_TOKEN_FILE"):
        with open(path) as fh:
            return SecretStr(fh.read().strip())
    return None
