"""The payment flow, top to bottom.

    match route -> price -> decode payment -> bind to what we offered -> claim the payment record
    -> verify -> reserve budget -> forward upstream -> (2xx) settle -> record -> respond

Money rules this module keeps:
- nothing is served before settlement succeeded (streams settle before their first byte);
- upstream 4xx/5xx or failure: no settlement, the record is dropped, the payment stays usable;
- one signed payment is served at most once (records keyed by its on-chain identity);
- a settlement whose outcome is unknown (timeout, pending) is kept PENDING and never treated as
  free to retry: a resend asks the facilitator again and is served only once it says settled;
- settlement and its record run shielded from client disconnects.
"""

from __future__ import annotations

import asyncio
import hashlib
from decimal import Decimal
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from facilitator.x402.errors import PaymentHeaderError
from facilitator.x402.headers import (
    PAYMENT_RESPONSE_HEADER,
    X_PAYMENT_RESPONSE_HEADER,
    decode_payment_header,
    encode_payment_required,
    encode_settle_response,
)
from facilitator.x402.identity import payment_identity, signed_payload_digest
from facilitator.x402.networks import to_caip2
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequired,
    PaymentRequirements,
    PaymentRequirementsV1,
    ResourceInfo,
    SettleResponse,
    VerifyResponse,
)
from gateway.budget_hook import BudgetHook, Hold, Refusal
from gateway.claim import Claim, new_owner, retry_after_s
from gateway.facilitator_client import FacilitatorClient
from gateway.metering import StreamMeter, Usage, cap_request, cost_of, output_token_cap, to_base_units, usage_from_body
from gateway.metrics import GatewayMetrics
from gateway.pricing import Offer, OfferMismatchError, Pricing, PricingError, to_v1
from gateway.proxy import (
    UpstreamFailedError,
    UpstreamPool,
    UpstreamUnavailableError,
    forward_headers,
    read_all,
    response_headers,
)
from gateway.records import PaymentRecord, PaymentRecords, RecordState, RecordStoreUnavailableError
from gateway.settings import GatewaySettings
from gateway.sse_usage import forwarded_stream, usage_added

log = logging.getLogger("gateway.paywall")

PAYMENT_ID = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
RECORD_TTL_S = 86_400
# Outcomes where the facilitator may have moved money: keep the payment PENDING, never free.
NONCE_USED = {R.PERMIT2_INVALID_NONCE.value, R.INVALID_EXACT_EVM_NONCE_ALREADY_USED.value}
AMBIGUOUS = {R.SETTLEMENT_PENDING.value, R.UNEXPECTED_SETTLE_ERROR.value, R.INVALID_TRANSACTION_STATE.value}
PAYMENT_IDENTIFIER_EXTENSION = {
    "payment-identifier": {
        "info": {"required": False},
        "schema": {
            "type": "object",
            "properties": {"id": {"type": "string", "minLength": 16, "maxLength": 128, "pattern": "^[a-zA-Z0-9_-]+$"}},
        },
    }
}


def json_error(status: int, error: str, message: str, *, headers: dict[str, str] | None = None, **extra: object) -> Response:
    body = {"error": error, "message": message, **{k: v for k, v in extra.items() if v not in (None, "")}}
    h = {"Cache-Control": "no-store", **(headers or {})}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=h)


def payment_id_of(payload: PaymentPayload | PaymentPayloadV1) -> str | None:
    ext = getattr(payload, "extensions", None) or {}
    info = (ext.get("payment-identifier") or {}).get("info") if isinstance(ext, dict) else None
    pid = info.get("id") if isinstance(info, dict) else None
    if pid is None:
        return None
    if not isinstance(pid, str) or not PAYMENT_ID.match(pid):
        raise PaymentHeaderError(R.INVALID_PAYLOAD, "payment-identifier id must be 16-128 of [A-Za-z0-9_-]")
    return pid


@dataclass(frozen=True, slots=True)
class PaidCall:
    """One paid request, decoded and bound to what we offered, before the facilitator is asked."""

    request: Request
    offer: Offer
    body: bytes  # as forwarded (metered routes: max_tokens capped)
    payload: PaymentPayload | PaymentPayloadV1
    requirement: PaymentRequirements | PaymentRequirementsV1
    network: str  # CAIP-2
    key: str  # the payment's on-chain identity: one record per payment across replicas
    digest: str  # of the signed payload as presented: only this very payment gets its recorded result
    fp: str  # of the request (method, path, query, body as sent)
    payer: str  # as the payload claims it (verify names the real one)
    request_id: str

    @classmethod
    def of(cls, request: Request, offer: Offer, forward_body: bytes, body: bytes, payload: PaymentPayload | PaymentPayloadV1,
           requirement: PaymentRequirements | PaymentRequirementsV1, request_id: str) -> PaidCall:
        network = requirement.network if isinstance(requirement, PaymentRequirements) else to_caip2(requirement.network)
        payer, key = payment_identity(payload.payload, network, requirement.asset)
        target = request.url.path.encode() + b"?" + request.url.query.encode()
        fp = hashlib.sha256(b"%s %s\n" % (request.method.encode(), target) + body).hexdigest()
        return cls(request, offer, forward_body, payload, requirement, network, key,
                   signed_payload_digest(payload.payload), fp, payer, request_id)



