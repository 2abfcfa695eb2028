"""The facilitator HTTP service: POST /verify, POST /settle, GET /supported, /healthz, /readyz,
/metrics.

Business outcomes answer 200 (`isValid:false` / `success:false` with a spec reason): the official
clients raise on anything else. A malformed request answers 400 with a structured body. Nothing
the client sends can produce a 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from facilitator.evm.chain import EvmChain, TokenInfo
from facilitator.evm.nonces import LocalNonces, RedisNonces
from facilitator.evm.rpc import Call, RpcError, RpcUnavailableError
from facilitator.evm.signer import Signer, SignerPool
from facilitator.metrics import FacilitatorMetrics
from facilitator.registry import SchemeRegistry
from facilitator.schemes.evm_batch import BatchSettlementEvmScheme
from facilitator.schemes.evm_exact import ExactEvmScheme
from facilitator.schemes.evm_upto import UptoEvmScheme
from facilitator.service import Facilitator
from facilitator.settings import FacilitatorSettings
from facilitator.store import open_store
from facilitator.store.base import StoreUnavailableError
from facilitator.x402.errors import WireFormatError
from facilitator.x402.headers import parse_json_body
from facilitator.x402.reasons import ErrorReason
from facilitator.x402.types import SettleRequest, VerifyRequest
from storage import bodies, is_redis_url

log = logging.getLogger("facilitator.app")


def json_response(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def build_facilitator(settings: FacilitatorSettings, *, metrics: FacilitatorMetrics | None = None) -> Facilitator:
    if not settings.signer_keys:
        raise ValueError("no signer keys configured (signer_keys, FACILITATOR_SIGNER_KEYS or --devchain)")
    if not settings.networks:
        raise ValueError("no networks configured")
    signers = SignerPool([Signer.from_key(k.get_secret_value()) for k in settings.signer_keys])
    # Several processes may share keys (replicas, or gateways with the facilitator in-process):
    # with a shared store, nonces are coordinated through it.
    nonces = (RedisNonces.from_url(settings.store_url, prefix=settings.store_prefix) if is_redis_url(settings.store_url)
              else LocalNonces())
    chains: dict[str, EvmChain] = {}
    for net in settings.networks:
        chains[net.network] = EvmChain.connect(
            net.network,
            net.chain_id,
            net.rpc_url.get_secret_value(),
            nonces=nonces,
            permit2=net.permit2,
            exact_proxy=net.exact_proxy,
            upto_proxy=net.upto_proxy,
            state_poll_s=settings.state_poll_s,
            tokens={
                t.address.lower(): TokenInfo(
                    t.address, t.symbol, t.decimals, t.transfer_method, t.eip712_name, t.eip712_version
                )
                for t in net.tokens
            },
        )
    store = open_store(settings.store_url, prefix=settings.store_prefix)
    return Facilitator(chains, signers, store, build_registry(chains, signers), metrics=metrics,
                       receipt_timeout_s=settings.receipt_timeout_s, claim_lease_s=settings.claim_lease_s)


def build_registry(chains: dict[str, EvmChain], signers: SignerPool) -> SchemeRegistry:
    """Every scheme this facilitator runs, on every configured network: the one place a scheme
    is enabled (and the one thing `/supported` lists)."""
    registry = SchemeRegistry()
    for chain in chains.values():
        registry.register(ExactEvmScheme(chain), x402_versions=(1, 2))
        registry.register(UptoEvmScheme(chain, signers.addresses))
        registry.register(BatchSettlementEvmScheme(chain))
    return registry


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or WireFormatError (a 400 naming why): too large, or not arrived whole."""
    try:
        return await bodies.read_body(request, limit)
    except (bodies.BodyTooLargeError, bodies.BodyIncompleteError) as exc:
        raise WireFormatError(ErrorReason.INVALID_PAYLOAD, str(exc)) from None


def bad_request(exc: WireFormatError) -> Response:
    body: dict = {"error": exc.reason.value, "message": exc.message}
    if getattr(exc, "errors", None):
        body["errors"] = exc.errors
    return json_response(body, 400)


