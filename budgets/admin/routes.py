"""The admin API's route table: the app serves it (app.py) and the OpenAPI document describes it
(openapi.py), so the two cannot drift apart."""

from __future__ import annotations

_P = "/v1/agents/{address}/policies/{network}/{asset}"
_G = "/v1/groups/{group}/policies/{network}/{asset}"
ROUTES: list[tuple[str, str, str, str]] = [  # (method, path, handler, summary)
    ("GET", "/openapi.json", "openapi", "This document"),
    ("GET", "/v1/healthz", "healthz", "Liveness (no token needed)"),
    ("GET", "/v1/assets", "assets_list", "Known assets: symbol and decimals for display"),
    ("GET", "/v1/policies", "list_policies", "All policies (filter with ?agent= or ?group=)"),
    ("GET", _P, "get_policy", "An agent's policy on one network and asset"),
    ("PUT", _P, "put_policy", "Create or replace an agent's policy (201 created, 200 replaced)"),
    ("DELETE", _P, "delete_policy", "Delete an agent's policy"),
    ("GET", _G, "get_policy", "A group's policy on one network and asset"),
    ("PUT", _G, "put_policy", "Create or replace a group's policy (201 created, 200 replaced)"),
    ("DELETE", _G, "delete_policy", "Delete a group's policy"),
    ("GET", "/v1/agents/{address}/usage", "usage", "Spent, reserved and remaining per window, with reset times"),
    ("POST", "/v1/agents/{address}/suspend", "suspend", "Suspend an agent (all its policies, or one network/asset)"),
    ("POST", "/v1/agents/{address}/resume", "resume", "Resume an agent"),
    ("POST", "/v1/groups/{group}/suspend", "suspend", "Suspend every agent of a group"),
    ("POST", "/v1/groups/{group}/resume", "resume", "Resume a group"),
    ("GET", "/v1/ledger", "ledger", "Settled spend, by agent and time range, as JSON, JSON lines or CSV"),
    ("GET", "/v1/reconcile", "reconcile", "The ledger against Transfer logs to the payee over a block range (?from=&to=)"),
    ("GET", "/v1/ledger/summary", "ledger_summary",
     "Settled spend summed per asset (or per agent and asset), optionally in time buckets"),
]
