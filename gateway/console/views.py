"""The console's pages. Budgets, usage and the ledger come from the budgets admin API (in
process, AdminCalls); refusals from the gateway's refusal log; health, settlements in flight,
payment channels, proofs of inference and the price feed from the gateway's state. Each handler
gathers its data and renders a template."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from jinja2 import Environment
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.console.admin_calls import AdminCalls
from gateway.console.charts import Series, time_series
from gateway.console.forms import PolicyForm, read_form, token_units
from gateway.console.reconcile import ReconcileError, Reconciler
from gateway.console.session import Sessions

HOUR, DAY = 3600, 86400
RECENT = 50  # rows of recent calls and refusals shown
LEDGER_ROWS = 500
AGENTS_MAX = 500
SORTS = ("address", "group", "spent", "remaining", "suspended")
CHANNELS_READ = 5000  # channel records read per view (sorted: withdrawals and unclaimed charges first)
CHANNELS_SHOWN = 200
PROOF_BATCHES = 20


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _form_time(text: str) -> float | None:
    """A datetime-local field ("2026-11-27T21:00", read as UTC) in unix seconds."""
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()


class Views:
    def __init__(self, calls: AdminCalls, env: Environment, sessions: Sessions, gateway: Callable[[], Any],
                 settings: Any, reconciler: Reconciler, clock: Callable[[], float]) -> None:
        self.calls, self.env, self.sessions, self.gateway = calls, env, sessions, gateway
        self.settings, self.reconciler, self.clock = settings, reconciler, clock
        self.route_ids = [f"{r.method} {r.path}" for r in settings.routes]

    def routes(self) -> list[Route]:
        return [Route("/", self.overview), Route("/agents", self.agents),
                Route("/agents/{address}", self.agent, methods=["GET", "POST"]),
                Route("/agents/{address}/suspension", self.suspension, methods=["POST"]),
                Route("/groups", self.groups),
                Route("/groups/{group}", self.group, methods=["GET", "POST"]),
                Route("/groups/{group}/suspension", self.suspension, methods=["POST"]),
                Route("/ledger", self.ledger), Route("/ledger/export", self.export),
                Route("/settlements", self.settlements), Route("/reconciliation", self.reconciliation)]

    # -- rendering -------------------------------------------------------------------------------

    def render(self, request: Request, template: str, status: int = 200, **ctx: Any) -> Response:
        sid = request.scope["state"]["console_sid"]
        html = self.env.get_template(template).render(
            base=request.scope.get("root_path", ""), csrf=self.sessions.csrf(sid), page=template.removesuffix(".html"),
            tx_url=self.tx_url, iso=_iso, **ctx)
        return HTMLResponse(html, status)

    def tx_url(self, tx: str) -> str | None:
        template = self.settings.explorer_tx_url
        return template.replace("{tx}", tx) if template and tx else None

    async def assets(self) -> dict[tuple[str, str], tuple[str, int]]:
        doc = (await self.calls.get("/v1/assets")).doc or {}
        return {(a["network"], a["asset"].lower()): (a["symbol"], a["decimals"]) for a in doc.get("assets", [])}

    async def ledger_entries(self, **query: Any) -> list[dict[str, Any]]:
        reply = await self.calls.get("/v1/ledger", limit=100_000, **query)
        return (reply.doc or {}).get("entries", []) if reply.status == 200 else []

    async def policies(self) -> list[dict[str, Any]]:
        return ((await self.calls.get("/v1/policies")).doc or {}).get("policies", [])

    async def refusals(self, since: float) -> list[Any]:
        with contextlib.suppress(Exception):  # the page still shows the rest when the store is down
            return list(await self.gateway().refusals.recent(since=since, limit=5000))
        return []

    # -- overview ----------------------------------------------------------------------------------

    async def summary(self, **query: Any) -> list[dict[str, Any]]:
        reply = await self.calls.get("/v1/ledger/summary", **query)
        return (reply.doc or {}).get("rows", []) if reply.status == 200 else []

    async def overview(self, request: Request) -> Response:
        now = self.clock()
        hours = 24
        assets = await self.assets()
        day, hour, refusals = await asyncio.gather(
            self.summary(start=now - DAY, end=now, bucket_s=HOUR), self.summary(start=now - HOUR, end=now),
            self.refusals(now - DAY))
        start_bucket = int(now // HOUR) - hours + 1  # the day's summary starts one bucket earlier (partial)
        per_asset: dict[tuple[str, str], dict[str, Any]] = {}
        for key, (symbol, decimals) in sorted(assets.items(), key=lambda kv: kv[1][0]):
            per_asset[key] = {"symbol": symbol, "decimals": decimals, "network": key[0], "asset": key[1],
                              "calls_h": 0, "calls_d": 0, "paid_h": 0, "paid_d": 0, "refused_h": 0, "refused_d": 0,
                              "calls_series": [0.0] * hours, "refused_series": [0.0] * hours}
        for rows, suffix in ((day, "d"), (hour, "h")):
            for r in rows:
                row = per_asset.get((r["network"], r["asset"]))
                if row is not None:
                    row[f"calls_{suffix}"], row[f"paid_{suffix}"] = r["calls"], int(r["amount"])
        for r in day:
            series = per_asset.get((r["network"], r["asset"]), {}).get("calls_series")
            for b in r["buckets"] or []:
                i = b["start_unix"] // HOUR - start_bucket
                if series is not None and 0 <= i < hours:
                    series[i] += b["calls"]
        other: dict[str, Any] = {"refused_h": 0, "refused_d": 0}
        for n in refusals:
            row = per_asset.get((n.network, n.asset)) if n.asset else None
            target = row if row is not None else other
            target["refused_d"] += 1
            target["refused_h"] += n.ts >= now - HOUR
            if row is not None:
                i = int(n.ts // HOUR) - start_bucket
                if 0 <= i < hours:
                    row["refused_series"][i] += 1
        reasons = Counter(n.reason for n in refusals)
        ticks = [time.strftime("%H:00", time.gmtime((start_bucket + i) * HOUR)) for i in range(hours)]
        for row in per_asset.values():
            row["paid_h_display"] = f"{token_units(row['paid_h'], row['decimals'])} {row['symbol']}"
            row["paid_d_display"] = f"{token_units(row['paid_d'], row['decimals'])} {row['symbol']}"
            row["chart"] = Markup(time_series(  # built from numbers and escaped labels
                f"{row['symbol']}: paid calls and refusals per hour, last 24 hours (UTC)",
                [Series("paid calls", row["calls_series"]), Series("refusals", row["refused_series"])], ticks))
        health, in_flight = await asyncio.gather(self.health(), self.in_flight(now))
        failed = [n for n in refusals if n.kind == "settlement"]
        return self.render(request, "overview.html", assets=list(per_asset.values()), other=other,
                           reasons=reasons.most_common(10), health=health, pending=in_flight,
                           failed_settlements=len(failed), feed=self.feed(now), now=now)

    async def health(self) -> dict[str, str]:
        state = self.gateway()

        async def probe(ping: Callable[[], Any]) -> str:
            try:
                await ping()
                return "ok"
            except Exception as exc:  # noqa: BLE001 - a probe reports any failure, never raises
                return f"unavailable: {type(exc).__name__}"

        checks = {"payment store": await probe(state.records.ping)}
        budgets = await self.calls.get("/v1/healthz")
        checks["admin API"] = "ok" if budgets.status == 200 else f"unavailable: HTTP {budgets.status}"
        ledger = await self.calls.get("/v1/ledger", limit=1)
        checks["budget store"] = "ok" if ledger.status == 200 else f"unavailable: HTTP {ledger.status}"
        if state.sessions is not None:
            checks["upto sessions"] = await probe(state.sessions.ping)
        checks["facilitator"] = "ok" if await state.facilitator.ready() else "unavailable"
        return checks

    def feed(self, now: float) -> str:
        quote = self.settings.quote
        if not quote.feed_url:
            return "fixed rates (no price feed configured)"
        fed_at = self.gateway().pricing.quotes.fed_at
        if fed_at is None:
            return "no price received yet"
        age = now - fed_at
        stale = " (stale: older than max_age_s)" if age > quote.max_age_s else ""
        return f"{age:.0f} s old{stale}"

    async def in_flight(self, now: float) -> dict[str, Any]:
        """Settlements not finished: the in-process facilitator's, and upto sessions open or due."""
        state = self.gateway()
        out: dict[str, Any] = {"facilitator": None, "sessions": None}
        fac = getattr(state.facilitator, "facilitator", None)  # the in-process one has its store at hand
        if fac is not None:
            with contextlib.suppress(Exception):
                out["facilitator"] = await fac.store.unfinished(older_than_ms=int(now * 1000) + 1, limit=200)
        if state.sessions is not None:
            with contextlib.suppress(Exception):
                ids = await state.sessions.due(now=now + 10 * 365 * DAY, limit=200)
                found = await asyncio.gather(*(state.sessions.get(i) for i in ids))
                out["sessions"] = [s for s in found if s is not None]
        return out

    # -- agents ------------------------------------------------------------------------------------

    async def agents(self, request: Request) -> Response:
        now = self.clock()
        q = request.query_params.get("q", "").strip().lower()
        sort = request.query_params.get("sort", "address")
        sort = sort if sort in SORTS else "address"
        desc = request.query_params.get("dir") == "desc"
        policies, spenders, assets = await asyncio.gather(
            self.policies(), self.summary(start=now - DAY, end=now, by="agent"), self.assets())
        wallets: dict[str, set[tuple[str, str]]] = defaultdict(set)
        for p in policies:
            if p["kind"] == "agent":
                wallets[p["id"]].add((p["policy"]["network"], p["policy"]["asset"]))
        for r in spenders:
            wallets[r["agent"]].add((r["network"], r["asset"]))
        rows = [r for r in await asyncio.gather(*(self.agent_row(a, pairs, assets) for a, pairs in
                                                  sorted(wallets.items())[:AGENTS_MAX]))
                if not q or q in r["address"] or q in (r["group"] or "").lower()]
        key: dict[str, Callable[[dict[str, Any]], Any]] = {
            "address": lambda r: r["address"], "group": lambda r: r["group"] or "",
            "spent": lambda r: r["spent_fraction"], "remaining": lambda r: r["remaining_fraction"],
            "suspended": lambda r: r["suspended"]}
        rows.sort(key=key[sort], reverse=desc)
        return self.render(request, "agents.html", rows=rows, q=q, sort=sort, desc=desc, sorts=SORTS)

    async def agent_row(self, address: str, pairs: set[tuple[str, str]],
                        assets: dict[tuple[str, str], tuple[str, int]]) -> dict[str, Any]:
        """An agent's group, windows (limit, spent, remaining), rate and suspension over its assets."""
        windows, group, rate, suspended, listed = [], None, None, False, False
        for network, asset in sorted(pairs):
            reply = await self.calls.get(f"/v1/agents/{address}/usage", network=network, asset=asset)
            if reply.status != 200:
                continue
            doc = reply.doc
            suspended |= doc["suspended"]
            for p in doc["policies"]:
                group = group or p["group"]
                rate = rate or p["rate_limit"]
                listed |= p["listed"]
            symbol = assets.get((network, asset), ("?", 0))[0]
            windows += [w | {"symbol": symbol} for w in doc["budgets"]]
        fractions = [int(w["spent"]) / int(w["limit"]) for w in windows if int(w["limit"]) > 0]
        remaining = [int(w["remaining"]) / int(w["limit"]) for w in windows if int(w["limit"]) > 0]
        return {"address": address, "group": group, "rate": rate, "suspended": suspended, "listed": listed,
                "windows": windows, "spent_fraction": max(fractions, default=0.0),
                "remaining_fraction": min(remaining, default=1.0)}

    async def agent(self, request: Request) -> Response:
        address = request.path_params["address"].lower()
        now = self.clock()
        assets = await self.assets()
        reply = await self.calls.get("/v1/policies", agent=address)
        if reply.status != 200:
            return PlainTextResponse("not an agent address", 404)
        policies = {(p["policy"]["network"], p["policy"]["asset"]): p["policy"] for p in reply.doc["policies"]}
        forms = {k: PolicyForm.from_policy(p, assets.get(k, ("?", 0))[1]) for k, p in policies.items()}
        status, saved = 200, ""
        if request.method == "POST":
            answer = await self.edit_policy(request, f"/agents/{address}", f"/v1/agents/{address}", policies, forms,
                                            assets)
            if answer is not None:
                return answer
            status = 422
        saved = "policy saved" if request.query_params.get("saved") else ""
        pairs = set(policies) | set(forms)
        entries, refusals = await asyncio.gather(self.ledger_entries(agent=address, start=now - DAY, end=now),
                                                 self.refusals(now - DAY))
        pairs |= {(e["network"], e["asset"].lower()) for e in entries}
        row = await self.agent_row(address, pairs, assets)
        new_pairs = [k for k in assets if k not in forms]
        return self.render(request, "agent.html", status, address=address, row=row, forms=forms, assets=assets,
                           new_pairs=new_pairs, blank=PolicyForm({}), saved=saved,
                           calls=list(reversed(entries))[:RECENT],
                           refusals=[n for n in refusals if n.payer == address][:RECENT])

    async def edit_policy(self, request: Request, page: str, owner_path: str, policies: dict[tuple[str, str], Any],
                          forms: dict[tuple[str, str], PolicyForm],
                          assets: dict[tuple[str, str], tuple[str, int]]) -> Response | None:
        """A policy form posted: saved through the admin API (a redirect back to `page`), an
        error answer, or None with the form's field errors put in `forms` (shown again, 422)."""
        form = await read_form(request)
        if form is None or not self.sessions.csrf_ok(request.scope["state"]["console_sid"], form.get("csrf")):
            return PlainTextResponse("missing or wrong CSRF token", 403)
        key = (form.get("network", ""), form.get("asset", "").lower())
        if key not in assets:
            return PlainTextResponse("unknown network or asset", 400)
        edited = PolicyForm({k: v for k, v in form.items() if k not in ("csrf", "network", "asset")})
        body = edited.to_body(policies.get(key), assets[key][1])
        if body is not None:
            put = await self.calls.call("PUT", f"{owner_path}/policies/{key[0]}/{key[1]}", body=body)
            if put.status in (200, 201):
                return RedirectResponse(f"{request.scope.get('root_path', '')}{page}?saved=1", 303)
            if put.status == 422:
                edited.admin_errors((put.doc or {}).get("errors", []), body)
            else:
                edited.errors["form"] = str((put.doc or {}).get("message") or f"HTTP {put.status}")
        forms[key] = edited
        return None

    async def suspension(self, request: Request) -> Response:
        form = await read_form(request)
        if form is None or not self.sessions.csrf_ok(request.scope["state"]["console_sid"], form.get("csrf")):
            return PlainTextResponse("missing or wrong CSRF token", 403)
        action = "suspend" if form.get("action") == "suspend" else "resume"
        if "address" in request.path_params:
            owner = f"agents/{request.path_params['address'].lower()}"
        else:
            owner = f"groups/{request.path_params['group']}"
        reply = await self.calls.call("POST", f"/v1/{owner}/{action}", body={})
        if reply.status != 200:
            return PlainTextResponse(str((reply.doc or {}).get("message") or f"HTTP {reply.status}"), reply.status)
        back = form.get("back", "")
        base = request.scope.get("root_path", "")
        return RedirectResponse(base + (back if back.startswith("/") and not back.startswith("//") else "/agents"), 303)

    # -- groups ------------------------------------------------------------------------------------

    async def groups(self, request: Request) -> Response:
        policies, assets = await asyncio.gather(self.policies(), self.assets())
        groups: dict[str, dict[str, Any]] = {}
        for p in policies:
            if p["kind"] == "group":
                g = groups.setdefault(p["id"], {"name": p["id"], "policies": [], "members": [], "windows": []})
                g["policies"].append(p | {"symbol": assets.get((p["policy"]["network"], p["policy"]["asset"]),
                                                               ("?", 0))[0]})
        for p in policies:
            name = p["policy"].get("group")
            if p["kind"] == "agent" and name:
                groups.setdefault(name, {"name": name, "policies": [], "members": [], "windows": []})
                if p["id"] not in groups[name]["members"]:
                    groups[name]["members"].append(p["id"])
        for g in groups.values():  # the group's windows, as a member's usage shows them
            for member in g["members"][:1]:
                doc = (await self.calls.get(f"/v1/agents/{member}/usage")).doc or {}
                g["windows"] = [w | {"symbol": assets.get((w["network"], w["asset"].lower()), ("?", 0))[0]}
                                for w in doc.get("budgets", []) if w["scope"] == "group"]
            g["suspended"] = any(p["policy"]["suspended"] for p in g["policies"])
        return self.render(request, "groups.html", groups=sorted(groups.values(), key=lambda g: g["name"]))

    async def group(self, request: Request) -> Response:
        name = request.path_params["group"]
        reply = await self.calls.get("/v1/policies", group=name)
        if reply.status != 200:
            return PlainTextResponse("not a group id", 404)
        assets, everyone = await asyncio.gather(self.assets(), self.policies())
        policies = {(p["policy"]["network"], p["policy"]["asset"]): p["policy"] for p in reply.doc["policies"]}
        forms = {k: PolicyForm.from_policy(p, assets.get(k, ("?", 0))[1]) for k, p in policies.items()}
        status = 200
        if request.method == "POST":
            answer = await self.edit_policy(request, f"/groups/{name}", f"/v1/groups/{name}", policies, forms, assets)
            if answer is not None:
                return answer
            status = 422
        members = sorted({p["id"] for p in everyone if p["kind"] == "agent" and p["policy"].get("group") == name})
        windows: list[dict[str, Any]] = []
        for member in members[:1]:  # the group's windows, as a member's usage shows them
            doc = (await self.calls.get(f"/v1/agents/{member}/usage")).doc or {}
            windows = [w for w in doc.get("budgets", []) if w["scope"] == "group"]
        return self.render(request, "group.html", status, name=name, forms=forms, assets=assets, members=members,
                           group_windows=windows, suspended=any(p["suspended"] for p in policies.values()),
                           new_pairs=[k for k in assets if k not in forms], blank=PolicyForm({}),
                           saved="policy saved" if request.query_params.get("saved") else "")

    # -- ledger ------------------------------------------------------------------------------------

    def ledger_query(self, request: Request, now: float) -> tuple[dict[str, Any], dict[str, str]]:
        """The admin API query of the ledger form's filters, and the filters as typed."""
        qp = request.query_params
        typed = {k: qp.get(k, "").strip() for k in ("agent", "group", "route", "model", "asset", "start", "end")}
        query: dict[str, Any] = {k: typed[k] for k in ("agent", "group", "route", "model") if typed[k]}
        if typed["asset"]:
            network, _, asset = typed["asset"].rpartition(":")
            query |= {"network": network, "asset": asset}
        start, end = _form_time(typed["start"]), _form_time(typed["end"])
        query["end"] = end if end is not None else now
        query["start"] = start if start is not None else query["end"] - DAY
        return query, typed

    async def ledger(self, request: Request) -> Response:
        now = self.clock()
        query, typed = self.ledger_query(request, now)
        reply = await self.calls.get("/v1/ledger", limit=100_000, **query)
        error = ""
        if reply.status != 200:
            errs = (reply.doc or {}).get("errors") or [{"loc": "", "msg": (reply.doc or {}).get("message", "")}]
            error = "; ".join(f"{e['loc'].removeprefix('query.')}: {e['msg']}" for e in errs)
        entries = list(reversed((reply.doc or {}).get("entries", [])))
        export = dict(query.items())
        assets = await self.assets()
        return self.render(request, "ledger.html", entries=entries[:LEDGER_ROWS], total=len(entries), typed=typed,
                           error=error, routes=self.route_ids, assets=assets, export=export)

    async def export(self, request: Request) -> Response:
        fmt = request.query_params.get("format", "csv")
        if fmt not in ("csv", "jsonl"):
            return PlainTextResponse("format is csv or jsonl", 400)
        query, _ = self.ledger_query(request, self.clock())
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.clock()))
        headers = {"content-disposition": f'attachment; filename="ledger-{stamp}.{fmt}"'}
        calls = self.calls

        class Export(Response):
            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                await calls.forward("/v1/ledger", query | {"format": fmt, "limit": 100_000}, receive, send, headers)

        return Export()

    # -- settlements -------------------------------------------------------------------------------

    async def settlements(self, request: Request) -> Response:
        now = self.clock()
        entries, refusals, in_flight, assets = await asyncio.gather(
            self.ledger_entries(start=now - HOUR, end=now), self.refusals(now - DAY), self.in_flight(now),
            self.assets())
        failed = [n for n in refusals if n.kind == "settlement"]
        sessions = sorted(in_flight["sessions"] or [], key=lambda s: (s.state.value not in ("failed", "settling"),
                                                                      -s.last_used))
        channels, proofs = await asyncio.gather(self.channels(assets), self.proofs(now))
        return self.render(request, "settlements.html", failed=failed, pending=in_flight["facilitator"],
                           sessions=sessions, has_sessions=in_flight["sessions"] is not None,
                           settled=list(reversed(entries))[:RECENT * 2], assets=assets, channels=channels,
                           proofs=proofs)

    async def channels(self, assets: dict[tuple[str, str], tuple[str, int]]) -> dict[str, Any] | None:
        """batch-settlement channels, those needing attention (a pending withdrawal, charges not yet
        claimed) first; None when no route offers them."""
        store = self.gateway().channels
        if store is None:
            return None
        try:
            ids = await store.ids()
            found = []
            for i in range(0, min(len(ids), CHANNELS_READ), 100):  # bounded concurrency on the store
                found += await asyncio.gather(*(store.get(c) for c in ids[i:min(i + 100, CHANNELS_READ)]))
        except Exception as exc:  # noqa: BLE001 - the page still shows the rest when the store is down
            return {"error": f"unavailable: {type(exc).__name__}", "rows": [], "total": 0}
        rows = []
        for c in (c for c in found if c is not None):
            symbol, decimals = assets.get((c.network, c.asset.lower()), ("base units", 0))
            unclaimed = max(c.charged - c.total_claimed, 0)
            rows.append({"id": c.id, "payer": c.payer, "route": c.route, "symbol": symbol, "unclaimed_raw": unclaimed,
                         "balance": token_units(c.balance, decimals), "charged": token_units(c.charged, decimals),
                         "claimed": token_units(c.total_claimed, decimals), "unclaimed": token_units(unclaimed, decimals),
                         "withdraw_at": c.withdraw_at, "synced_at": c.synced_at})
        rows.sort(key=lambda r: (not (r["withdraw_at"] or r["unclaimed_raw"]), -r["unclaimed_raw"], r["id"]))
        return {"error": "", "rows": rows[:CHANNELS_SHOWN], "total": len(ids), "read": min(len(ids), CHANNELS_READ)}

    async def proofs(self, now: float) -> dict[str, Any] | None:
        """Proofs of inference waiting to be anchored and the recent anchoring transactions; None
        when the gateway anchors none."""
        store = self.gateway().proofs
        if store is None:
            return None
        try:
            waiting, oldest, batches = await asyncio.gather(store.pending_count(), store.pending(1),
                                                            store.recent_batches(PROOF_BATCHES))
        except Exception as exc:  # noqa: BLE001 - the page still shows the rest when the store is down
            return {"error": f"unavailable: {type(exc).__name__}", "waiting": 0, "oldest_age": None, "batches": []}
        return {"error": "", "waiting": waiting, "oldest_age": now - oldest[0].queued_at if oldest else None,
                "batches": batches}

    # -- reconciliation ----------------------------------------------------------------------------

    async def reconciliation(self, request: Request) -> Response:
        now = self.clock()
        typed = {k: request.query_params.get(k, "").strip() for k in ("start", "end")}
        end = _form_time(typed["end"]) or now
        start = _form_time(typed["start"]) or end - DAY
        error, rows = "", None
        try:
            rows = await self.reconciler(start, end)
        except ReconcileError as exc:
            error = str(exc)
        assets = await self.assets()
        return self.render(request, "reconciliation.html", rows=rows, error=error, typed=typed, start=start, end=end,
                           assets=assets, available=rows is not None or bool(error))