class Paywall:
    def __init__(
        self,
        settings: GatewaySettings,
        pricing: Pricing,
        facilitator: FacilitatorClient,
        records: PaymentRecords,
        budgets: BudgetHook,
        metrics: GatewayMetrics,
        pools: dict[str, UpstreamPool],
        session: aiohttp.ClientSession,
    ) -> None:
        self.settings = settings
        self.pricing = pricing
        self.facilitator = facilitator
        self.records = records
        self.budgets = budgets
        self.metrics = metrics
        self.pools = pools
        self.session = session
        self._challenges: dict[tuple[int, str | None, str, str], str] = {}
        self._background: set[asyncio.Task] = set()  # settlements of streams whose client left
        self.sessions = None  # gateway.session_calls.SessionCalls when a route has upto sessions

    # -- challenges ---------------------------------------------------------------------------

    def _resource(self, request: Request, offer: Offer) -> ResourceInfo:
        base = self.settings.public_url or f"{request.url.scheme}://{request.url.netloc}"
        return ResourceInfo(url=base.rstrip("/") + request.url.path, description=offer.route.description or None,
                            mime_type=offer.route.mime_type)

    def challenge(self, request: Request, offer: Offer, error: str, message: str, *, status: int = 402,
                  extra_headers: dict[str, str] | None = None) -> Response:
        resource = self._resource(request, offer)
        cache_key = (id(offer), offer.model, resource.url, error)
        header = self._challenges.get(cache_key)
        if header is None:
            header = encode_payment_required(PaymentRequired(
                x402_version=2, error=error, resource=resource, accepts=list(offer.requirements),
                extensions=PAYMENT_IDENTIFIER_EXTENSION if self.settings.payment_identifier_on(offer.route) else None,
            ))  # fmt: skip
            if len(self._challenges) < 4096:
                self._challenges[cache_key] = header
        body = {
            "x402Version": 1,  # v2 clients read PAYMENT-REQUIRED; v1 clients read this body
            "error": error,
            "message": message,
            "price": {"amount": str(offer.price), "model": offer.model, "route": offer.route_id},
            "accepts": [
                to_v1(r, resource.url, offer.route.description, offer.route.mime_type).model_dump(by_alias=True, exclude_none=True)
                for r in offer.requirements
            ],
        }
        headers = {"PAYMENT-REQUIRED": header, "Cache-Control": "no-store", **(extra_headers or {})}
        return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)

    # -- the flow -----------------------------------------------------------------------------

    @property
    def _lease_ms(self) -> int:
        return int(self.settings.record_lease_s * 1000)

    # -- the flow -----------------------------------------------------------------------------

    async def handle(self, request: Request, body: bytes, request_id: str) -> Response:
        match = self.pricing.match(request.method, request.url.path)
        if match is None:
            if self.pricing.path_known(request.url.path):
                return json_error(405, "method_not_allowed", f"{request.method} is not offered on this path")
            return json_error(404, "not_found", "this path is not offered by the gateway")
        route, params = match
        request.scope.setdefault("state", {})["route_id"] = f"{route.method} {route.path}"  # the metric label
        try:
            offer = self.pricing.offer(route, params, body, probe=request.method == "HEAD")
        except PricingError as exc:
            return json_error(exc.status, exc.reason, exc.message)
        # Streams hide the usage the gateway asks for on the client's behalf (gateway/sse_usage.py).
        request.scope["state"]["added_usage"] = offer.token_price is not None and usage_added(
            body, anthropic=offer.route.api == "anthropic")
        session_id = request.headers.get("x-upto-session")
        if session_id and offer.route.sessions is not None and self.sessions is not None and request.method != "HEAD":
            try:
                capped = self._capped(offer, body)
            except PricingError as exc:
                return json_error(exc.status, exc.reason, exc.message)
            return await self.sessions.call(request, offer, capped, session_id, request_id)
        has_payment = "payment-signature" in request.headers or "x-payment" in request.headers
        if request.method == "HEAD" or not has_payment:
            return self.challenge(request, offer, "payment_required",
                                  f"This call costs {offer.price} (see accepts). Sign a payment and resend it in PAYMENT-SIGNATURE.")
        try:
            payload = decode_payment_header(request.headers)
            if payload is None:
                raise PaymentHeaderError(R.INVALID_PAYLOAD, "no payment header")
            # Where the extension is not declared, an id a client sends anyway is ignored.
            pid = payment_id_of(payload) if self.settings.payment_identifier_on(offer.route) else None
        except PaymentHeaderError as exc:
            self.metrics.payments.labels(offer.route_id, "refused", exc.reason.value).inc()
            return self.challenge(request, offer, exc.reason.value, exc.message, status=400)
        requirement = self._bind(payload, offer, request)
        if isinstance(requirement, Response):
            return requirement
        forward_body = body
        if offer.token_price is not None:
            try:
                forward_body = self._capped(offer, body)
            except PricingError as exc:
                return json_error(exc.status, exc.reason, exc.message)
        call = PaidCall.of(request, offer, forward_body, body, payload, requirement, request_id)
        try:
            await self.budgets.precheck(call.payer, call.network, requirement.asset, offer.route_id, offer.model)
        except Refusal as refusal:
            return self._refusal(offer, refusal)
        if pid is not None:
            bound = await self.records.link_id(pid, call.key, ttl_s=RECORD_TTL_S)
            if bound != call.key:  # a retry under an id already used: the earlier result, no new charge
                earlier = await self.records.get(bound)
                if earlier is not None:
                    return await self._retry_under_id(call, earlier)
                # the earlier payment was never charged (its record is gone): this one takes the id
                await self.records.link_id(pid, call.key, ttl_s=RECORD_TTL_S, replace=True)
        # Verify before claiming anything: a forged or malformed copy never holds the payment's
        # record, not even briefly, so no input can block someone else's payment.
        started = time.perf_counter()
        try:
            verify = await asyncio.wait_for(self.facilitator.verify(payload, requirement), self.settings.verify_timeout_s)
        except asyncio.TimeoutError:
            self.metrics.payments.labels(offer.route_id, "refused", R.UNEXPECTED_VERIFY_ERROR.value).inc()
            return self.challenge(request, offer, R.UNEXPECTED_VERIFY_ERROR.value, "the facilitator did not answer in time")
        verify_s = time.perf_counter() - started
        self.metrics.verify_seconds.labels(offer.route_id).observe(verify_s)
        spent = not verify.is_valid and verify.invalid_reason in NONCE_USED  # seen before, by us or elsewhere
        if not verify.is_valid and not spent:
            reason = verify.invalid_reason or R.INVALID_PAYLOAD.value
            if reason == R.UNEXPECTED_VERIFY_ERROR.value:
                await self.records.ping()  # our own store down (the facilitator's too, often): 503, not a 402
            self.metrics.payments.labels(offer.route_id, "refused", reason).inc()
            return self.challenge(request, offer, reason, verify.invalid_message or "the payment is not valid")
        owner = new_owner()
        existing = await self.records.begin(call.key, call.fp, call.digest, owner=owner, now_ms=_now_ms(),
                                            lease_ms=self._lease_ms)
        if existing is not None:
            return await self._existing(call, existing)
        claim = Claim(self.records, call.key, owner, self.settings.record_lease_s).start()
        try:
            if spent:
                response = await self._already_settled(call, claim, verify)
            else:
                response = await self._charge(call, claim, verify, verify_s)
        except BaseException:
            # An unexpected error (or cancellation) before settlement began: nothing was charged,
            # free the payment. Once settlement began, its shielded task records the outcome.
            await asyncio.shield(claim.close() if claim.settling else claim.abandon())
            raise
        if not claim.kept:
            await claim.close()
        return response

    def _bind(self, payload: PaymentPayload | PaymentPayloadV1, offer: Offer, request: Request
              ) -> PaymentRequirements | PaymentRequirementsV1 | Response:
        """The offered requirement this payment is for, compared field for field, before any
        facilitator call: a payment for a cheaper route, another payTo, asset or network fails here."""
        if isinstance(payload, PaymentPayload):
            try:
                return offer.bind(payload.accepted)
            except OfferMismatchError as exc:
                return self.challenge(request, offer, R.INVALID_PAYMENT_REQUIREMENTS.value, str(exc))
        for offered in offer.requirements:
            try:
                same_network = to_caip2(payload.network) == offered.network
            except Exception:
                same_network = False
            if payload.scheme == offered.scheme and same_network:
                resource = self._resource(request, offer)
                return to_v1(offered, resource.url, offer.route.description, offer.route.mime_type)
        return self.challenge(request, offer, R.INVALID_PAYMENT_REQUIREMENTS.value,
                              "no offered requirement has this payment's scheme and network")

    def _refusal(self, offer: Offer, refusal: Refusal) -> Response:
        """Budget refusals are explicit: the reason, what remains, when the window resets."""
        self.metrics.payments.labels(offer.route_id, "refused", refusal.reason).inc()
        headers = {"Retry-After": str(refusal.retry_after_s)} if refusal.retry_after_s else {}
        resets = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(refusal.resets_at))
                  if refusal.resets_at is not None else None)
        return json_error(refusal.status, refusal.reason, refusal.message, headers=headers, budget=refusal.scope,
                          remaining=None if refusal.remaining is None else str(refusal.remaining), resets_at=resets)

    async def _charge(self, call: PaidCall, claim: Claim, verify: VerifyResponse, verify_s: float) -> Response:
        """Reserve, forward, settle a verified payment that is ours (claimed) for all of it."""
        offer, requirement, route_id = call.offer, call.requirement, call.offer.route_id
        amount = int(requirement.amount if isinstance(requirement, PaymentRequirements) else requirement.max_amount_required)
        payer = verify.payer or call.payer  # a third-party facilitator may omit payer
        if (self.sessions is not None and offer.route.sessions is not None and isinstance(call.payload, PaymentPayload)
                and isinstance(requirement, PaymentRequirements) and requirement.scheme == "upto"):
            return await self._open_session(call, claim, payer)
        try:
            hold = await self.budgets.reserve(payer, call.network, requirement.asset, amount, route_id, offer.model,
                                              call.request_id)
        except Refusal as refusal:
            await claim.abandon()
            return self._refusal(offer, refusal)
        try:
            return await self._forward_and_settle(call, claim, hold, amount, verify_s)
        except BaseException:
            if not claim.settling:  # nothing was charged: the budget hold goes back too
                await asyncio.shield(self.budgets.release(hold))
            raise

    async def _forward_and_settle(self, call: PaidCall, claim: Claim, hold: Hold, amount: int, verify_s: float) -> Response:
        offer, requirement, route_id = call.offer, call.requirement, call.offer.route_id
        pool = self.pools[offer.route.upstream]
        started = time.perf_counter()
        try:
            upstream = await self.open_upstream(call.request, offer, call.body, call.request_id)
        except (UpstreamUnavailableError, UpstreamFailedError) as exc:
            await self._not_charged(claim, hold, offer, "upstream_unavailable")
            return json_error(502, "upstream_unavailable", f"the upstream could not be reached ({exc}); you were not charged")
        if upstream.status >= 400:
            try:
                err_body = await read_all(upstream, self.settings.max_body_bytes)
            except UpstreamFailedError:
                err_body = b""
            finally:
                upstream.release()
            await self._not_charged(claim, hold, offer, "upstream_error")
            return Response(err_body, status_code=upstream.status, headers=dict(response_headers(upstream)))
        streaming = upstream.headers.get("content-type", "").startswith("text/event-stream")
        metered = offer.token_price is not None and requirement.scheme == "upto"
        first = content = b""
        try:
            if streaming:
                first = await upstream.content.readany()
            else:
                content = await read_all(upstream, self.settings.max_body_bytes)
                upstream.release()
        except (UpstreamFailedError, asyncio.TimeoutError, aiohttp.ClientError) as exc:
            upstream.release()
            await self._not_charged(claim, hold, offer, "upstream_error")
            return json_error(502, "upstream_error", f"the upstream failed ({type(exc).__name__}); you were not charged")
        upstream_s = time.perf_counter() - started
        self.metrics.upstream_seconds.labels(route_id, pool.name).observe(upstream_s)
        status, out_headers = upstream.status, response_headers(upstream)
        record = PaymentRecord(key=call.key, state=RecordState.PROCESSING, request_fp=call.fp, status=status,
                               headers=out_headers, digest=call.digest, owner=claim.owner)
        if metered and streaming:
            assert isinstance(requirement, PaymentRequirements)
            claim.kept = claim.settling = True  # tokens flow before settlement: the permit guarantees it
            stream = self._metered_stream(call, claim, first, upstream, record, requirement, hold)
            return StreamingResponse(forwarded_stream(call.request, stream), status_code=status,
                                     headers=dict(out_headers) | {"Cache-Control": "no-store"})
        details = None
        settle_requirement = requirement
        if metered:
            assert isinstance(requirement, PaymentRequirements)
            amount, details = self._metered_charge(offer, requirement, usage_from_body(content))
            settle_requirement = requirement.model_copy(update={"amount": str(amount)})
        record.payment = _payment_json(call.payload, settle_requirement)
        started = time.perf_counter()
        claim.settling = True
        settle_task = asyncio.ensure_future(self._settle(call, claim, record, settle_requirement, hold, amount,
                                                         None if streaming else content, details))
        try:
            settled = await asyncio.shield(settle_task)
        except asyncio.CancelledError:
            upstream.release()
            raise
        if not settled.success:
            upstream.release()
            return self._settle_failure(call.request, offer, settled, call.payload)
        settle_s = time.perf_counter() - started
        response_header = self._payment_response_header(call.payload, settled)
        # Where the time went (RFC Server-Timing, milliseconds): lets agents and load tests see
        # the gateway's own cost apart from the upstream and the chain.
        response_header["Server-Timing"] = (
            f"verify;dur={verify_s * 1000:.2f}, upstream;dur={upstream_s * 1000:.2f}, settle;dur={settle_s * 1000:.2f}"
        )
        if record.cached:
            return Response(content, status_code=status, headers=dict(out_headers) | response_header)
        # Paid, and the response is not kept: it is owed until its last byte went out.
        claim.kept = True
        body = forwarded_stream(call.request, _relay(first, upstream)) if streaming else _once(content)
        return StreamingResponse(self._delivering(body, record, claim), status_code=status,
                                 headers=dict(out_headers) | response_header)

    async def _open_session(self, call: PaidCall, claim: Claim, payer: str) -> Response:
        """A verified upto permit on a session route opens a session; the payment's record says so,
        so the same permit can never open a second one."""
        assert self.sessions is not None
        assert isinstance(call.payload, PaymentPayload) and isinstance(call.requirement, PaymentRequirements)
        session_id = await self.sessions.open(call.offer, call.payload, call.requirement, payer)
        marker = SettleResponse(success=True, payer=payer, transaction="", network=call.requirement.network,
                                extra={"session": session_id})
        await self.records.save(PaymentRecord(key=call.key, state=RecordState.SETTLED, request_fp=call.fp,
                                              settle=marker.model_dump_json(by_alias=True, exclude_none=True),
                                              digest=call.digest, delivered=True),
                                ttl_s=RECORD_TTL_S)
        return await self.sessions.call(call.request, call.offer, call.body, session_id, call.request_id, opened=True)

    async def _already_settled(self, call: PaidCall, claim: Claim, verify: VerifyResponse) -> Response:
        """The payment's nonce is spent. If it was spent by settling this very payment (our
        facilitator answers a repeated settle with the first result, and only for the same signed
        payment), the replica that settled it died or lost its record before answering: the call
        is owed and is served once, without a new charge. Otherwise the payment is refused."""
        try:
            earlier = await asyncio.wait_for(self.facilitator.settle(call.payload, call.requirement),
                                             self.settings.settle_timeout_s)
        except asyncio.TimeoutError:
            earlier = None
        if earlier is not None and earlier.success:
            record = PaymentRecord(key=call.key, state=RecordState.SETTLED, request_fp=call.fp, tx=earlier.transaction,
                                   settle=earlier.model_dump_json(by_alias=True, exclude_none=True), digest=call.digest,
                                   owner=claim.owner, lease_until_ms=claim.now_ms() + claim.lease_ms)
            await self._save_after_settlement(record, call.request_id)
            self.metrics.payments.labels(call.offer.route_id, "settled", "recovered").inc()
            return await self._deliver(call, claim, record, earlier)
        if earlier is None or self._unresolved(earlier):
            # The money may be moving right now (another replica mid-settlement): never free.
            record = PaymentRecord(key=call.key, state=RecordState.PENDING, request_fp=call.fp, digest=call.digest,
                                   tx=earlier.transaction if earlier else "",
                                   payment=_payment_json(call.payload, call.requirement))
            await self._save_after_settlement(record, call.request_id)
            return json_error(402, R.SETTLEMENT_PENDING.value, "this payment's settlement is not confirmed yet; resend the "
                              "same payment to get the response once it is. Do not pay again.", transaction=record.tx)
        await claim.abandon()
        reason = verify.invalid_reason or R.INVALID_PAYLOAD.value
        self.metrics.payments.labels(call.offer.route_id, "refused", reason).inc()
        return self.challenge(call.request, call.offer, reason, verify.invalid_message or "the payment's nonce is already used")

    def _unresolved(self, settled: SettleResponse) -> bool:
        """The facilitator may have moved the money: the payment is PENDING, never free."""
        final = self.facilitator.trusted and bool((settled.extra or {}).get("final"))
        reason = settled.error_reason or R.UNEXPECTED_SETTLE_ERROR.value  # no reason given: it may have moved
        return (reason in AMBIGUOUS or bool(settled.transaction)) and not final

    async def _not_charged(self, claim: Claim, hold: Hold, offer: Offer, reason: str) -> None:
        await claim.abandon()
        await self.budgets.release(hold)
        self.metrics.payments.labels(offer.route_id, "not_charged", reason).inc()

    async def open_upstream(self, request: Request, offer: Offer, body: bytes, request_id: str) -> aiohttp.ClientResponse:
        """The route's upstream answering this request (status and headers read, body not yet),
        with the agent's payment and auth headers replaced by the provider's key."""
        pool = self.pools[offer.route.upstream]
        path_qs = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = forward_headers(request.headers.raw, pool.config)
        headers["x-request-id"] = request_id
        return await pool.open(self.session, request.method, path_qs, headers, body)

    def _capped(self, offer: Offer, body: bytes, *, ceiling: Decimal | None = None) -> bytes:
        """The request as forwarded on a metered route: max_tokens capped so the worst case stays
        under the ceiling (the route's max_per_call, or a lower one such as what a session can
        still pay; and under the route's cap); streamed calls asked to report usage."""
        assert offer.token_price is not None
        cap = output_token_cap(len(body), offer.token_price, offer.price if ceiling is None else ceiling)
        if offer.route.max_tokens_cap is not None:
            cap = min(cap, offer.route.max_tokens_cap)
        if cap <= 0:
            raise PricingError("prompt_too_large", "the prompt alone could cost more than the per-call maximum")
        try:
            return cap_request(body, cap, anthropic=offer.route.api == "anthropic")
        except (orjson.JSONDecodeError, TypeError, ValueError):
            raise PricingError("invalid_request", "request body must be a JSON object") from None

    def _metered_charge(self, offer: Offer, requirement: PaymentRequirements, usage: Usage | None,
                        *, cut: bool = False, policy: str | None = None) -> tuple[int, dict]:
        """What an upto call costs in the asset: metered from the usage the upstream reported,
        or by the route's policy when usage is missing or the stream was cut. Never above the
        signed maximum."""
        assert offer.token_price is not None
        ceiling = int(requirement.amount)
        rate, decimals = next((r, d) for a, r, d in offer.rates if a == requirement.asset.lower())
        if usage is not None and not cut:
            cost = cost_of(usage, offer.token_price)
            amount = min(to_base_units(cost, rate, decimals), ceiling)
            return amount, {"usage_policy": "metered", "input_tokens": usage.input_tokens,
                            "output_tokens": usage.output_tokens, "cost": str(cost)}
        policy = policy or offer.route.missing_usage
        amount = ceiling if policy == "ceiling" else min(to_base_units(offer.token_price.per_call, rate, decimals), ceiling)
        details = {"usage_policy": policy, "reason": "stream cut" if cut else "usage missing"}
        if usage is not None:
            details |= {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}
        return amount, details

    async def _metered_stream(self, call: PaidCall, claim: Claim, first: bytes, upstream: aiohttp.ClientResponse,
                              record: PaymentRecord, requirement: PaymentRequirements, hold: Hold):
        """upto + SSE: the tokens flow as they come (the signed permit guarantees payment up to its
        maximum); the metered amount is settled when the stream ends and reported in a final
        `x402.payment` event. A client that leaves mid-stream is charged by the route's policy."""
        meter = StreamMeter()
        finished = False
        upstream_cut = False
        try:
            try:
                if first:
                    meter.feed(first)
                    yield first
                async for chunk in upstream.content.iter_any():
                    meter.feed(chunk)
                    yield chunk
            except (aiohttp.ClientError, asyncio.TimeoutError):
                upstream_cut = True
                log.warning("upstream_stream_cut", extra={"request_id": call.request_id})
            finished = True
        finally:
            upstream.release()
            if not finished:  # the client went away: settle what it used, in the background
                task = asyncio.ensure_future(self._settle_stream(call, claim, record, requirement, hold, meter, cut=True))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        settled, details = await asyncio.shield(self._settle_stream(
            call, claim, record, requirement, hold, meter, cut=upstream_cut or not meter.complete))
        event = {"success": settled.success, "transaction": settled.transaction, "network": settled.network,
                 "amount": settled.amount, "errorReason": settled.error_reason, **details,
                 "paymentResponse": encode_settle_response(settled)}
        yield b"event: x402.payment\ndata: " + orjson.dumps({k: v for k, v in event.items() if v is not None}) + b"\n\n"

    async def _settle_stream(self, call: PaidCall, claim: Claim, record: PaymentRecord, requirement: PaymentRequirements,
                             hold: Hold, meter: StreamMeter, *, cut: bool) -> tuple[SettleResponse, dict]:
        try:
            amount, details = self._metered_charge(call.offer, requirement, meter.usage, cut=cut)
            settle_requirement = requirement.model_copy(update={"amount": str(amount)})
            record.payment = _payment_json(call.payload, settle_requirement)
            record.delivered = True  # the tokens went out as they came; what they cost is settled now
            settled = await self._settle(call, claim, record, settle_requirement, hold, amount, None, details)
        finally:
            await claim.close()
        if not settled.success:
            log.error("upto_stream_settlement_failed", extra={"request_id": call.request_id,
                                                              "reason": settled.error_reason, "tx": settled.transaction})
        return settled, details

    async def _settle(self, call: PaidCall, claim: Claim, record: PaymentRecord,
                      requirement: PaymentRequirements | PaymentRequirementsV1, hold: Hold, amount: int,
                      content: bytes | None, details: dict | None = None) -> SettleResponse:
        """Settle, then record what happened and count it against the budget, whatever the client
        does meanwhile (runs shielded). `content`: a complete response that may be kept for replays."""
        offer, network, request_id = call.offer, call.network, call.request_id
        started = time.perf_counter()
        try:
            settled = await asyncio.wait_for(self.facilitator.settle(call.payload, requirement), self.settings.settle_timeout_s)
        except asyncio.TimeoutError:
            settled = SettleResponse(success=False, error_reason=R.UNEXPECTED_SETTLE_ERROR.value,
                                     error_message="the facilitator did not answer in time", transaction="", network=network)
        self.metrics.settle_seconds.labels(offer.route_id).observe(time.perf_counter() - started)
        record.tx = settled.transaction or ""
        record.settle = settled.model_dump_json(by_alias=True, exclude_none=True)
        record.owner, record.lease_until_ms = "", 0
        if content is not None and len(content) <= self.settings.replay_cache_bytes:
            record.body, record.cached = content, True  # kept: any resend of this payment gets it
        if settled.success:
            record.state = RecordState.SETTLED
            if record.cached:
                record.delivered = True
            elif not record.delivered:  # about to be delivered by this request, which keeps the lease
                record.owner, record.lease_until_ms = claim.owner, claim.now_ms() + claim.lease_ms
            await self._save_after_settlement(record, request_id)
            await self.budgets.commit(hold, amount, settled.transaction, request_id, details)
            self.metrics.payments.labels(offer.route_id, "settled", "").inc()
            self.metrics.revenue.labels(network, requirement.asset.lower()).inc(amount)
            log.info("payment_settled", extra={"request_id": request_id, "route": offer.route_id, "tx": settled.transaction})
        elif self._unresolved(settled):
            # The money may have moved: never free to retry, never served until confirmed settled.
            record.state = RecordState.PENDING
            await self._save_after_settlement(record, request_id)
            await self.budgets.commit(hold, amount, settled.transaction, request_id, details)  # conservative: counts as spent
            self.metrics.payments.labels(offer.route_id, "pending", settled.error_reason or "").inc()
            log.warning("settlement_unresolved", extra={"request_id": request_id, "route": offer.route_id,
                                                       "tx": settled.transaction, "reason": settled.error_reason})
        else:
            await claim.abandon()
            await self.budgets.release(hold)
            self.metrics.payments.labels(offer.route_id, "settle_failed", settled.error_reason or "").inc()
        return settled

    async def _save_after_settlement(self, record: PaymentRecord, request_id: str) -> None:
        """Once money may have moved, a store outage must not turn the answer into "nothing was
        charged": the record is written best-effort (and the facilitator's own store still refuses
        a second settlement of this payment)."""
        try:
            await self.records.save(record, ttl_s=RECORD_TTL_S)
        except RecordStoreUnavailableError:
            log.error("payment_record_not_saved", extra={"request_id": request_id, "tx": record.tx,
                                                         "state": record.state.value})

    async def _delivering(self, body: AsyncIterator[bytes], record: PaymentRecord, claim: Claim) -> AsyncIterator[bytes]:
        """The body of a paid response that is not kept for replays: once its last byte went out,
        the record says it was delivered; cut before that, it stays owed to a resend."""
        try:
            async for chunk in body:
                yield chunk
            record.delivered = True
        except (aiohttp.ClientError, asyncio.TimeoutError):
            log.warning("upstream_stream_cut", extra={"tx": record.tx})
        finally:
            # Cut (the client left, the upstream broke) or complete: either way the next resend
            # need not wait for this lease; a cut one finds the call still owed.
            await claim.close()
            record.owner, record.lease_until_ms = "", 0
            try:
                await asyncio.shield(self.records.save(record, ttl_s=RECORD_TTL_S, owner=claim.owner))
            except (RecordStoreUnavailableError, asyncio.CancelledError):
                log.warning("payment_delivery_not_recorded", extra={"tx": record.tx, "delivered": record.delivered})

    def _settle_failure(self, request: Request, offer: Offer, settled: SettleResponse,
                        payload: PaymentPayload | PaymentPayloadV1) -> Response:
        reason = settled.error_reason or R.UNEXPECTED_SETTLE_ERROR.value
        headers = self._payment_response_header(payload, settled)
        if self._unresolved(settled):
            return json_error(402, reason, (settled.error_message or "settlement is not confirmed")
                              + "; the content was not served. Resend the same payment to get it once settled; do not pay again.",
                              headers=headers, transaction=settled.transaction, network=settled.network)
        return self.challenge(request, offer, reason, settled.error_message or "settlement failed; you were not charged",
                              extra_headers=headers)

    def _payment_response_header(self, payload: PaymentPayload | PaymentPayloadV1, settled: SettleResponse) -> dict[str, str]:
        name = X_PAYMENT_RESPONSE_HEADER if isinstance(payload, PaymentPayloadV1) else PAYMENT_RESPONSE_HEADER
        return {name: encode_settle_response(settled), "Cache-Control": "no-store",
                "Access-Control-Expose-Headers": f"{PAYMENT_RESPONSE_HEADER}, {X_PAYMENT_RESPONSE_HEADER}"}

    async def _deliver(self, call: PaidCall, claim: Claim, record: PaymentRecord, settled: SettleResponse) -> Response:
        """Serve a call that was paid for but never delivered (its replica died after settling, its
        stream was cut, or its settlement was confirmed only on a resend): forward it again,
        without charging again. The caller holds the record's lease."""
        offer = call.offer
        try:
            upstream = await self.open_upstream(call.request, offer, call.body, call.request_id)
        except (UpstreamUnavailableError, UpstreamFailedError) as exc:
            await self._release_lease(record, claim)
            return json_error(502, "upstream_unavailable", f"paid, but the upstream failed ({exc}); resend the same "
                              "payment to get the response", transaction=record.tx)
        if upstream.status >= 400:
            upstream.release()
            await self._release_lease(record, claim)
            return json_error(502, "upstream_error", f"paid, but the upstream answered {upstream.status}; resend the "
                              "same payment to get the response", transaction=record.tx)
        self.metrics.payments.labels(offer.route_id, "delivered", "owed").inc()
        claim.kept = True
        header = self._payment_response_header(call.payload, settled)
        body = forwarded_stream(call.request, _relay(b"", upstream))
        return StreamingResponse(self._delivering(body, record, claim), status_code=upstream.status,
                                 headers=dict(response_headers(upstream)) | header)

    async def _release_lease(self, record: PaymentRecord, claim: Claim) -> None:
        record.owner, record.lease_until_ms = "", 0
        try:
            await self.records.save(record, ttl_s=RECORD_TTL_S, owner=claim.owner)
        except RecordStoreUnavailableError:
            pass  # the lease lapses by itself

    async def _retry_under_id(self, call: PaidCall, earlier: PaymentRecord) -> Response:
        """A fresh payment under a payment-identifier used before: the earlier result, without a
        new charge, but only for the same payer proving it with a valid signature (an id is not
        a voucher anyone may present)."""
        offer = call.offer
        stored = orjson.loads(earlier.payment) if earlier.payment else None
        earlier_payer = ""
        if stored is not None:
            p, req = _payment_from_json(stored)
            network = req.network if isinstance(req, PaymentRequirements) else to_caip2(req.network)
            earlier_payer, _ = payment_identity(p.payload, network, req.asset)
        if not earlier_payer or earlier_payer.lower() != call.payer.lower():
            self.metrics.payments.labels(offer.route_id, "refused", "payment_identifier_conflict").inc()
            return json_error(409, "payment_identifier_conflict", "this payment-identifier belongs to another payment")
        try:
            verify = await asyncio.wait_for(self.facilitator.verify(call.payload, call.requirement),
                                            self.settings.verify_timeout_s)
        except asyncio.TimeoutError:
            return self.challenge(call.request, offer, R.UNEXPECTED_VERIFY_ERROR.value, "the facilitator did not answer in time")
        if not verify.is_valid or (verify.payer or call.payer).lower() != earlier_payer.lower():
            reason = verify.invalid_reason or "payment_identifier_conflict"
            self.metrics.payments.labels(offer.route_id, "refused", reason).inc()
            return self.challenge(call.request, offer, reason, verify.invalid_message or "the payment is not valid")
        return await self._existing(call, earlier, proven=True)

    async def _existing(self, call: PaidCall, record: PaymentRecord, *, proven: bool = False) -> Response:
        """The payment was seen before. Its result goes only to the very payment that was recorded
        (`proven`: a payment-identifier retry whose payer proved it is the same payer)."""
        offer, route_id = call.offer, call.offer.route_id
        if not proven and record.digest != call.digest:
            # Payer and nonce are public once settled: a copy with another signature buys nothing.
            self.metrics.payments.labels(route_id, "refused", "payment_already_used").inc()
            return json_error(402, "payment_already_used", "this payment's nonce belongs to another signed payment that "
                              "was already used", transaction=record.tx)
        now = _now_ms()
        if record.lease_until_ms > now:
            self.metrics.payments.labels(route_id, "refused", "payment_in_progress").inc()
            return json_error(409, "payment_in_progress", "this payment is being processed by another request",
                              headers={"Retry-After": str(retry_after_s(record.lease_until_ms, now))})
        if record.state == RecordState.SETTLED and self.sessions is not None and offer.route.sessions is not None:
            session_id = ((orjson.loads(record.settle) if record.settle else {}).get("extra") or {}).get("session")
            if session_id:  # the permit opened a session: a resend continues it
                return await self.sessions.call(call.request, offer, call.body, session_id, call.request_id)
        if record.request_fp != call.fp:
            self.metrics.payments.labels(route_id, "refused", "payment_already_used").inc()
            return json_error(402, "payment_already_used", "this payment was already used for another request (resend "
                              "that request to get its response)", transaction=record.tx)
        if record.state == RecordState.SETTLED and record.cached:
            self.metrics.payments.labels(route_id, "replayed", "").inc()
            header = self._payment_response_header(call.payload, SettleResponse.model_validate_json(record.settle))
            return Response(record.body, status_code=record.status, headers=dict(record.headers) | header)
        if record.state == RecordState.SETTLED and record.delivered:
            self.metrics.payments.labels(route_id, "refused", "payment_already_used").inc()
            return json_error(402, "payment_already_used", "this payment was settled and its response was already "
                              "delivered", transaction=record.tx)
        # Pending, or settled and owed: one request at a time resolves it.
        owner = new_owner()
        held = await self.records.acquire(call.key, owner, now_ms=now, lease_ms=self._lease_ms)
        if held is None:
            return json_error(409, "payment_in_progress", "this payment is being processed by another request",
                              headers={"Retry-After": str(retry_after_s(now + self._lease_ms, now))})
        claim = Claim(self.records, call.key, owner, self.settings.record_lease_s).start()
        try:
            response = await self._resume(call, claim, held)
        finally:
            if not claim.kept:
                await claim.close()
        return response

    async def _resume(self, call: PaidCall, claim: Claim, record: PaymentRecord) -> Response:
        if record.state == RecordState.PENDING:
            stored = orjson.loads(record.payment) if record.payment else None
            payload, requirement = _payment_from_json(stored) if stored else (call.payload, call.requirement)
            try:
                settled = await asyncio.wait_for(self.facilitator.settle(payload, requirement), self.settings.settle_timeout_s)
            except asyncio.TimeoutError:
                settled = SettleResponse(success=False, error_reason=R.SETTLEMENT_PENDING.value, transaction=record.tx,
                                         error_message="the facilitator did not answer in time", network=call.network)
            if not settled.success:
                await self._release_lease(record, claim)
                return json_error(402, settled.error_reason or R.SETTLEMENT_PENDING.value,
                                  (settled.error_message or "settlement not confirmed") + "; do not pay again",
                                  transaction=settled.transaction or record.tx)
            record.state, record.tx = RecordState.SETTLED, settled.transaction
            record.settle = settled.model_dump_json(by_alias=True, exclude_none=True)
            await self._save_after_settlement(record, call.request_id)
            self.metrics.payments.labels(call.offer.route_id, "settled", "resolved_pending").inc()
        settled = SettleResponse.model_validate_json(record.settle)
        if record.cached or record.delivered:
            await self._release_lease(record, claim)
            if record.delivered and not record.cached:  # a metered stream: its tokens went out as they came
                return json_error(402, "payment_already_used", "this payment was settled and its response was already "
                                  "delivered", transaction=record.tx)
            header = self._payment_response_header(call.payload, settled)
            return Response(record.body, status_code=record.status, headers=dict(record.headers) | header)
        return await self._deliver(call, claim, record, settled)


