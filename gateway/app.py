"""The gateway application: wiring only. The payment flow is in gateway/paywall/flow.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from gateway.batch_calls import BatchCalls
from gateway.batch_channels import open_channels
from gateway.batch_manager import ChannelManager
from gateway.budget_hook import BudgetHook, NoBudgets, Refusal
from gateway.errors import GatewayError
from gateway.errors import GatewayReason as G
from gateway.facilitator_client import FacilitatorClient, HttpFacilitatorClient, LocalFacilitatorClient
from gateway.metrics import GatewayMetrics
from gateway.middleware import RequestIdMiddleware
from gateway.paywall.flow import Paywall
from gateway.paywall.responses import Challenges, render_refusal
from gateway.paywall.settle import Settlement
from gateway.pricing import Pricing
from gateway.proxy import UpstreamPool, Upstreams
from gateway.records import PaymentRecords, open_records
from gateway.session_calls import SessionCalls
from gateway.sessions import SessionStore, open_sessions
from gateway.settings import GatewaySettings
from gateway.workers.pool import TrackedResponse, WorkerPool
from storage import StoreUnavailableError, is_redis_url


def build_facilitator_client(settings: GatewaySettings) -> FacilitatorClient:
    ref = settings.facilitator
    if ref.mode == "remote":
        assert ref.url is not None
        headers = {}
        if ref.auth_header and ref.auth_value is not None:
            headers[ref.auth_header] = ref.auth_value.get_secret_value()
        return HttpFacilitatorClient(ref.url, timeout_s=ref.timeout_s, headers=headers)
    from facilitator.app import build_facilitator
    from facilitator.settings import load_settings

    fac_settings = load_settings(ref.config_file, devchain_file=ref.devchain_file)
    return LocalFacilitatorClient(build_facilitator(fac_settings), reconcile_interval_s=fac_settings.reconcile_interval_s)


@dataclass
class GatewayState:
    paywall: Paywall
    records: PaymentRecords
    facilitator: FacilitatorClient
    upstreams: Upstreams
    metrics: GatewayMetrics
    pricing: Pricing
    challenges: Challenges
    sessions: SessionStore | None = None  # when a route runs upto sessions


async def read_limited(request: Request, limit: int) -> bytes | None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _probe(ping: Callable[[], Awaitable[None]]) -> str:
    try:
        await ping()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - a probe reports any failure as unavailable, never raises
        return f"unavailable: {type(exc).__name__}"


def build_budgets(settings: GatewaySettings):
    """The budget enforcer and its store from the [budgets] section (None when absent)."""
    from budgets.enforcer import BudgetEnforcer
    from budgets.models import DefaultPolicy
    from budgets.sqlite_store import open_budget_store

    b = settings.budgets
    if b is None or not b.enabled:
        return None
    url = b.store_url or (settings.store_url if is_redis_url(settings.store_url)
                          else "sqlite://.x402-state/budgets.sqlite3")
    store = open_budget_store(url, prefix=b.store_prefix)
    defaults = {
        (o.network, o.asset.lower()): DefaultPolicy(mode=b.default, policy=b.default_policy(o.network, o.asset, o.decimals))
        for o in settings.accepts
    }
    return BudgetEnforcer(store, defaults=defaults, timezone=b.timezone, hold_s=b.hold_s)


async def seed_policies(settings: GatewaySettings, enforcer) -> None:
    """Policies from the config file are written at start when the store has none for that
    owner, network and asset; changes made through the admin API persist and win."""
    assert settings.budgets is not None
    for entry in settings.budgets.policies:
        kind, owner = entry.owner()
        policy = entry.policy()
        if await enforcer.store.get_policy(kind, owner, policy.network, policy.asset) is None:
            await enforcer.put_policy(kind, owner, policy)


def create_app(
    settings: GatewaySettings,
    *,
    facilitator: FacilitatorClient | None = None,
    budgets: BudgetHook | None = None,
    metrics: GatewayMetrics | None = None,
) -> Starlette:
    pricing = Pricing(settings)
    enforcer = build_budgets(settings) if budgets is None else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        fac = facilitator or build_facilitator_client(settings)
        if isinstance(fac, LocalFacilitatorClient):
            fac.start()
        records = open_records(settings.store_url, prefix=settings.store_prefix)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=256, ttl_dns_cache=300, keepalive_timeout=30),
            auto_decompress=False, response_class=TrackedResponse,  # worker slots follow the body
        )
        m = metrics or GatewayMetrics()
        pools: dict[str, UpstreamPool | WorkerPool] = {
            name: WorkerPool(name, up, m) if up.kind == "workers" else UpstreamPool(name, up)
            for name, up in settings.upstreams.items()}
        if enforcer is not None:
            await seed_policies(settings, enforcer)
        background: list[asyncio.Task] = []
        if any(r.metered and "upto" in r.schemes for r in settings.routes):
            pricing.upto_signers = await fac.upto_signers()
        if settings.quote.feed_url:
            background.append(asyncio.create_task(pricing.quotes.refresh_forever(session)))
        hook = budgets or enforcer or NoBudgets()
        upstreams = Upstreams(pools, session)
        await upstreams.start()
        challenges = Challenges(settings)
        in_background: set[asyncio.Task[object]] = set()  # settlements of streams whose client left
        session_routes = {f"{r.method} {r.path}": r.sessions for r in settings.routes if r.sessions is not None}
        sessions_store, calls = None, None
        if session_routes:
            sessions_store = open_sessions(settings.store_url, prefix=settings.store_prefix)
            calls = SessionCalls(sessions_store, settings, fac, hook, m, upstreams, in_background)
            background.append(asyncio.create_task(calls.reap_forever(session_routes)))
        settlement = Settlement(settings, fac, records, hook, m, in_background)
        paywall = Paywall(settings, pricing, fac, records, hook, m, upstreams, challenges, settlement, calls)
        batch_routes = {f"{r.method} {r.path}": r.batch for r in settings.routes if r.batch is not None}
        channels = None
        if batch_routes:
            channels = open_channels(settings.store_url, prefix=settings.store_prefix)
            paywall.batch = BatchCalls(channels, fac, hook, challenges, paywall.forward, in_background)
            app.state.batch_manager = ChannelManager(channels, fac, batch_routes,
                                                     lease_s=min(b.manager_lease_s for b in batch_routes.values()))
            background.append(asyncio.create_task(app.state.batch_manager.run_forever()))
        app.state.gateway = GatewayState(paywall, records, fac, upstreams, m, pricing, challenges, sessions_store)
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await upstreams.close()
            await session.close()
            await fac.close()
            await records.close()
            if sessions_store is not None:
                await sessions_store.close()
            if channels is not None:
                await channels.close()
            if enforcer is not None:
                await enforcer.store.close()

    async def paid(request: Request) -> Response:
        state: GatewayState = request.app.state.gateway
        request_id = request.scope.get("state", {}).get("request_id", "")
        try:
            body = await read_limited(request, settings.max_body_bytes)
            if body is None:
                raise GatewayError(G.REQUEST_TOO_LARGE, f"request body exceeds {settings.max_body_bytes} bytes", status=400)
            response = await state.paywall.handle(request, body, request_id)
        except (GatewayError, Refusal, StoreUnavailableError) as exc:
            response = refused(request, exc)
        route_id = request.scope.get("state", {}).get("route_id", "unmatched")  # set by the paywall's match
        state.metrics.requests.labels(route_id, str(response.status_code)).inc()
        return response

    async def models(request: Request) -> Response:
        state: GatewayState = request.app.state.gateway
        return Response(orjson.dumps({"object": "list", "data": state.pricing.catalog()}), media_type="application/json")

    async def upto_session(request: Request) -> Response:
        """What an upto session has used and whether it is settled (the id is its credential)."""
        state: GatewayState = request.app.state.gateway
        s = await state.sessions.get(request.path_params["id"]) if state.sessions is not None else None
        if s is None:
            raise GatewayError(G.SESSION_UNKNOWN, "no such upto session", status=404)
        body = {"id": s.id, "state": s.state.value, "route": s.route, "payer": s.payer, "network": s.network,
                "asset": s.asset, "cap": str(s.cap), "accrued": str(s.accrued), "held": str(s.held), "calls": s.calls,
                "deadline": s.deadline, "transaction": s.tx}
        return Response(orjson.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"})

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def readyz(request: Request) -> Response:
        state: GatewayState = request.app.state.gateway
        checks = {"store": await _probe(state.records.ping)}
        if state.sessions is not None:
            checks["sessions"] = await _probe(state.sessions.ping)
        checks["facilitator"] = "ok" if await state.facilitator.ready() else "unavailable"
        checks["upstream"] = "ok" if any(await state.upstreams.healthy()) else "unavailable"
        ok = all(v == "ok" for v in checks.values())
        return Response(orjson.dumps({"status": "ok" if ok else "unavailable", "checks": checks}),
                        status_code=200 if ok else 503, media_type="application/json")

    async def metrics_endpoint(request: Request) -> Response:
        state: GatewayState = request.app.state.gateway
        body = generate_latest(state.metrics.registry)
        if isinstance(state.facilitator, LocalFacilitatorClient):  # the in-process facilitator's too
            body += generate_latest(state.facilitator.facilitator.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
    routes: list = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/upto/sessions/{id}", upto_session, methods=["GET"]),
    ]
    if enforcer is not None and settings.budgets is not None:
        from budgets.admin import create_admin_app
        from budgets.settings import admin_token

        assets = {(o.network, o.asset.lower()): (o.symbol, o.decimals) for o in settings.accepts}
        routes.append(Mount(settings.budgets.admin_prefix, app=create_admin_app(enforcer, admin_token(), assets=assets)))
    routes.append(Route("/{path:path}", paid, methods=methods))
    def refused(request: Request, exc: Exception) -> Response:
        """The one place a refusal becomes an answer (also Starlette's handler for them)."""
        state: GatewayState = request.app.state.gateway
        if isinstance(exc, StoreUnavailableError):
            # Fail closed: without the records we cannot promise "served at most once".
            exc = GatewayError(G.STORE_UNAVAILABLE, "the payment store is unreachable; nothing was charged", status=503,
                               headers={"Retry-After": "5"})
        assert isinstance(exc, (GatewayError, Refusal))
        return render_refusal(request, exc, state.challenges, state.metrics)

    handlers = {GatewayError: refused, Refusal: refused, StoreUnavailableError: refused}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.add_middleware(RequestIdMiddleware)
    return app


def app_from_env() -> Starlette:
    """uvicorn factory for multi-worker runs: each worker loads the settings from the options the
    parent was started with (GATEWAY_SERVE_ARGS: no secrets), resolving "$VAR" itself."""
    import json
    import os

    from gateway.cli import SERVE_ARGS_ENV, load_serve_settings

    return create_app(load_serve_settings(json.loads(os.environ[SERVE_ARGS_ENV])))
