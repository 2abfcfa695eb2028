"""The payment flow, top to bottom (`Paywall.handle`).

    price the request -> no payment: challenge -> decode and bind the payment -> budget precheck
    -> verify -> claim the payment's record (or answer from it) -> reserve -> forward
    -> (tee: check the enclave's proof) -> settle -> respond with the receipt (tee: queue the proof)

Money rules kept here and in settle.py / replay.py:
- nothing is served before settlement succeeded (streams settle before their first byte; metered
  upto streams are backed by the signed permit and settle after the last token);
- upstream 4xx (passed through as it came) or failure (5xx, unreachable, cut: 502 upstream_error /
  upstream_unavailable): no settlement, the claim and the budget hold are released;
- one signed payment is served at most once, and only that very payment gets its recorded result;
- a settlement whose outcome is unknown is kept PENDING, never free, never served until settled;
- a payment settled but not delivered is owed: a resend is served once, never charged again;
- settlement and its record run shielded from client disconnects;
- an enclave's answer (`tee` upstream) is settled only once its proof holds (gateway/tee/): a
  missing or bad proof is a 502, nothing charged; a metered stream's proof is checked on its
  last frame before it is settled (settle.py).
Refusals are raised (GatewayError, budgets' Refusal) and rendered in one place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse
from gateway.batch_calls import BatchCalls
from gateway.budget_hook import BudgetHook, Hold
from gateway.claim import Claim
from gateway.errors import GatewayError, UpstreamRefused
from gateway.errors import GatewayReason as G
from gateway.facilitator_client import FacilitatorClient
from gateway.metering import usage_from_body
from gateway.metrics import GatewayMetrics
from gateway.paywall.call import PaidCall, decode_call, stored_payment
from gateway.paywall.metered import capped_body, metered_charge
from gateway.paywall.replay import Replays
from gateway.paywall.responses import Challenges, payment_response_header
from gateway.paywall.settle import RECORD_TTL_S, Settlement
from gateway.pricing import BATCH_SCHEME, Offer, Pricing
from gateway.proxy import (
    UpstreamAnswer,
    UpstreamFailedError,
    Upstreams,
    UpstreamUnavailableError,
    path_of,
    read_all,
    relay,
    response_headers,
)
from gateway.records import PaymentRecord, PaymentRecords, RecordState
from gateway.session_calls import SessionCalls
from gateway.settings import GatewaySettings
from gateway.sse_usage import AddedUsageFilter, forwarded_stream, usage_added
from gateway.tee.check import TeeStreamCheck
from gateway.tee.proof import ProofError, TeeProof
from gateway.tee.proofs import ProofItem, ProofStore, ProofStoreUnavailableError, settlement_type
from gateway.tee.verify import verify_body

log = logging.getLogger("gateway.paywall")

# A verify refusal that means "this nonce was spent": by this very payment (ask the records), or not.
NONCE_USED = {R.PERMIT2_INVALID_NONCE.value, R.INVALID_EXACT_EVM_NONCE_ALREADY_USED.value}
UPSTREAM_BODY_SHOWN = 2048  # of a failed upstream's answer, in the 502 (enough for a provider's error message)


class Paywall:
    def __init__(self, settings: GatewaySettings, pricing: Pricing, facilitator: FacilitatorClient,
                 records: PaymentRecords, budgets: BudgetHook, metrics: GatewayMetrics, upstreams: Upstreams,
                 challenges: Challenges, settlement: Settlement, sessions: SessionCalls | None,
                 proofs: ProofStore | None = None) -> None:
        self.settings = settings
        self.pricing = pricing
        self.facilitator = facilitator
        self.records = records
        self.budgets = budgets
        self.metrics = metrics
        self.upstreams = upstreams
        self.challenges = challenges
        self.settlement = settlement
        self.sessions = sessions
        self.proofs = proofs  # tee proofs to anchor (gateway/tee/batcher.py); None: not anchored
        self.batch: BatchCalls | None = None  # set when a route offers batch-settlement channels
        self.replays = Replays(settings, records, facilitator, settlement, upstreams, metrics, sessions)

    async def handle(self, request: Request, body: bytes, request_id: str) -> Response:
        offer = self.price(request, body)
        # Backpressure before payment: a busy or absent worker is a 503 before anything is verified or reserved.
        self.upstreams.admit(request, offer.route.upstream, body, offer.model)
        if self.sessions is not None and offer.route.sessions is not None and request.method != "HEAD" \
                and (session_id := request.headers.get("x-upto-session")):
            return await self.sessions.call(request, offer, capped_body(offer, body), session_id, request_id)
        if request.method == "HEAD" or not ("payment-signature" in request.headers or "x-payment" in request.headers):
            raise GatewayError(G.PAYMENT_REQUIRED, f"This call costs {offer.price} (see accepts). Sign a payment and "
                               "resend it in PAYMENT-SIGNATURE.", offer=offer)
        forward_body = capped_body(offer, body) if offer.token_price is not None else body
        call = decode_call(request, offer, body, forward_body, request_id,
                           resource_url=lambda: self.challenges.resource(request, offer).url,
                           payment_ids=self.settings.payment_identifier_on(offer.route))
        # Who paid with what, for the refusal log (gateway/refusals.py) should this call be refused.
        request.scope["state"]["payment"] = (call.payer, call.network, call.requirement.asset)
        self.tee_stream_allowed(call)
        if call.requirement.scheme == BATCH_SCHEME:
            if self.batch is None:  # never offered without its channels; a call without them has no record to key
                raise GatewayError(R.UNSUPPORTED_SCHEME, "batch-settlement is not served here", offer=offer)
            return await self.batch.call(call)  # vouchers: no per-call payment record (gateway/batch_calls.py)
        await self.budgets.precheck(call.payer, call.network, call.requirement.asset, offer.route_id, offer.model)
        if (earlier := await self.replays.earlier_under_id(call)) is not None:
            return await self.replays.answer_under_id(call, earlier)
        # Verify before claiming anything: a forged or malformed copy never holds the payment's
        # record, so no input can block someone else's payment.
        verify, verify_s = await self.verify(call)
        claim, earlier = await self.replays.claim(call)
        if earlier is not None:
            return await self.replays.answer(call, earlier)
        assert claim is not None
        try:
            if not verify.is_valid:  # its nonce is spent, and we hold no record of it
                response = await self.replays.already_settled(call, claim, verify)
            else:
                response = await self.charge(call, claim, verify, verify_s)
        except BaseException:
            # Before settlement began nothing was charged: free the payment. Once it began, its
            # shielded task records the outcome.
            await asyncio.shield(claim.close() if claim.settling else claim.abandon())
            raise
        if not claim.kept:
            await claim.close()
        return response

    def price(self, request: Request, body: bytes) -> Offer:
        path = path_of(request.scope)
        match = self.pricing.match(request.method, path)
        if match is None:
            if self.pricing.path_known(path):
                raise GatewayError(G.METHOD_NOT_ALLOWED, f"{request.method} is not offered on this path", status=405)
            raise GatewayError(G.NOT_FOUND, "this path is not offered by the gateway", status=404)
        route, params = match
        request.scope.setdefault("state", {})["route_id"] = f"{route.method} {route.path}"  # the metric label
        offer = self.pricing.offer(route, params, body, probe=request.method == "HEAD")
        # Streams hide the usage the gateway asks for on the client's behalf (gateway/sse_usage.py).
        request.scope["state"]["added_usage"] = offer.token_price is not None and usage_added(
            body, anthropic=offer.route.api == "anthropic")
        return offer

    def tee_stream_allowed(self, call: PaidCall) -> None:
        """On a tee route an `exact` stream is buffered (verified whole before it is settled and
        sent) or, by configuration, refused before any payment work."""
        pool = self.upstreams.tee_pool(call.offer.route.upstream)
        if pool is None or call.upto or pool.settings.exact_streams != "refuse":
            return
        try:
            streamed = orjson.loads(call.body).get("stream") is True
        except (orjson.JSONDecodeError, AttributeError):
            streamed = False
        if streamed:
            raise GatewayError(G.TEE_STREAM_REFUSED, "this gateway does not stream exact-priced calls to enclaves "
                               "(the proof comes on the last frame): ask without stream, or pay with upto", status=400)

    def tee_verified(self, call: PaidCall, content: bytes) -> TeeProof | None:
        """The proof of a complete enclave answer whose signature holds (None: not a tee route);
        otherwise the call fails here (502), before settlement: nothing is charged."""
        pool = self.upstreams.tee_pool(call.offer.route.upstream)
        enclave = self.upstreams.enclave_of(call.request)
        if pool is None or enclave is None:
            return None
        try:
            proof = verify_body(enclave, pool.settings, call.body, content)
        except ProofError as exc:
            pool.fault(enclave, exc.reason)
            raise GatewayError(G.TEE_PROOF_INVALID, f"the enclave's answer failed verification ({exc.reason}: "
                               f"{exc.message}); it was not served and you were not charged", status=502,
                               outcome="not_charged", extra={"tee_id": enclave.tee_id}) from None
        pool.verified(enclave)
        return proof

    def settlement_kind(self, call: PaidCall) -> str:
        """What the agent asked for (X-SETTLEMENT-TYPE), and what it gets: private when proofs are
        not anchored here."""
        return "private" if self.proofs is None else settlement_type(call.request.headers.get("x-settlement-type"))

    async def anchor(self, call: PaidCall, proof: TeeProof, payer: str) -> None:
        """Queue a settled call's proof for anchoring; a store failure loses the anchoring of this
        one proof, never the call (it is paid and verified)."""
        kind = self.settlement_kind(call)
        if kind == "private" or self.proofs is None:
            return
        item = ProofItem("0x" + proof.request_hash.removeprefix("0x").lower(),
                         "0x" + proof.output_hash.removeprefix("0x").lower(), proof.signature, proof.tee_id,
                         proof.timestamp, kind, payer)
        try:
            await self.proofs.add(item)
        except ProofStoreUnavailableError:
            log.error("tee_proof_not_queued", extra={"request_id": call.request_id, "request_hash": item.request_hash})

    async def verify(self, call: PaidCall) -> tuple[VerifyResponse, float]:
        """A valid payment, or one whose nonce is spent (the records tell whether by this very
        payment); anything else is refused here, before any record is touched."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.verify_timeout_s):  # no task per call, as wait_for makes
                verify = await self.facilitator.verify(call.payload, call.requirement)
        except TimeoutError:
            raise GatewayError(R.UNEXPECTED_VERIFY_ERROR, "the facilitator did not answer in time", offer=call.offer) from None
        verify_s = time.perf_counter() - started
        self.metrics.verify_seconds.labels(call.offer.route_id).observe(verify_s)
        if verify.is_valid or verify.invalid_reason in NONCE_USED:
            return verify, verify_s
        reason = verify.invalid_reason or R.INVALID_PAYLOAD.value
        if reason == R.UNEXPECTED_VERIFY_ERROR.value:
            await self.records.ping()  # our own store down (the facilitator's too, often): 503, not a 402
        raise GatewayError(reason, verify.invalid_message or "the payment is not valid", offer=call.offer)

    async def charge(self, call: PaidCall, claim: Claim, verify: VerifyResponse, verify_s: float) -> Response:
        """Reserve, forward, settle a verified payment that is ours (claimed) for all of it."""
        payer = verify.payer or call.payer  # a third-party facilitator may omit payer
        if self.sessions is not None and call.offer.route.sessions is not None and call.upto:
            return await self.open_session(call, payer)
        hold = await self.budgets.reserve(payer, call.network, call.requirement.asset, call.amount,
                                          call.offer.route_id, call.offer.model, call.request_id)
        try:
            return await self.forward_and_settle(call, claim, hold, verify_s)
        except BaseException:
            if not claim.settling:  # nothing was charged: the budget hold goes back too
                await asyncio.shield(self.budgets.release(hold))
            raise

    async def forward_and_settle(self, call: PaidCall, claim: Claim, hold: Hold, verify_s: float) -> Response:
        offer, requirement = call.offer, call.requirement
        started = time.perf_counter()
        upstream, first, content = await self.forward(call)
        upstream_s = time.perf_counter() - started
        self.metrics.upstream_seconds.labels(offer.route_id, offer.route.upstream).observe(upstream_s)
        streaming = content is None
        status, out_headers = upstream.status, response_headers(upstream)
        proof = self.tee_verified(call, content) if content is not None else None
        if proof is not None:
            proof_headers = proof.headers() | {"X-Settlement-Type": self.settlement_kind(call)}
            out_headers = [h for h in out_headers if h[0] not in {k.lower() for k in proof_headers}]
            out_headers += list(proof_headers.items())
        record = PaymentRecord(key=call.key, state=RecordState.PROCESSING, request_fp=call.fp, status=status,
                               headers=out_headers, digest=call.digest, owner=claim.owner)
        amount, details, settle_requirement = call.amount, None, requirement
        if offer.token_price is not None and isinstance(requirement, PaymentRequirements) and call.upto:
            if streaming:
                claim.kept = claim.settling = True  # tokens flow before settlement: the permit guarantees it
                stream = self.settlement.metered_stream(call, claim, first, upstream, record, requirement, hold,
                                                        self.tee_stream_check(call))
                return StreamingResponse(forwarded_stream(call.request, stream), status_code=status,
                                         headers=dict(out_headers) | {"Cache-Control": "no-store"})
            amount, details = metered_charge(offer, requirement, usage_from_body(content or b""))
            settle_requirement = requirement.model_copy(update={"amount": str(amount)})
        record.payment = stored_payment(call.payload, settle_requirement)
        started = time.perf_counter()
        claim.settling = True
        settle_task = asyncio.ensure_future(self.settlement.run(call, claim, record, settle_requirement, hold, amount,
                                                                content, details))
        try:
            settled = await asyncio.shield(settle_task)
        except asyncio.CancelledError:
            upstream.release()
            raise
        if not settled.success:
            upstream.release()
            raise self.settlement.refusal(call, settled)
        if proof is not None:
            await self.anchor(call, proof, settled.payer or call.payer)
        headers = dict(out_headers) | payment_response_header(call.payload, settled)
        # Where the time went (RFC Server-Timing, milliseconds): the gateway's own cost apart from
        # the upstream and the chain.
        headers["Server-Timing"] = (f"verify;dur={verify_s * 1000:.2f}, upstream;dur={upstream_s * 1000:.2f}, "
                                    f"settle;dur={(time.perf_counter() - started) * 1000:.2f}")
        if record.cached:
            return Response(content, status_code=status, headers=headers)
        # Paid, and the response is not kept: it is owed until its last byte went out.
        claim.kept = True
        body = forwarded_stream(call.request, relay(first, upstream)) if streaming else _once(content or b"")
        return self.settlement.owed_response(body, record, claim, status_code=status, headers=headers)

    async def forward(self, call: PaidCall) -> tuple[UpstreamAnswer, bytes, bytes | None]:
        """(upstream, first stream bytes, whole body or None for a stream); any failure before
        that is refused here (502), not charged."""
        try:
            upstream = await self.upstreams.open(call.request, call.offer.route.upstream, call.body, call.request_id)
        except (UpstreamUnavailableError, UpstreamFailedError) as exc:
            raise GatewayError(G.UPSTREAM_UNAVAILABLE, f"the upstream could not be reached ({exc}); you were not charged",
                               status=502, outcome="not_charged") from None
        if upstream.status >= 400:
            try:
                error_body = await read_all(upstream, self.settings.max_body_bytes)
            except UpstreamFailedError:
                error_body = b""
            finally:
                upstream.release()
            if upstream.status < 500:  # the request itself was refused: the provider's answer, as it came
                raise UpstreamRefused(upstream.status, error_body, response_headers(upstream))
            raise GatewayError(G.UPSTREAM_ERROR, f"the upstream answered {upstream.status}; you were not charged",
                               status=502, outcome="not_charged",
                               extra={"upstream_status": upstream.status,
                                      "upstream_body": error_body[:UPSTREAM_BODY_SHOWN].decode("utf-8", "replace")})
        try:
            tee = self.upstreams.tee_pool(call.offer.route.upstream) is not None
            sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
            if sse and not (tee and not call.upto):
                return upstream, await upstream.content.readany(), None
            content = await read_all(upstream, self.settings.max_body_bytes)
            upstream.release()
            if sse and call.request.scope.get("state", {}).get("added_usage"):
                # An enclave's exact stream, buffered: without the usage the gateway asked for (the
                # proof frame stays, only its usage key goes; usage is not signed).
                usage_filter = AddedUsageFilter()
                content = usage_filter.feed(content) + usage_filter.flush()
            return upstream, b"", content
        except (TimeoutError, UpstreamFailedError, aiohttp.ClientError) as exc:
            upstream.release()
            raise GatewayError(G.UPSTREAM_ERROR, f"the upstream failed ({type(exc).__name__}); you were not charged",
                               status=502, outcome="not_charged") from None

    def tee_stream_check(self, call: PaidCall) -> TeeStreamCheck | None:
        pool = self.upstreams.tee_pool(call.offer.route.upstream)
        enclave = self.upstreams.enclave_of(call.request)
        if pool is None or enclave is None:
            return None

        async def settled(proof: TeeProof, payer: str) -> None:
            await self.anchor(call, proof, payer)

        return TeeStreamCheck(pool, enclave, call.body, settled)

    async def open_session(self, call: PaidCall, payer: str) -> Response:
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


async def _once(content: bytes) -> AsyncIterator[bytes]:
    yield content
