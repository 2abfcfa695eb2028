"""What the paywall answers: JSON refusals, challenges (402 + PAYMENT-REQUIRED), receipts."""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from facilitator.x402.headers import (
    PAYMENT_RESPONSE_HEADER,
    X_PAYMENT_RESPONSE_HEADER,
    encode_payment_required,
    encode_settle_response,
)
from facilitator.x402.types import PaymentPayload, PaymentPayloadV1, PaymentRequired, ResourceInfo, SettleResponse
from gateway.budget_hook import Refusal
from gateway.errors import GatewayError, UpstreamRefused
from gateway.metrics import GatewayMetrics
from gateway.pricing import Offer, to_v1, v1_offered
from gateway.proxy import path_of
from gateway.settings import GatewaySettings

PAYMENT_IDENTIFIER_EXTENSION = {
    "payment-identifier": {
        "info": {"required": False},
        "schema": {
            "type": "object",
            "properties": {"id": {"type": "string", "minLength": 16, "maxLength": 128, "pattern": "^[a-zA-Z0-9_-]+$"}},
        },
    }
}


async def client_gone(receive: Receive) -> bool:
    """Whether the client already left, asked without waiting: the receive is stepped once and
    closed if it would wait (a connection still open). Starlette's `is_disconnected` does the same
    with an anyio cancel scope, at several times the cost, on every paid answer."""
    pending = receive()
    step = getattr(pending, "send", None)
    if step is None:  # not a coroutine: an awaitable of another kind, waited on as Starlette would not
        return False
    try:
        step(None)
    except StopIteration as done:
        return isinstance(done.value, dict) and done.value.get("type") == "http.disconnect"
    pending.close()  # type: ignore[attr-defined]
    return False


def json_error(status: int, error: str, message: str, *, headers: dict[str, str] | None = None, **extra: object) -> Response:
    body = {"error": error, "message": message, **{k: v for k, v in extra.items() if v not in (None, "")}}
    h = {"Cache-Control": "no-store", **(headers or {})}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=h)


def payment_response_header(payload: PaymentPayload | PaymentPayloadV1,
                            settled: SettleResponse | dict[str, Any]) -> dict[str, str]:
    """The receipt, in the header the payment's wire version reads (`settled`: the response, or
    its wire form built directly)."""
    name = X_PAYMENT_RESPONSE_HEADER if isinstance(payload, PaymentPayloadV1) else PAYMENT_RESPONSE_HEADER
    return {name: encode_settle_response(settled), "Cache-Control": "no-store",
            "Access-Control-Expose-Headers": f"{PAYMENT_RESPONSE_HEADER}, {X_PAYMENT_RESPONSE_HEADER}"}


class Challenges:
    """402 challenges: PAYMENT-REQUIRED (v2, cached per offer) and a v1 body with `accepts`."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._cache: dict[tuple[int, str | None, str, str], str] = {}

    def resource(self, request: Request, offer: Offer) -> ResourceInfo:
        # Not request.url: a query that is not UTF-8 makes it raise (a 500 for a challenge).
        base = self.settings.public_url or f"{request.base_url.scheme}://{request.base_url.netloc}"
        return ResourceInfo(url=base.rstrip("/") + path_of(request.scope), description=offer.route.description or None,
                            mime_type=offer.route.mime_type)

    def render(self, request: Request, offer: Offer, error: str, message: str, *, status: int = 402,
               extra_headers: dict[str, str] | None = None) -> Response:
        resource = self.resource(request, offer)
        cache_key = (id(offer), offer.model, resource.url, error)
        header = self._cache.get(cache_key)
        if header is None:
            header = encode_payment_required(PaymentRequired(
                x402_version=2, error=error, resource=resource, accepts=list(offer.requirements),
                extensions=PAYMENT_IDENTIFIER_EXTENSION if self.settings.payment_identifier_on(offer.route) else None,
            ))  # fmt: skip
            if len(self._cache) < 4096:
                self._cache[cache_key] = header
        body = {
            "x402Version": 1,  # v2 clients read PAYMENT-REQUIRED; v1 clients read this body
            "error": error,
            "message": message,
            "price": {"amount": str(offer.price), "model": offer.model, "route": offer.route_id},
            "accepts": [
                to_v1(r, resource.url, offer.route.description, offer.route.mime_type)
                .model_dump(by_alias=True, exclude_none=True)
                for r in offer.requirements if v1_offered(r)
            ],
        }
        headers = {"PAYMENT-REQUIRED": header, "Cache-Control": "no-store", **(extra_headers or {})}
        return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def render_refusal(request: Request, exc: GatewayError | Refusal, challenges: Challenges,
                   metrics: GatewayMetrics) -> Response:
    """The one place a refusal becomes an HTTP answer (and is counted)."""
    route_id = request.scope.get("state", {}).get("route_id")
    if route_id is not None:
        metrics.payments.labels(route_id, getattr(exc, "outcome", "refused"), exc.reason).inc()
    if isinstance(exc, UpstreamRefused):
        return Response(exc.body, status_code=exc.status, headers=dict(exc.upstream_headers))
    if isinstance(exc, Refusal):  # budgets: the reason, what remains, when the window resets
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else {}
        resets = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exc.resets_at))
                  if exc.resets_at is not None else None)
        return json_error(exc.status, exc.reason, exc.message, headers=headers, budget=exc.scope,
                          remaining=None if exc.remaining is None else str(exc.remaining), resets_at=resets)
    if exc.offer is not None:
        return challenges.render(request, exc.offer, exc.reason, exc.message, status=exc.status,
                                 extra_headers=exc.headers)
    return json_error(exc.status, exc.reason, exc.message, headers=exc.headers, **exc.extra)