async def _signer_gauges(fac: Facilitator) -> None:
    for network, chain in fac.chains.items():
        for signer in fac.signers.signers:
            try:
                bal, pending, latest = await chain.rpc.batch(
                    [
                        Call("eth_getBalance", [signer.address, "latest"]),
                        Call("eth_getTransactionCount", [signer.address, "pending"]),
                        Call("eth_getTransactionCount", [signer.address, "latest"]),
                    ]
                )
            except RpcUnavailableError:
                continue
            if not (isinstance(bal, RpcError) or isinstance(pending, RpcError) or isinstance(latest, RpcError)):
                fac.metrics.signer_balance.labels(network, signer.address).set(int(bal, 16))
                fac.metrics.signer_nonce_lag.labels(network, signer.address).set(int(pending, 16) - int(latest, 16))


async def reconcile_forever(fac: Facilitator, interval_s: float) -> None:
    """Finish settlements left unfinished by a crash or a receipt timeout; refresh gauges."""
    while True:
        try:
            await fac.settler.reconcile_once(fac.chains, older_than_s=fac.settler.receipt_timeout_s)
            fac.metrics.unfinished_settlements.set(fac.settler.unfinished)
            await _signer_gauges(fac)
        except (StoreUnavailableError, RpcUnavailableError) as exc:
            log.warning("reconcile_skipped", extra={"error": str(exc)})
        except Exception:
            log.exception("reconcile_failed")
        await asyncio.sleep(interval_s)


def create_app(settings: FacilitatorSettings, *, facilitator: Facilitator | None = None) -> Starlette:
    limit = settings.max_body_bytes

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        fac = facilitator or build_facilitator(settings)
        app.state.facilitator = fac
        task = asyncio.create_task(reconcile_forever(fac, settings.reconcile_interval_s))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await fac.close()

    async def verify(request: Request) -> Response:
        fac: Facilitator = request.app.state.facilitator
        try:
            body = parse_json_body(await read_body(request, limit), VerifyRequest, max_bytes=limit)
        except WireFormatError as exc:
            fac.metrics.bad_requests_total.labels("verify").inc()
            return bad_request(exc)
        resp = await fac.verify(body)
        return json_response(resp.model_dump(by_alias=True, exclude_none=True))

    async def settle(request: Request) -> Response:
        fac: Facilitator = request.app.state.facilitator
        try:
            body = parse_json_body(await read_body(request, limit), SettleRequest, max_bytes=limit)
        except WireFormatError as exc:
            fac.metrics.bad_requests_total.labels("settle").inc()
            return bad_request(exc)
        resp = await fac.settle(body)
        return json_response(resp.model_dump(by_alias=True, exclude_none=True))

    async def supported(request: Request) -> Response:
        fac: Facilitator = request.app.state.facilitator
        return json_response(fac.supported().model_dump(by_alias=True, exclude_none=True))

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        fac: Facilitator = request.app.state.facilitator
        checks: dict[str, str] = {}
        try:
            await fac.store.ping()
            checks["store"] = "ok"
        except StoreUnavailableError as exc:
            checks["store"] = f"unavailable: {exc}"
        for network, chain in fac.chains.items():
            try:
                await chain.rpc.call("eth_chainId", [])
                checks[network] = "ok"
            except (RpcError, RpcUnavailableError) as exc:
                checks[network] = f"unavailable: {type(exc).__name__}"
        ok = all(v == "ok" for v in checks.values())
        return json_response({"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503)

    async def metrics(request: Request) -> Response:
        fac: Facilitator = request.app.state.facilitator
        return Response(generate_latest(fac.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/verify", verify, methods=["POST"]),
            Route("/settle", settle, methods=["POST"]),
            Route("/supported", supported, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


SERVE_ARGS_ENV = "FACILITATOR_SERVE_ARGS"


def app_from_env() -> Starlette:
    """uvicorn factory for multi-worker runs: each worker loads the settings the way the parent
    did (config file, dev chain file, command-line overrides), resolving "$VAR" secrets from its
    own environment, so no secret is ever copied into an environment variable."""
    import json
    import os

    from facilitator.settings import load_settings

    source = json.loads(os.environ[SERVE_ARGS_ENV])
    return create_app(load_settings(source["config"], devchain_file=source["devchain"], overrides=source["overrides"]))
