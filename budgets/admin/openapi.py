"""The admin API's OpenAPI 3.1 document, built from the route table that serves it, the Policy
model's JSON schema and the request limits."""

from __future__ import annotations

from budgets.admin.bodies import MAX_BODY_BYTES
from budgets.admin.requests import LEDGER_MAX
from budgets.admin.responses import LEDGER_COLUMNS
from budgets.admin.routes import ROUTES
from budgets.models import ADDRESS, GROUP_ID, Policy

_AMOUNT_OUT = {"type": "string", "pattern": "^[0-9]+$", "description": "base units"}
_AMOUNT_IN = {"anyOf": [{"type": "string", "pattern": "^[0-9]{1,78}$"}, {"type": "integer", "minimum": 0}],
              "description": "base units: a string of digits (or a whole JSON number)"}
_DISPLAY = {"type": ["string", "null"], "description": 'e.g. "5 OPG"; null when the asset is unknown'}
_PARAMS = {
    "address": {"type": "string", "pattern": ADDRESS.pattern},
    "asset": {"type": "string", "pattern": ADDRESS.pattern},
    "network": {"type": "string", "pattern": "^eip155:[0-9]+$"},
    "group": {"type": "string", "pattern": GROUP_ID.pattern},
}
_QUERY: dict[str, dict[str, dict]] = {
    "list_policies": {"agent": _PARAMS["address"], "group": _PARAMS["group"]},
    "usage": {"network": _PARAMS["network"], "asset": _PARAMS["asset"]},
    "ledger": {"agent": _PARAMS["address"],
               "start": {"type": "string", "description": "ISO 8601 or unix seconds (default: end - 24 h)"},
               "end": {"type": "string", "description": "ISO 8601 or unix seconds (default: now)"},
               "limit": {"type": "integer", "minimum": 1, "maximum": LEDGER_MAX, "default": 1000},
               "format": {"type": "string", "enum": ["json", "jsonl", "csv"], "default": "json"},
               "group": {**_PARAMS["group"], "description": "only entries of this group"},
               "route": {"type": "string", "description": 'only this route id ("POST /v1/chat/completions")'},
               "model": {"type": "string", "description": "only this model"},
               "asset": {**_PARAMS["asset"], "description": "only this asset"},
               "network": {**_PARAMS["network"], "description": "only this network"}},
    "ledger_summary": {"agent": _PARAMS["address"],
                       "start": {"type": "string", "description": "ISO 8601 or unix seconds (default: end - 24 h)"},
                       "end": {"type": "string", "description": "ISO 8601 or unix seconds (default: now)"},
                       "by": {"type": "string", "enum": ["asset", "agent"], "default": "asset"},
                       "bucket_s": {"type": "integer", "minimum": 60, "maximum": 31 * 86400,
                                    "description": "per-bucket counts, buckets aligned to multiples of it (at most 1000)"},
                       "group": _PARAMS["group"], "route": {"type": "string"}, "model": {"type": "string"},
                       "asset": _PARAMS["asset"], "network": _PARAMS["network"]},
    "reconcile": {"from": {"type": "integer", "minimum": 0, "description": "first block (required)"},
                  "to": {"type": "integer", "minimum": 0, "description": "last block (required)"},
                  "network": {**_PARAMS["network"], "description": "required when the gateway has several"}},
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": required or list(props)}


def _schemas() -> dict:
    policy = Policy.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = policy.pop("$defs", {})
    defs["Limit"]["properties"]["amount"] = _AMOUNT_IN
    policy["properties"]["per_call_max"] = {"anyOf": [_AMOUNT_IN, {"type": "null"}], "default": None}
    policy["description"] = ("What one agent (or group) may spend on one network and asset. In a PUT, network and"
                             " asset may be omitted (taken from the path).")
    policy["required"] = []
    usage_row = {"network": {"type": "string"}, "asset": {"type": "string"},
                 "scope": {"enum": ["agent", "group"]}, "scope_id": {"type": "string"},
                 "period": {"enum": ["hour", "day", "week", "month"]}, "rolling": {"type": "boolean"},
                 "resets_at": {"type": "string", "format": "date-time"}}
    for name in ("limit", "spent", "reserved", "remaining"):
        usage_row |= {name: _AMOUNT_OUT, f"{name}_display": _DISPLAY}
    entry = {"ts": {"type": "string", "format": "date-time"}, "ts_unix": {"type": "number"},
             "agent": {"type": "string"}, "group": {"type": ["string", "null"]}, "route": {"type": "string"},
             "model": {"type": ["string", "null"]}, "amount": _AMOUNT_OUT, "amount_display": _DISPLAY,
             "asset": {"type": "string"}, "network": {"type": "string"}, "tx_hash": {"type": "string"},
             "request_id": {"type": "string"}, "extra": {"type": "object"}}
    item = _obj({"kind": {"enum": ["agent", "group"]}, "id": {"type": "string"}, "policy": _ref("Policy"),
                 "display": _obj({"limits": {"type": "array", "items": _DISPLAY}, "per_call_max": _DISPLAY})})
    return defs | {
        "Policy": policy,
        "PolicyItem": item,
        "PolicyList": _obj({"policies": {"type": "array", "items": _ref("PolicyItem")}}),
        "Assets": _obj({"assets": {"type": "array", "items": _obj({"network": {"type": "string"},
                        "asset": {"type": "string"}, "symbol": {"type": "string"}, "decimals": {"type": "integer"}})}}),
        "Usage": _obj({"agent": {"type": "string"}, "budgets": {"type": "array", "items": _obj(usage_row)},
                       "suspended": {"type": "boolean"},
                       "rate_limit": {"anyOf": [_ref("RateLimit"), {"type": "null"}],
                                      "description": "the policy's rate limit when the answer covers one policy"},
                       "policies": {"type": "array", "items": _obj({
                           "network": {"type": "string"}, "asset": {"type": "string"}, "listed": {"type": "boolean"},
                           "group": {"type": ["string", "null"]}, "suspended": {"type": "boolean"},
                           "rate_limit": {"anyOf": [_ref("RateLimit"), {"type": "null"}]}})}}),
        "SuspendBody": {"type": "object", "additionalProperties": False, "required": [],
                        "properties": {"network": _PARAMS["network"], "asset": _PARAMS["asset"]}},
        "Suspension": _obj({"kind": {"enum": ["agent", "group"]}, "id": {"type": "string"},
                            "suspended": {"type": "boolean"},
                            "policies": {"type": "array", "items": _ref("PolicyItem")}}),
        "LedgerEntry": _obj(entry),
        "Ledger": _obj({"entries": {"type": "array", "items": _ref("LedgerEntry")}}),
        "Reconciliation": _obj({
            "network": {"type": "string"}, "from_block": {"type": "integer"}, "to_block": {"type": "integer"},
            "payee": {"type": "string"},
            "totals": {"type": "array", "items": _obj({"network": {"type": "string"}, "asset": {"type": "string"},
                                                       "chain": _AMOUNT_OUT, "ledger": _AMOUNT_OUT,
                                                       "difference": {"type": "string", "description": "chain - ledger"}})},
            "differences": {"type": "array", "items": _obj({
                "network": {"type": "string"}, "asset": {"type": "string"}, "tx": {"type": "string"},
                "block": {"type": ["integer", "null"]}, "kind": {"enum": ["not_in_ledger", "not_on_chain", "amount"]},
                "chain": _AMOUNT_OUT, "ledger": _AMOUNT_OUT,
                "difference": {"type": "string", "description": "chain - ledger, base units"}})}}),
        "LedgerSummary": _obj({
            "start": {"type": "string", "format": "date-time"}, "end": {"type": "string", "format": "date-time"},
            "by": {"enum": ["asset", "agent"]}, "bucket_s": {"type": ["integer", "null"]},
            "truncated": {"type": "boolean", "description": "more entries than a summary reads (1,000,000)"},
            "rows": {"type": "array", "items": {**_obj({
                "network": {"type": "string"}, "asset": {"type": "string"},
                "agent": {"type": "string", "description": "by=agent only"}, "calls": {"type": "integer"},
                "amount": _AMOUNT_OUT, "amount_display": _DISPLAY,
                "buckets": {"type": ["array", "null"], "items": _obj({
                    "start": {"type": "string", "format": "date-time"}, "start_unix": {"type": "integer"},
                    "calls": {"type": "integer"}, "amount": _AMOUNT_OUT})}}),
                "required": ["network", "asset", "calls", "amount", "amount_display", "buckets"]}}}),
        "Error": _obj({"error": {"type": "string"}, "message": {"type": "string"}}),
        "InvalidRequest": _obj({"error": {"const": "invalid_request"}, "errors": {"type": "array", "items": _obj(
            {"loc": {"type": "string", "description": 'e.g. "body.limits.0.amount", "path.address"'},
             "msg": {"type": "string"}})}}),
    }  # fmt: skip


def _json_body(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _responses(handler: str) -> dict:
    ok: dict[str, dict] = {
        "openapi": {"200": _json_body({"type": "object"}, "this document")},
        "healthz": {"200": _json_body(_obj({"status": {"const": "ok"}}), "alive")},
        "assets_list": {"200": _json_body(_ref("Assets"), "known assets")},
        "list_policies": {"200": _json_body(_ref("PolicyList"), "policies")},
        "get_policy": {"200": _json_body(_ref("PolicyItem"), "the policy")},
        "put_policy": {"200": _json_body(_ref("PolicyItem"), "replaced"),
                       "201": _json_body(_ref("PolicyItem"), "created")},
        "delete_policy": {"204": {"description": "deleted"}},
        "usage": {"200": _json_body(_ref("Usage"), "usage per window")},
        "suspend": {"200": _json_body(_ref("Suspension"), "the policies changed")},
        "resume": {"200": _json_body(_ref("Suspension"), "the policies changed")},
        "ledger": {"200": {"description": "entries oldest first", "content": {
            "application/json": {"schema": _ref("Ledger")},
            "application/x-ndjson": {"schema": _ref("LedgerEntry"), "description": "one entry per line"},
            "text/csv": {"schema": {"type": "string"}, "description": "header row: " + ",".join(LEDGER_COLUMNS)}}}},
        "reconcile": {"200": _json_body(_ref("Reconciliation"), "totals per asset and every difference"),
                      "400": _json_body(_ref("Error"), "reconcile_refused: the range or network cannot be read"),
                      "404": _json_body(_ref("Error"), "reconcile_unavailable: no chain configured"),
                      "502": _json_body(_ref("Error"), "chain_unavailable: the node could not be read")},
        "ledger_summary": {"200": _json_body(_ref("LedgerSummary"), "sums per asset (or agent and asset)")},
    }[handler]
    if handler == "healthz":
        return ok
    err = _ref("Error")
    out = ok | {"401": _json_body(err, 'no bearer token (WWW-Authenticate: Bearer), or a wrong one'
                                       ' (WWW-Authenticate: Bearer error="invalid_token")'),
                "403": _json_body(err, "admin_disabled: no token is configured")}
    if handler in ("get_policy", "delete_policy", "usage", "suspend", "resume"):
        out["404"] = _json_body(err, "no such policy (suspend/resume: the owner has none)")
    if handler not in ("openapi", "assets_list"):
        out["422"] = _json_body(_ref("InvalidRequest"), "malformed JSON, invalid fields or parameters")
        out["503"] = _json_body(err, "budget store unreachable")
    if handler in ("put_policy", "suspend", "resume"):
        out["413"] = _json_body(err, f"body larger than {MAX_BODY_BYTES} bytes")
    return out


def openapi_document(server_url: str = "/") -> dict:
    paths: dict[str, dict] = {}
    for method, path, handler, summary in ROUTES:
        params = [{"name": n, "in": "path", "required": True, "schema": _PARAMS[n]}
                  for n in _PARAMS if "{" + n + "}" in path]
        params += [{"name": n, "in": "query", "required": False, "schema": s}
                   for n, s in _QUERY.get(handler, {}).items()]
        op: dict = {"operationId": "".join(c if c.isalnum() else "_" for c in f"{method.lower()}{path}").strip("_"),
                    "summary": summary, "parameters": params, "responses": _responses(handler)}
        if handler == "put_policy":
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref("Policy")}}}
        elif handler in ("suspend", "resume"):
            op["requestBody"] = {"required": False, "content": {"application/json": {"schema": _ref("SuspendBody")}},
                                 "description": "limit the change to one network and asset (default: all)"}
        if handler == "healthz":
            op["security"] = []
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "x402 budgets admin API", "version": "1",
                 "description": "Per-agent budgets: policies, usage, suspension and the spend ledger. Every route"
                                " but /v1/healthz needs `Authorization: Bearer <BUDGETS_ADMIN_TOKEN>` (this"
                                " document too). Amounts are base units as decimal strings."},
        "servers": [{"url": server_url}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"schemas": _schemas(), "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
