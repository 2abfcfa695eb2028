"""The operator's admin API for budgets: policies (agents and groups), usage, suspend/resume and
the ledger, behind a bearer token, described by an OpenAPI 3.1 document built from the same
route table that serves it.

Amounts are integers in base units, sent as decimal strings (JSON numbers are accepted on input
when they are whole); every amount in a response also has a display form ("5 OPG") when the
asset is known. A change is applied by this process at once and by other replicas within the
enforcer's policy cache time (1 s).
"""

from __future__ import annotations

import csv
import datetime as dt
import hmac
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal

import orjson
from pydantic import SecretStr, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from budgets.enforcer import BudgetEnforcer
from budgets.models import ADDRESS, GROUP_ID, LedgerEntry, Policy, Refusal
from budgets.store import BudgetStoreUnavailableError

log = logging.getLogger("budgets.admin")
Assets = dict[tuple[str, str], tuple[str, int]]  # (network, lowercase asset) -> (symbol, decimals)
MAX_BODY_BYTES = 1 << 20
MAX_AMOUNT = 2**256 - 1
LEDGER_MAX = 100_000
LEDGER_COLUMNS = ("ts", "agent", "group", "route", "model", "amount", "asset", "network", "tx_hash", "request_id")
OPEN_PATHS = frozenset({"/v1/healthz"})
MAX_DEPTH = 32
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?')  # an unclosed string runs to the end: linear time
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))