def _payment_json(payload: PaymentPayload | PaymentPayloadV1, requirement: PaymentRequirements | PaymentRequirementsV1) -> str:
    return orjson.dumps({
        "payload": payload.model_dump(by_alias=True, exclude_none=True),
        "requirements": requirement.model_dump(by_alias=True, exclude_none=True),
    }).decode()


def _payment_from_json(stored: dict) -> tuple[PaymentPayload | PaymentPayloadV1, PaymentRequirements | PaymentRequirementsV1]:
    if stored["payload"].get("x402Version") == 1:
        return PaymentPayloadV1.model_validate(stored["payload"]), PaymentRequirementsV1.model_validate(stored["requirements"])
    return PaymentPayload.model_validate(stored["payload"]), PaymentRequirements.model_validate(stored["requirements"])


async def _relay(first: bytes, upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Stream the upstream's bytes through as they come (no buffering). An upstream that breaks
    off raises aiohttp.ClientError or asyncio.TimeoutError."""
    try:
        if first:
            yield first
        async for chunk in upstream.content.iter_any():
            yield chunk
    finally:
        upstream.release()


async def _once(content: bytes) -> AsyncIterator[bytes]:
    yield content


def _now_ms() -> int:
    return int(time.time() * 1000)


def new_request_id() -> str:
    return uuid.uuid4().hex
