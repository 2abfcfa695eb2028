"""A payment seen before: its record claimed for one request at a time, and earlier results given
only to the very payment that was recorded.

- A record answers only the signed payload it was written for (`digest`, signature included):
  payer and nonce are public once settled, so a copy with another signature buys nothing.
- A live holder's lease means "in progress" (409 with Retry-After = what is left of the lease).
- Settled with the response kept: replayed. Settled and delivered: refused, naming the tx.
- PENDING: the facilitator is asked again (idempotent), at most settle_timeout_s.
- Settled but never delivered to its end (a replica died after settling, a stream was cut): owed,
  forwarded once more and served, never charged again.
- payment-identifier retries: the earlier result, only to the same payer proving it by a valid
  signature.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
from starlette.responses import Response

from facilitator.x402.identity import payment_identity
from facilitator.x402.networks import to_caip2
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import PaymentRequirements, SettleResponse, VerifyResponse
from gateway.claim import Claim, new_owner, retry_after_s
from gateway.errors import GatewayError
from gateway.errors import GatewayReason as G
from gateway.facilitator_client import FacilitatorClient
from gateway.metrics import GatewayMetrics
from gateway.paywall.call import PaidCall, load_payment, stored_payment
from gateway.paywall.responses import payment_response_header
from gateway.paywall.settle import RECORD_TTL_S, Settlement
from gateway.proxy import UpstreamFailedError, Upstreams, UpstreamUnavailableError, read_all, relay, response_headers
from gateway.records import PaymentRecord, PaymentRecords, RecordState
from gateway.session_calls import SessionCalls
from gateway.settings import GatewaySettings
from gateway.sse_usage import forwarded_stream
from gateway.tee.proof import ProofError
from gateway.tee.verify import verify_body


def _now_ms() -> int:
    return int(time.time() * 1000)


def in_progress(lease_until_ms: int, now_ms: int) -> GatewayError:
    return GatewayError(G.PAYMENT_IN_PROGRESS, "this payment is being processed by another request", status=409,
                        headers={"Retry-After": str(retry_after_s(lease_until_ms, now_ms))})


def already_used(message: str, record: PaymentRecord) -> GatewayError:
    return GatewayError(G.PAYMENT_ALREADY_USED, message, extra={"transaction": record.tx})


class Replays:
    def __init__(self, settings: GatewaySettings, records: PaymentRecords, facilitator: FacilitatorClient,
                 settlement: Settlement, upstreams: Upstreams, metrics: GatewayMetrics,
                 sessions: SessionCalls | None) -> None:
        self.settings = settings
        self.records = records
        self.facilitator = facilitator
        self.settlement = settlement
        self.upstreams = upstreams
        self.metrics = metrics
        self.sessions = sessions
        self.lease_ms = int(settings.record_lease_s * 1000)

    async def claim(self, call: PaidCall) -> tuple[Claim | None, PaymentRecord | None]:
        """(this request's claim on the payment, None), or (None, the record that exists)."""
        owner = new_owner()
        earlier = await self.records.begin(call.key, call.fp, call.digest, owner=owner, now_ms=_now_ms(),
                                           lease_ms=self.lease_ms)
        if earlier is not None:
            return None, earlier
        return Claim(self.records, call.key, owner, self.settings.record_lease_s).start(), None

    async def earlier_under_id(self, call: PaidCall) -> PaymentRecord | None:
        """The record of an earlier payment made under this call's payment-identifier, if any."""
        if call.payment_id is None:
            return None
        bound = await self.records.link_id(call.payment_id, call.key, ttl_s=RECORD_TTL_S)
        if bound == call.key:
            return None
        earlier = await self.records.get(bound)
        if earlier is None or (earlier.state == RecordState.PROCESSING and earlier.lease_until_ms < _now_ms()):
            # The earlier payment was never charged (its record is gone, or its request died before
            # settling): this one takes the id and is charged as a payment of its own.
            await self.records.link_id(call.payment_id, call.key, ttl_s=RECORD_TTL_S, replace=True)
            return None
        return earlier

    async def answer_under_id(self, call: PaidCall, earlier: PaymentRecord) -> Response:
        """A fresh payment under a payment-identifier used before: the earlier result, without a
        new charge, but only for the same payer proving it with a valid signature (an id is not a
        voucher anyone may present)."""
        earlier_payer = ""
        if earlier.payment:
            p, req = load_payment(earlier.payment)
            network = req.network if isinstance(req, PaymentRequirements) else to_caip2(req.network)
            earlier_payer, _ = payment_identity(p.payload, network, req.asset)
        if not earlier_payer or earlier_payer.lower() != call.payer.lower():
            raise GatewayError(G.PAYMENT_IDENTIFIER_CONFLICT, "this payment-identifier belongs to another payment", status=409)
        try:
            verify = await asyncio.wait_for(self.facilitator.verify(call.payload, call.requirement),
                                            self.settings.verify_timeout_s)
        except TimeoutError:
            raise GatewayError(R.UNEXPECTED_VERIFY_ERROR, "the facilitator did not answer in time", offer=call.offer) from None
        if not verify.is_valid or (verify.payer or call.payer).lower() != earlier_payer.lower():
            raise GatewayError(verify.invalid_reason or G.PAYMENT_IDENTIFIER_CONFLICT,
                               verify.invalid_message or "the payment is not valid", offer=call.offer)
        return await self.answer(call, earlier, proven=True)

    async def answer(self, call: PaidCall, record: PaymentRecord, *, proven: bool = False) -> Response:
        """The payment was seen before. `proven`: a payment-identifier retry whose payer proved it
        is the same payer (its payload is another one)."""
        if not proven and record.digest != call.digest:
            raise already_used("this payment's nonce belongs to another signed payment that was already used", record)
        now = _now_ms()
        if record.lease_until_ms > now:
            raise in_progress(record.lease_until_ms, now)
        session_id = self._session_of(record)
        if session_id is not None and self.sessions is not None and call.offer.route.sessions is not None:
            # the permit opened a session: a resend continues it
            return await self.sessions.call(call.request, call.offer, call.body, session_id, call.request_id)
        if record.request_fp != call.fp:
            raise already_used("this payment was already used for another request (resend that request to get its "
                               "response)", record)
        if record.state == RecordState.SETTLED:
            if record.cached:
                return self._replay(call, record)
            if record.delivered:
                raise already_used("this payment was settled and its response was already delivered", record)
        # Pending, or settled and owed: one request at a time resolves it.
        if record.state == RecordState.PROCESSING:  # never settled: only its own request may go on
            raise in_progress(now + self.lease_ms, now)
        owner = new_owner()
        held = await self.records.acquire(record.key, owner, now_ms=now, lease_ms=self.lease_ms)
        if held is None or held.state not in (RecordState.PENDING, RecordState.SETTLED):
            raise in_progress(now + self.lease_ms, now)
        claim = Claim(self.records, record.key, owner, self.settings.record_lease_s).start()
        try:
            return await self._resume(call, claim, held)
        finally:
            if not claim.kept:
                await claim.close()

    async def already_settled(self, call: PaidCall, claim: Claim, verify: VerifyResponse) -> Response:
        """The payment's nonce is spent and we hold no record of it. If it was spent by settling
        this very payment (our facilitator answers a repeated settle with the first result, and
        only for the same signed payment), the replica that settled it died or lost its record
        before answering: the call is owed and is served once. Otherwise the payment is refused."""
        earlier = await self.settlement.settle(call, call.requirement)
        if earlier.success:
            record = PaymentRecord(key=call.key, state=RecordState.SETTLED, request_fp=call.fp, tx=earlier.transaction,
                                   settle=earlier.model_dump_json(by_alias=True, exclude_none=True), digest=call.digest,
                                   owner=claim.owner, lease_until_ms=claim.now_ms() + claim.lease_ms)
            await self.settlement.save(record, call.request_id)
            self.metrics.payments.labels(call.offer.route_id, "settled", "recovered").inc()
            return await self._deliver(call, claim, record, earlier)
        if self.settlement.unresolved(earlier):  # the money may be moving right now: never free
            record = PaymentRecord(key=call.key, state=RecordState.PENDING, request_fp=call.fp, digest=call.digest,
                                   tx=earlier.transaction or "", payment=stored_payment(call.payload, call.requirement))
            await self.settlement.save(record, call.request_id)
            raise GatewayError(R.SETTLEMENT_PENDING, "this payment's settlement is not confirmed yet; resend the same "
                               "payment to get the response once it is. Do not pay again.",
                               extra={"transaction": record.tx})
        await claim.abandon()
        if earlier.error_reason == R.UNEXPECTED_SETTLE_ERROR.value:
            # The facilitator could not read its record of this nonce (its store is away): whether
            # this very payment was settled is unknown, so the answer must not look final.
            raise GatewayError(R.UNEXPECTED_SETTLE_ERROR, "the facilitator cannot tell yet whether this payment was "
                               "settled; resend the same payment shortly. Do not pay again.", status=503,
                               headers={"Retry-After": "2"})
        raise GatewayError(verify.invalid_reason or R.INVALID_PAYLOAD, verify.invalid_message or
                           "the payment's nonce is already used", offer=call.offer)

    async def _resume(self, call: PaidCall, claim: Claim, record: PaymentRecord) -> Response:
        if record.state == RecordState.PENDING:
            payload, requirement = load_payment(record.payment) if record.payment else (call.payload, call.requirement)
            pending = PaidCall(call.request, call.offer, call.body, payload, requirement, call.network, call.key,
                               call.digest, call.fp, call.payer, call.payment_id, call.request_id)
            settled = await self.settlement.settle(pending, requirement)
            if not settled.success:
                await self.settlement.release(record, claim)
                raise GatewayError(settled.error_reason or R.SETTLEMENT_PENDING,
                                   (settled.error_message or "settlement not confirmed") + "; do not pay again",
                                   extra={"transaction": settled.transaction or record.tx})
            record.state, record.tx = RecordState.SETTLED, settled.transaction
            record.settle = settled.model_dump_json(by_alias=True, exclude_none=True)
            await self.settlement.save(record, call.request_id)
            self.metrics.payments.labels(call.offer.route_id, "settled", "resolved_pending").inc()
        if record.cached or record.delivered:
            await self.settlement.release(record, claim)
            if not record.cached:  # a metered stream: its tokens went out as they came
                raise already_used("this payment was settled and its response was already delivered", record)
            return self._replay(call, record)
        return await self._deliver(call, claim, record, SettleResponse.model_validate_json(record.settle))

    async def _deliver(self, call: PaidCall, claim: Claim, record: PaymentRecord, settled: SettleResponse) -> Response:
        """Serve a call that was paid for but never delivered: forward it again, without charging
        again. The caller holds the record's lease. A complete answer is kept in the record before
        it is sent (any later resend replays it: an agent cut off again, even by this replica's
        death, is never left paid and unserved); a stream is owed until its end went out."""
        try:
            upstream = await self.upstreams.open(call.request, call.offer.route.upstream, call.body, call.request_id)
        except (UpstreamUnavailableError, UpstreamFailedError) as exc:
            await self.settlement.release(record, claim)
            raise GatewayError(G.UPSTREAM_UNAVAILABLE, f"paid, but the upstream failed ({exc}); resend the same payment "
                               "to get the response", status=502, extra={"transaction": record.tx}) from None
        if upstream.status >= 400:
            upstream.release()
            await self.settlement.release(record, claim)
            raise GatewayError(G.UPSTREAM_ERROR, f"paid, but the upstream answered {upstream.status}; resend the same "
                               "payment to get the response", status=502, extra={"transaction": record.tx})
        out_headers = response_headers(upstream)
        pool, enclave = self.upstreams.tee_pool(call.offer.route.upstream), self.upstreams.enclave_of(call.request)
        tee = pool is not None and enclave is not None
        if not tee and upstream.headers.get("content-type", "").startswith("text/event-stream"):
            self.metrics.payments.labels(call.offer.route_id, "delivered", "owed").inc()
            claim.kept = True
            body = forwarded_stream(call.request, relay(b"", upstream))
            return self.settlement.owed_response(body, record, claim, status_code=upstream.status,
                                                 headers=dict(out_headers) | payment_response_header(call.payload, settled))
        try:
            content = await read_all(upstream, self.settings.max_body_bytes)
            if pool is not None and enclave is not None:  # an enclave's answer is served only with a proof that holds
                proof_headers = verify_body(enclave, pool.settings, call.body, content).headers()
                out_headers = [h for h in out_headers if h[0] not in {k.lower() for k in proof_headers}]
                out_headers += list(proof_headers.items())
        except (UpstreamFailedError, ProofError) as exc:
            if isinstance(exc, ProofError) and pool is not None and enclave is not None:
                pool.fault(enclave, exc.reason)
            await self.settlement.release(record, claim)
            reason = G.TEE_PROOF_INVALID if isinstance(exc, ProofError) else G.UPSTREAM_ERROR
            raise GatewayError(reason, f"paid, but the upstream's answer failed ({exc}); resend the same payment to "
                               "get the response", status=502, extra={"transaction": record.tx}) from None
        finally:
            upstream.release()
        if pool is not None and enclave is not None:
            pool.verified(enclave)
        self.metrics.payments.labels(call.offer.route_id, "delivered", "owed").inc()
        headers = dict(out_headers) | payment_response_header(call.payload, settled)
        if len(content) <= self.settings.replay_cache_bytes:
            record.status, record.headers, record.body = upstream.status, out_headers, content
            record.cached = record.delivered = True
            await self.settlement.release(record, claim)  # saved, kept for replays, before it is sent
            return Response(content, status_code=upstream.status, headers=headers)
        claim.kept = True
        return self.settlement.owed_response(_once(content), record, claim, status_code=upstream.status, headers=headers)

    def _replay(self, call: PaidCall, record: PaymentRecord) -> Response:
        self.metrics.payments.labels(call.offer.route_id, "replayed", "").inc()
        header = payment_response_header(call.payload, SettleResponse.model_validate_json(record.settle))
        return Response(record.body, status_code=record.status, headers=dict(record.headers) | header)

    def _session_of(self, record: PaymentRecord) -> str | None:
        if record.state != RecordState.SETTLED or not record.settle:
            return None
        session = (orjson.loads(record.settle).get("extra") or {}).get("session")
        return session if isinstance(session, str) else None


async def _once(content: bytes) -> AsyncIterator[bytes]:
    yield content