class AdminError(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


class InvalidRequestError(Exception):
    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("invalid request")
        self.errors = errors


def _json(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store", **(headers or {})})


def _error(status: int, error: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json({"error": error, "message": message}, status, headers)


def _invalid(loc: str, msg: str) -> InvalidRequestError:
    return InvalidRequestError([{"loc": loc, "msg": msg}])


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def display(amount: int, network: str, asset: str, assets: Assets) -> str | None:
    """Exact decimal form with the token's symbol ("5 OPG", "0.2 USDC"), or None if unknown."""
    known = assets.get((network, asset.lower()))
    if known is None:
        return None
    symbol, decimals = known
    digits = str(amount).rjust(decimals + 1, "0")
    whole, frac = (digits[:-decimals], digits[-decimals:].rstrip("0")) if decimals else (digits, "")
    return f"{whole}{'.' + frac if frac else ''} {symbol}"


# -- authentication (pure ASGI, ahead of routing: unknown paths are hidden too) -------------------


def _route_path(scope: Scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


class BearerAuth:
    def __init__(self, app: ASGIApp, token: SecretStr | None) -> None:
        self.app = app
        self.token = token.get_secret_value().encode() if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(Headers(scope=scope).get("authorization"))
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, header: str | None) -> Response | None:
        if self.token is None:
            return _error(403, "admin_disabled", "set BUDGETS_ADMIN_TOKEN")
        scheme, _, given = (header or "").partition(" ")
        # RFC 6750 §3.1: no credentials get a bare challenge; wrong ones name invalid_token. Both 401.
        if scheme.lower() != "bearer" or not given.strip():
            return _error(401, "unauthorized", "send Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode("latin-1"), self.token):
            return _error(401, "invalid_token", "wrong admin token",
                          {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return None


# -- request parsing ---------------------------------------------------------------------------------


_MUST = {"address": "must be an address (0x + 40 hex digits)",
         "asset": "must be an asset address (0x + 40 hex digits)",
         "network": "must be a CAIP-2 EVM network (eip155:<chain id>)",
         "group": "must be a group id (1-64 of A-Za-z0-9_.-)"}


def _path_param(request: Request, name: str) -> str:
    value: str = request.path_params[name]
    ok = _is_network(value) if name == "network" else bool((GROUP_ID if name == "group" else ADDRESS).match(value))
    if not ok:
        raise _invalid(f"path.{name}", _MUST[name])
    return value.lower() if name in ("address", "asset") else value


def _owner(request: Request) -> tuple[str, str]:
    if "address" in request.path_params:
        return "agent", _path_param(request, "address")
    return "group", _path_param(request, "group")


def _is_network(value: str) -> bool:
    head, _, chain = value.partition(":")
    return head == "eip155" and chain.isascii() and chain.isdigit()


async def _read_json(request: Request, *, required: bool) -> dict | None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise AdminError(413, "request_too_large", f"bodies are at most {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise AdminError(413, "request_too_large", f"bodies are at most {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        if required:
            raise _invalid("body", "a JSON object is required")
        return None
    if _too_deep(raw):
        raise _invalid("body", f"nested deeper than {MAX_DEPTH} levels")
    try:
        doc = json.loads(raw, parse_float=_number, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise _invalid("body", f"not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise _invalid("body", "must be a JSON object")
    return doc


def _too_deep(raw: bytes) -> bool:
    """Brackets nested deeper than MAX_DEPTH (outside strings)? Checked before json.loads, which
    recurses in C: py_ecc (imported with web3) raises the recursion limit to 100000, so a deeply
    nested body would overflow the C stack and kill the process instead of raising RecursionError."""
    depth = 0
    for c in _STRING.sub(b"", raw).translate(None, _NOT_BRACKET):
        depth += 1 if c in b"[{" else -1
        if depth > MAX_DEPTH:
            return True
    return False


def _number(text: str) -> Decimal | float:
    """JSON numbers with a fraction or exponent: exact as Decimal; absurd exponents as a float,
    so that no one converts 1e100000000 to an int."""
    value = Decimal(text)
    return value if value.is_finite() and abs(value.adjusted()) < 100 else float(text)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


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


def parse_time(value: str, loc: str) -> float:
    """ISO 8601 (naive means UTC) or unix seconds."""
    try:
        return float(value) if value.replace(".", "", 1).isdigit() else _iso_seconds(value)
    except (ValueError, OverflowError):
        raise _invalid(loc, "must be ISO 8601 (2026-01-31T12:00:00Z) or unix seconds") from None


def _iso_seconds(value: str) -> float:
    parsed = dt.datetime.fromisoformat(value)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()


# -- responses -------------------------------------------------------------------------------------


def policy_doc(policy: Policy) -> dict:
    """The policy as it is stored, amounts as strings: a valid PUT body as it stands."""
    doc = policy.model_dump(mode="json")
    for lim in doc["limits"]:
        lim["amount"] = str(lim["amount"])
    if doc["per_call_max"] is not None:
        doc["per_call_max"] = str(doc["per_call_max"])
    return doc


@dataclass
class AdminApi:
    enforcer: BudgetEnforcer
    assets: Assets

    def _display(self, amount: int, network: str, asset: str) -> str | None:
        return display(amount, network, asset, self.assets)

    def item(self, kind: str, owner: str, policy: Policy) -> dict:
        limits = [self._display(lim.amount, policy.network, policy.asset) for lim in policy.limits]
        per_call = policy.per_call_max
        per_call = None if per_call is None else self._display(per_call, policy.network, policy.asset)
        return {"kind": kind, "id": owner, "policy": policy_doc(policy),
                "display": {"limits": limits, "per_call_max": per_call}}

    @staticmethod
    def _target(request: Request) -> tuple[str, str, str, str]:
        return *_owner(request), _path_param(request, "network"), _path_param(request, "asset")

    # -- handlers ------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def openapi(self, request: Request) -> Response:
        return _json(openapi_document(request.scope.get("root_path") or "/"))

    async def list_policies(self, request: Request) -> Response:
        agent = request.query_params.get("agent")
        group = request.query_params.get("group")
        if agent is not None and not ADDRESS.match(agent):
            raise _invalid("query.agent", _MUST["address"])
        if group is not None and not GROUP_ID.match(group):
            raise _invalid("query.group", _MUST["group"])
        wanted = ("agent", agent.lower()) if agent else ("group", group) if group else None
        return _json({"policies": [self.item(kind, owner, policy) for kind, owner, policy
                                   in await self.enforcer.store.list_policies() if wanted in (None, (kind, owner))]})

    async def assets_list(self, request: Request) -> Response:
        return _json({"assets": [{"network": n, "asset": a, "symbol": s, "decimals": d}
                                 for (n, a), (s, d) in sorted(self.assets.items())]})

    async def get_policy(self, request: Request) -> Response:
        kind, owner, network, asset = self._target(request)
        policy = await self.enforcer.store.get_policy(kind, owner, network, asset)
        if policy is None:
            raise AdminError(404, "not_found", f"no policy for {kind} {owner} on {network} {asset}")
        return _json(self.item(kind, owner, policy))

    async def put_policy(self, request: Request) -> Response:
        kind, owner, network, asset = self._target(request)
        body = await _read_json(request, required=True)
        assert body is not None
        policy = parse_policy(body, kind, network, asset)
        existed = await self.enforcer.store.get_policy(kind, owner, network, asset) is not None
        await self.enforcer.put_policy(kind, owner, policy)
        log.info("budget_policy_put", extra={"kind": kind, "owner": owner, "network": network, "asset": asset})
        return _json(self.item(kind, owner, policy), 200 if existed else 201)

    async def delete_policy(self, request: Request) -> Response:
        kind, owner, network, asset = self._target(request)
        if not await self.enforcer.store.delete_policy(kind, owner, network, asset):
            raise AdminError(404, "not_found", f"no policy for {kind} {owner} on {network} {asset}")
        self.enforcer.invalidate()
        log.info("budget_policy_deleted", extra={"kind": kind, "owner": owner, "network": network, "asset": asset})
        return Response(status_code=204)

    async def _owned(self, kind: str, owner: str, network: str | None, asset: str | None) -> list[Policy]:
        return [p for k, o, p in await self.enforcer.store.list_policies()
                if (k, o) == (kind, owner) and (network is None or p.network == network)
                and (asset is None or p.asset == asset)]

    async def _suspension(self, request: Request, suspended: bool) -> Response:
        kind, owner = _owner(request)
        body = await _read_json(request, required=False) or {}
        unknown = sorted(set(body) - {"network", "asset"})
        if unknown:
            raise InvalidRequestError([{"loc": f"body.{k}", "msg": "unknown field"} for k in unknown])
        network, asset = body.get("network"), body.get("asset")
        if network is not None and not (isinstance(network, str) and _is_network(network)):
            raise _invalid("body.network", _MUST["network"])
        if asset is not None and not (isinstance(asset, str) and ADDRESS.match(asset)):
            raise _invalid("body.asset", _MUST["asset"])
        policies = await self._owned(kind, owner, network, asset.lower() if asset else None)
        if not policies:
            where = f" on {network or 'any network'} {asset or ''}".rstrip() if (network or asset) else ""
            raise AdminError(404, "not_found", f"{kind} {owner} has no policy{where}: give it one first (PUT"
                             f" .../policies/{{network}}/{{asset}}), or make unlisted wallets' default \"deny\"")
        for policy in policies:
            await self.enforcer.store.put_policy(kind, owner, policy.model_copy(update={"suspended": suspended}))
        self.enforcer.invalidate()
        log.info("budget_owner_suspended" if suspended else "budget_owner_resumed",
                 extra={"kind": kind, "owner": owner, "policies": len(policies)})
        changed = [self.item(kind, owner, p.model_copy(update={"suspended": suspended})) for p in policies]
        return _json({"kind": kind, "id": owner, "suspended": suspended, "policies": changed})

    async def suspend(self, request: Request) -> Response:
        return await self._suspension(request, True)

    async def resume(self, request: Request) -> Response:
        return await self._suspension(request, False)

    async def usage(self, request: Request) -> Response:
        agent = _path_param(request, "address")
        network, asset = request.query_params.get("network"), request.query_params.get("asset")
        if (network is None) != (asset is None):
            raise _invalid("query", "give both network and asset, or neither")
        if network is not None and not _is_network(network):
            raise _invalid("query.network", _MUST["network"])
        if asset is not None and not ADDRESS.match(asset):
            raise _invalid("query.asset", _MUST["asset"])
        pairs = [(network, asset.lower())] if network and asset else \
            [(p.network, p.asset) for p in await self._owned("agent", agent, None, None)]
        if not pairs:
            raise AdminError(404, "not_found", f"agent {agent} has no policy; pass network and asset to see the"
                             " default budget it would get")
        now = self.enforcer.clock()
        budgets, policies = [], []
        for net, ast in pairs:
            try:
                policy, group, listed = await self.enforcer.policies_for(agent, net, ast)
            except Refusal as refusal:
                raise AdminError(404, refusal.reason, f"{refusal.message} (unlisted wallets are denied on"
                                 f" {net} {ast})") from None
            policies.append({"network": net, "asset": ast, "listed": listed, "group": policy.group,
                             "suspended": policy.suspended or bool(group and group.suspended),
                             "rate_limit": policy.rate_limit.model_dump() if policy.rate_limit else None})
            for check in self.enforcer.checks(agent, policy, group, net, ast, now, with_rate=False):
                for u in await self.enforcer.store.usage(check, now=now):
                    row = {"network": net, "asset": ast, "scope": check.scope.kind, "scope_id": check.scope.id,
                           "period": u.period, "rolling": u.rolling, "resets_at": iso(u.resets_at)}
                    for name in ("limit", "spent", "reserved", "remaining"):
                        row[name] = str(getattr(u, name))
                        row[f"{name}_display"] = self._display(getattr(u, name), net, ast)
                    budgets.append(row)
        return _json({"agent": agent, "budgets": budgets, "suspended": any(p["suspended"] for p in policies),
                      "rate_limit": policies[0]["rate_limit"] if len(policies) == 1 else None, "policies": policies})

    async def ledger(self, request: Request) -> Response:
        q = request.query_params
        agent = q.get("agent")
        if agent is not None and not ADDRESS.match(agent):
            raise _invalid("query.agent", _MUST["address"])
        now = self.enforcer.clock()
        end = parse_time(q["end"], "query.end") if "end" in q else now
        start = parse_time(q["start"], "query.start") if "start" in q else end - 86400
        if start > end:
            raise _invalid("query.start", "must not be after end")
        raw_limit = q.get("limit", "1000")
        if not (raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= LEDGER_MAX):
            raise _invalid("query.limit", f"must be a whole number from 1 to {LEDGER_MAX}")
        fmt = q.get("format", "json")
        if fmt not in ("json", "jsonl", "csv"):
            raise _invalid("query.format", "must be json, jsonl or csv")
        entries = await self.enforcer.store.ledger(agent=agent, start=start, end=end, limit=int(raw_limit))
        if fmt == "json":
            return _json({"entries": [self._entry(e) for e in entries]})
        media = "application/x-ndjson" if fmt == "jsonl" else "text/csv; charset=utf-8"
        return StreamingResponse(self._lines(entries, fmt), media_type=media, headers={"Cache-Control": "no-store"})

    def _entry(self, e: LedgerEntry) -> dict:
        return {"ts": iso(e.ts), "ts_unix": e.ts, "agent": e.agent, "group": e.group, "route": e.route,
                "model": e.model, "amount": str(e.amount),
                "amount_display": self._display(e.amount, e.network, e.asset), "asset": e.asset,
                "network": e.network, "tx_hash": e.tx_hash, "request_id": e.request_id, "extra": e.extra}

    async def _lines(self, entries: list[LedgerEntry], fmt: str) -> AsyncIterator[bytes]:
        if fmt == "jsonl":
            for e in entries:
                yield orjson.dumps(self._entry(e)) + b"\n"
            return
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(LEDGER_COLUMNS)
        for e in entries:
            doc = self._entry(e)
            writer.writerow(["" if doc[c] is None else doc[c] for c in LEDGER_COLUMNS])
            yield buf.getvalue().encode()
            buf.seek(0)
            buf.truncate()
        if buf.tell():
            yield buf.getvalue().encode()


# -- the route table (serves and documents) -----------------------------------------------------------

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
]


def create_admin_app(enforcer: BudgetEnforcer, token: SecretStr | None, *, assets: Assets | None = None) -> Starlette:
    api = AdminApi(enforcer, {(n, a.lower()): v for (n, a), v in (assets or {}).items()})
    by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
    for method, path, handler, _ in ROUTES:
        by_path.setdefault(path, {})[method] = getattr(api, handler)
    routes = [Route(path, _dispatch(methods), methods=list(methods)) for path, methods in by_path.items()]
    return Starlette(routes=routes, middleware=[Middleware(BearerAuth, token=token)], exception_handlers={
        AdminError: lambda req, exc: _error(exc.status, exc.error, exc.message),
        InvalidRequestError: lambda req, exc: _json({"error": "invalid_request", "errors": exc.errors}, 422),
        BudgetStoreUnavailableError: lambda req, exc: _error(503, "budget_store_unavailable",
                                                             "the budget store is unreachable", {"Retry-After": "5"}),
        HTTPException: lambda req, exc: _error(exc.status_code, {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"), str(exc.detail), dict(exc.headers or {})),
    })  # fmt: skip


async def _not_allowed(request: Request) -> Response:
    raise HTTPException(405)


def _dispatch(methods: dict[str, Callable[[Request], Awaitable[Response]]]) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await methods.get(request.method, methods.get("GET", _not_allowed))(request)

    return endpoint



# -- OpenAPI 3.1 ---------------------------------------------------------------------------------

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
_QUERY = {
    "list_policies": {"agent": _PARAMS["address"], "group": _PARAMS["group"]},
    "usage": {"network": _PARAMS["network"], "asset": _PARAMS["asset"]},
    "ledger": {"agent": _PARAMS["address"],
               "start": {"type": "string", "description": "ISO 8601 or unix seconds (default: end - 24 h)"},
               "end": {"type": "string", "description": "ISO 8601 or unix seconds (default: now)"},
               "limit": {"type": "integer", "minimum": 1, "maximum": LEDGER_MAX, "default": 1000},
               "format": {"type": "string", "enum": ["json", "jsonl", "csv"], "default": "json"}},
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
