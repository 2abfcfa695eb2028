"""The gateway application: wiring only. The payment flow is in gateway/paywall/flow.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route

from budgets.reconcile import ReconcileError, ReconcileJob, Reconciler, Report, RpcCall
from facilitator.evm.rpc import JsonRpcClient, RpcError, RpcUnavailableError
from gateway.batch_calls import BatchCalls
from gateway.batch_channels import ChannelStore, open_channels
from gateway.batch_manager import ChannelManager
from gateway.budget_hook import BudgetHook, NoBudgets, Refusal
from gateway.errors import GatewayError
from gateway.errors import GatewayReason as G
from gateway.facilitator_client import FacilitatorClient, HttpFacilitatorClient, LocalFacilitatorClient
from gateway.intents import open_intents
from gateway.metrics import GatewayMetrics
from gateway.middleware import RequestIdMiddleware
from gateway.paywall.flow import Paywall
from gateway.paywall.recovery import Recovery
from gateway.paywall.responses import Challenges, json_error, render_refusal
from gateway.paywall.settle import Settlement
from gateway.pricing import Pricing
from gateway.proxy import UpstreamPool, Upstreams
from gateway.records import PaymentRecords, open_records, sweep_forever
from gateway.refusals import RefusalLog, open_refusals
from gateway.session_calls import SessionCalls
from gateway.session_funds import FundsWatch
from gateway.sessions import SessionStore, open_sessions
from gateway.settings import GatewaySettings
from gateway.tee.batcher import ProofBatcher, leaf_values
from gateway.tee.blobs import LocalBlobStore
from gateway.tee.chain_tx import TxSender
from gateway.tee.merkle import LEAF_ENCODING
from gateway.tee.pool import TeePool
from gateway.tee.proofs import ProofStore, open_proofs
from gateway.workers.pool import TrackedResponse, WorkerPool
from storage import StoreUnavailableError, is_redis_url
from storage.bodies import BODY_TIMEOUT_S, BodyIncompleteError, BodyTooLargeError, read_body

log = logging.getLogger("gateway.app")


def chain_clients(settings: GatewaySettings, fac: FacilitatorClient) -> tuple[dict[str, JsonRpcClient], list[JsonRpcClient]]:
    """network -> JSON-RPC client the gateway reads the chain with (sessions' funds watch,
    reconciliation): `rpc_urls` (or budgets.rpc_urls), else the in-process facilitator's own
    chains (a remote facilitator's chains are not ours to read). Also the clients made here,
    which the caller closes."""
    urls = dict(settings.budgets.rpc_urls) if settings.budgets is not None else {}
    urls |= settings.rpc_urls
    made = {network: JsonRpcClient(url) for network, url in urls.items()}
    out = dict(made)
    if isinstance(fac, LocalFacilitatorClient):
        for network, chain in fac.facilitator.chains.items():
            out.setdefault(network, chain.rpc)
    return out, list(made.values())


def reconcile_rpc(client: JsonRpcClient) -> RpcCall:
    """The client's calls, with the node's failures as reconciliation's own error (an answer, not a 500)."""

    async def call(method: str, params: list[Any]) -> Any:
        try:
            return await client.call(method, params)
        except (RpcError, RpcUnavailableError) as exc:
            raise ReconcileError(f"{method}: {exc}") from exc

    return call


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
    refusals: RefusalLog
    sessions: SessionStore | None = None  # when a route runs upto sessions
    proofs: ProofStore | None = None  # when tee proofs are anchored ([proofs])
    channels: ChannelStore | None = None  # when a route offers batch-settlement channels


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The whole body, or None above `limit`. Raises GatewayError when it does not come whole (the
    client left: nobody reads the answer; or too slowly)."""
    try:
        return await read_body(request, limit, timeout_s=BODY_TIMEOUT_S)
    except BodyTooLargeError:
        return None
    except BodyIncompleteError as exc:
        raise GatewayError(G.REQUEST_INCOMPLETE, exc.message, status=exc.status) from None


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
    return BudgetEnforcer(store, defaults=defaults, timezone=b.timezone, hold_s=b.hold_s, lease_calls=b.lease_calls,
                          lease_s=b.lease_s)


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
    gateway_metrics = metrics or GatewayMetrics()
    rpcs: dict[str, RpcCall] = {}  # the chains reconciliation reads, filled at start

    def reconciled(report: Report) -> None:
        for total in report.totals:
            gateway_metrics.reconcile_difference.labels(total.network, total.asset).set(total.difference)

    reconciler = None
    if enforcer is not None and settings.budgets is not None:
        reconciler = Reconciler(enforcer.store, payee=settings.pay_to, assets=[(o.network, o.asset) for o in settings.accepts],
                                rpcs=rpcs, clock=enforcer.clock, on_report=reconciled)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        fac = facilitator or build_facilitator_client(settings)
        if isinstance(fac, LocalFacilitatorClient):
            fac.start()
        records = open_records(settings.store_url, prefix=settings.store_prefix)
        refusals = RefusalLog(open_refusals(settings.store_url, prefix=settings.store_prefix))
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=256, ttl_dns_cache=300, keepalive_timeout=30),
            auto_decompress=False, response_class=TrackedResponse,  # worker slots follow the body
        )
        m = gateway_metrics
        chains, own_rpcs = chain_clients(settings, fac)
        rpcs.update({network: reconcile_rpc(client) for network, client in chains.items()})
        background: list[asyncio.Task] = []
        if reconciler is not None and settings.budgets is not None and settings.budgets.reconcile_every_s > 0:
            b = settings.budgets
            job = ReconcileJob(reconciler, every_s=b.reconcile_every_s, window_blocks=b.reconcile_window_blocks,
                               lag_blocks=b.reconcile_lag_blocks)
            background.append(asyncio.create_task(job.run_forever()))
        pools: dict[str, UpstreamPool | WorkerPool | TeePool] = {
            name: WorkerPool(name, up, m) if up.kind == "workers" else TeePool(name, up, m) if up.kind == "tee"
            else UpstreamPool(name, up)
            for name, up in settings.upstreams.items()}
        if enforcer is not None:
            await seed_policies(settings, enforcer)
        background.append(asyncio.create_task(refusals.flush_forever()))
        background.append(asyncio.create_task(sweep_forever(records)))
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
            if any(cfg.watch_funds for cfg in session_routes.values()):
                if not chains:
                    log.warning("session_funds_unwatched: no chain to read (set rpc_urls); sessions are bounded by "
                                "sessions.max_exposure alone")
                watch = FundsWatch(sessions_store, chains, session_routes, m, poll_s=settings.funds_poll_s)
                background.append(asyncio.create_task(watch.run_forever()))
        intents = open_intents(settings.store_url, prefix=settings.store_prefix)
        settlement = Settlement(settings, fac, records, hook, m, in_background, intents)
        background.append(asyncio.create_task(Recovery(settlement, intents,
                                                       interval_s=settings.recovery_interval_s).run_forever()))
        proofs, sender = None, None
        if settings.proofs is not None:
            proofs = open_proofs(settings.store_url, prefix=settings.store_prefix)
            sender = TxSender(settings.proofs.rpc_url, settings.proofs.chain_id,
                              settings.proofs.signer_key.get_secret_value())
            batcher = ProofBatcher(settings.proofs, proofs, LocalBlobStore(settings.proofs.blob_dir), m, sender)
            background.append(asyncio.create_task(batcher.run_forever()))
        paywall = Paywall(settings, pricing, fac, records, hook, m, upstreams, challenges, settlement, calls, proofs)
        batch_routes = {f"{r.method} {r.path}": r.batch for r in settings.routes if r.batch is not None}
        channels = None
        if batch_routes:
            channels = open_channels(settings.store_url, prefix=settings.store_prefix)
            paywall.batch = BatchCalls(channels, fac, hook, challenges, paywall.forward, in_background,
                                       keep_bytes=settings.replay_cache_bytes)
            app.state.batch_manager = ChannelManager(channels, fac, batch_routes,
                                                     lease_s=min(b.manager_lease_s for b in batch_routes.values()))
            background.append(asyncio.create_task(app.state.batch_manager.run_forever()))
        app.state.gateway = GatewayState(paywall, records, fac, upstreams, m, pricing, challenges, refusals,
                                         sessions=sessions_store, proofs=proofs, channels=channels)
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await upstreams.close()
            await session.close()
            await fac.close()
            for client in own_rpcs:
                await client.close()
            await records.close()
            await intents.close()
            await refusals.flush()
            await refusals.store.close()
            if sessions_store is not None:
                await sessions_store.close()
            if channels is not None:
                await channels.close()
            if enforcer is not None:
                await enforcer.close()
                await enforcer.store.close()
            if sender is not None:
                await sender.close()
            if proofs is not None:
                await proofs.close()

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

    async def proof(request: Request) -> Response:
        """A tee call's proof of inference: pending, or its leaf, Merkle path, root and transaction
        (check inclusion on the relay: `verifyInclusion`, or OpenZeppelin's MerkleProof)."""
        state: GatewayState = request.app.state.gateway
        key = request.path_params["request_hash"].lower()
        key = key if key.startswith("0x") else "0x" + key
        item = await state.proofs.get(key) if state.proofs is not None else None
        if item is None:
            raise GatewayError(G.NOT_FOUND, "no proof of inference is kept under this request hash", status=404)
        body: dict[str, object] = {"request_hash": item.request_hash, "output_hash": item.output_hash,
                                   "tee_id": item.tee_id, "tee_timestamp": item.timestamp,
                                   "settlement_type": item.kind, "state": item.state}
        headers = {"Cache-Control": "no-store", "X-Settlement-Type": item.kind}
        if item.state == "anchored":
            assert settings.proofs is not None
            body |= {"transaction": item.tx, "blob_id": item.blob_id, "relay": settings.proofs.relay,
                     "chain_id": settings.proofs.chain_id}
            headers |= {"X-Settlement-Tx-Hash": item.tx, "X-Settlement-Walrus-Blob-ID": item.blob_id}
            if item.kind == "batch":
                body |= {"leaf": {"inputHash": item.request_hash, "outputHash": item.output_hash,
                                  "teeSignatureHash": "0x" + leaf_values(item)[2].hex()},
                         "leaf_hash": item.leaf, "path": item.path, "root": item.root, "batch_size": item.batch_size,
                         "leaf_encoding": LEAF_ENCODING}
        return Response(orjson.dumps(body), status_code=200 if item.state == "anchored" else 202,
                        media_type="application/json", headers=headers)

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
    if settings.proofs is not None:
        routes.append(Route("/v1/proofs/{request_hash}", proof, methods=["GET"]))
    if enforcer is not None and settings.budgets is not None:
        from budgets.admin import create_admin_app
        from budgets.settings import admin_token

        assets = {(o.network, o.asset.lower()): (o.symbol, o.decimals) for o in settings.accepts}
        token = admin_token()
        admin_app = create_admin_app(enforcer, token, assets=assets, reconciler=reconciler)
        if token is not None and settings.console:  # ahead of the admin API's mount, which would take its paths
            from gateway.console import create_console_app
            from gateway.console.reconcile import chain_reconciler

            console = create_console_app(admin_app, token.get_secret_value(), gateway=lambda: app.state.gateway,
                                         settings=settings,
                                         reconciler=chain_reconciler(reconciler) if reconciler is not None else None)
            at = settings.budgets.admin_prefix.rstrip("/") + "/console"
            routes += [Route(at, lambda request: RedirectResponse(at + "/", 308)), Mount(at, app=console)]
        routes.append(Mount(settings.budgets.admin_prefix, app=admin_app))
    routes.append(Route("/{path:path}", paid, methods=methods))
    def refused(request: Request, exc: Exception) -> Response:
        """The one place a refusal becomes an answer (also Starlette's handler for them)."""
        state: GatewayState = request.app.state.gateway
        if isinstance(exc, StoreUnavailableError):
            # Fail closed: without the records we cannot promise "served at most once".
            exc = GatewayError(G.STORE_UNAVAILABLE, "the payment store is unreachable; nothing was charged", status=503,
                               headers={"Retry-After": "5"})
        assert isinstance(exc, (GatewayError, Refusal))
        route_id = request.scope.get("state", {}).get("route_id")
        # Logged: refusals of priced routes (not an unknown path), and not the challenge, which is
        # the first step of paying.
        if route_id is not None and exc.reason != G.PAYMENT_REQUIRED:
            payer, network, asset = request.scope.get("state", {}).get("payment", ("", "", ""))
            settling = isinstance(exc, GatewayError) and "PAYMENT-RESPONSE" in exc.headers  # settlement was tried
            kind = "budget" if isinstance(exc, Refusal) else "settlement" if settling else "call"
            tx = str(exc.extra.get("transaction") or "") if isinstance(exc, GatewayError) else ""
            state.refusals.note(route_id, exc.reason, exc.status, exc.message, payer, network, asset, kind=kind, tx=tx)
        return render_refusal(request, exc, state.challenges, state.metrics)

    def routing_refused(request: Request, exc: Exception) -> Response:
        """Starlette's own 404 and 405 (a method no route takes, `OPTIONS *`) in the gateway's JSON."""
        assert isinstance(exc, HTTPException)
        reason = {404: G.NOT_FOUND, 405: G.METHOD_NOT_ALLOWED}.get(exc.status_code, G.INVALID_REQUEST)
        return json_error(exc.status_code, reason, str(exc.detail), headers=dict(exc.headers or {}))

    handlers = {GatewayError: refused, Refusal: refused, StoreUnavailableError: refused, HTTPException: routing_refused}
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
