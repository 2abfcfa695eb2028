"""Settlement of a paid call, and the delivery of what it paid for.

Settlement runs shielded from client disconnects and records its outcome whatever happens:
settled (the budget committed; the response kept for replays when small, or owed until its last
byte went out), unresolved (PENDING: the money may have moved, never free, never served until the
facilitator says settled), or refused (nothing moved: the payment is freed, the hold released).

Before the facilitator is asked, the budget hold is pinned and a settlement intent is written to
the shared store (gateway/intents.py): a replica killed between the facilitator's answer and the
budget commit leaves an intent that another replica's recovery finishes (gateway/paywall/
recovery.py). An unresolved settlement is handed to recovery at once: it keeps asking.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from facilitator.x402.headers import encode_settle_response
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import PaymentRequirements, SettleResponse
from gateway.budget_hook import BudgetHook, Hold, Refusal
from gateway.claim import Claim
from gateway.errors import GatewayError
from gateway.errors import GatewayReason as G
from gateway.facilitator_client import FacilitatorClient
from gateway.intents import Intent, IntentStore, IntentStoreUnavailableError, commit_key
from gateway.metering import StreamMeter
from gateway.metrics import GatewayMetrics
from gateway.paywall.call import AnyRequirement, PaidCall, stored_payment
from gateway.paywall.metered import ChargeDetails, metered_charge
from gateway.paywall.responses import client_gone, payment_response_header
from gateway.proxy import UpstreamAnswer
from gateway.records import PaymentRecord, PaymentRecords, RecordState, RecordStoreUnavailableError
from gateway.settings import GatewaySettings
from gateway.tee.check import TeeStreamCheck
from gateway.tee.proof import ProofError

log = logging.getLogger("gateway.paywall")

RECORD_TTL_S = 86_400
# Outcomes where the facilitator may have moved money: keep the payment PENDING, never free.
AMBIGUOUS = {R.SETTLEMENT_PENDING.value, R.UNEXPECTED_SETTLE_ERROR.value, R.INVALID_TRANSACTION_STATE.value}
# A fault hook for the crash tests: the process dies right after the facilitator answered
# "settled", before anything is committed (the worst moment for the books). "1": every time; a
# fraction such as "0.05": that share of settlements, at random.
EXIT_AFTER_SETTLE = "GATEWAY_FAULT_EXIT_AFTER_SETTLE"


class Settlement:
    def __init__(self, settings: GatewaySettings, facilitator: FacilitatorClient, records: PaymentRecords,
                 budgets: BudgetHook, metrics: GatewayMetrics, background: set[asyncio.Task[object]],
                 intents: IntentStore) -> None:
        self.settings = settings
        self.facilitator = facilitator
        self.records = records
        self.budgets = budgets
        self.metrics = metrics
        self.background = background  # settlements of streams whose client left
        self.intents = intents
        self.exit_after_settle = float(os.environ.get(EXIT_AFTER_SETTLE) or 0)

    @property
    def intent_lease_ms(self) -> int:
        """How long the settling replica owns its intent: the longest it waits for the
        facilitator, plus a record lease to commit (recovery takes over only after that)."""
        return int((self.settings.settle_timeout_s + self.settings.record_lease_s) * 1000)

    def unresolved(self, settled: SettleResponse) -> bool:
        """The facilitator may have moved the money: the payment is PENDING, never free."""
        final = self.facilitator.trusted and bool((settled.extra or {}).get("final"))
        reason = settled.error_reason or R.UNEXPECTED_SETTLE_ERROR.value  # no reason given: it may have moved
        return (reason in AMBIGUOUS or bool(settled.transaction)) and not final

    async def settle(self, call: PaidCall, requirement: AnyRequirement) -> SettleResponse:
        """Ask the facilitator, never longer than settle_timeout_s (an answer that does not come
        in time is treated as the money possibly having moved)."""
        try:
            async with asyncio.timeout(self.settings.settle_timeout_s):  # no task per call, as wait_for makes
                return await self.facilitator.settle(call.payload, requirement)
        except TimeoutError:
            return SettleResponse(success=False, error_reason=R.UNEXPECTED_SETTLE_ERROR.value,
                                  error_message="the facilitator did not answer in time", transaction="", network=call.network)

    async def run(self, call: PaidCall, claim: Claim, record: PaymentRecord, requirement: AnyRequirement, hold: Hold,
                  amount: int, content: bytes | None, details: ChargeDetails | None = None) -> SettleResponse:
        """Settle, record, count against the budget. `content`: a complete response that may be
        kept for replays."""
        offer, network, request_id = call.offer, call.network, call.request_id
        intent = Intent(id=hold.id, key=call.key, hold=hold, amount=amount, payment=record.payment, request_id=request_id,
                        request_fp=call.fp, digest=call.digest, delivered=record.delivered, details=details or {},
                        created_ms=claim.now_ms())
        await self.write_ahead(intent, claim, hold)
        started = time.perf_counter()
        settled = await self.settle(call, requirement)
        if settled.success and self.exit_after_settle and random.random() < self.exit_after_settle:
            os._exit(70)
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
            await self.save(record, request_id)
            if await self.budgets.commit(hold, amount, settled.transaction, request_id, details,
                                         once=commit_key(settled.transaction, hold.id)):
                await self.finish(intent.id)
            else:  # deferred: recovery commits it again (idempotent by the hold) if this replica dies
                await self.hand_over(intent.id, claim.owner)
            self.metrics.payments.labels(offer.route_id, "settled", "").inc()
            self.metrics.revenue.labels(network, requirement.asset.lower()).inc(amount)
            log.info("payment_settled", extra={"request_id": request_id, "route": offer.route_id, "tx": settled.transaction})
        elif self.unresolved(settled):
            record.state = RecordState.PENDING
            await self.save(record, request_id)
            if not await self.hand_over(intent.id, claim.owner):  # the hold stays pinned; recovery keeps asking
                self.until_done(lambda: self.hand_over(intent.id, claim.owner), intent.id)
            self.metrics.payments.labels(offer.route_id, "pending", settled.error_reason or "").inc()
            log.warning("settlement_unresolved", extra={"request_id": request_id, "route": offer.route_id,
                                                       "tx": settled.transaction, "reason": settled.error_reason})
        else:
            await claim.abandon()
            if settled.error_reason == R.UNEXPECTED_SETTLE_ERROR.value:
                # Nothing moved in this call, but the facilitator may be left holding a claim on the
                # payment it could not clear (its store was away): a later resend would settle it
                # under that claim. Recovery keeps the hold pinned until the facilitator can say.
                if not await self.hand_over(intent.id, claim.owner):
                    self.until_done(lambda: self.hand_over(intent.id, claim.owner), intent.id)
            else:
                await self.forget(intent.id, hold)
            self.metrics.payments.labels(offer.route_id, "settle_failed", settled.error_reason or "").inc()
        return settled

    async def forget(self, intent_id: str, hold: Hold) -> None:
        """Nothing moved: release the pinned hold, then close the intent. Until both are done
        (the stores are away) they are retried here: an intent left open would be settled by
        recovery, charging a payment the agent was told was not charged (it would be owed, and a
        resend served, but the agent may have paid again)."""

        async def attempt() -> bool:
            return await self.budgets.release(hold) and await self.finish(intent_id)

        if not await attempt():
            self.until_done(attempt, intent_id)

    def until_done(self, attempt: Callable[[], Awaitable[bool]], intent_id: str) -> None:
        """Retry `attempt` in the background until it returns True (about three hours at most)."""

        async def retry() -> None:
            delay = 0.2
            for _ in range(10_000):
                await asyncio.sleep(delay)
                if await attempt():
                    return
                delay = min(delay * 2, 1.0)
            log.error("settlement_intent_step_lost", extra={"intent": intent_id})

        task = asyncio.ensure_future(retry())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def write_ahead(self, intent: Intent, claim: Claim, hold: Hold) -> None:
        """Record the intent, then pin the hold, before anything is asked of the facilitator. In
        this order: a pinned hold always has an intent that ends it (a replica killed after a pin
        whose intent was never written would leave the budget held for good). A hold that outlives
        the intent's lease anyway is not pinned (no round trip on the usual paid call): this
        replica ends it before the lease lapses, or recovery takes the intent and pins it first. If either cannot be
        done (the hold expired and the budget is gone, a store is away), nothing is settled: the
        payment is freed, the hold released and the intent closed (recovery does it if this
        replica dies first: the payment was never asked for); a metered stream already delivered
        its tokens: it is settled all the same."""
        try:
            await self.intents.write(intent, owner=claim.owner, lease_until_ms=claim.now_ms() + self.intent_lease_ms)
            await self.budgets.pin(hold, within_s=self.intent_lease_ms / 1000)
        except (Refusal, IntentStoreUnavailableError) as exc:
            log.error("settlement_intent_not_written", extra={"request_id": intent.request_id, "error": str(exc)})
            if intent.delivered:
                return
            await claim.abandon()
            await self.forget(intent.id, hold)  # the pin may have been written
            if isinstance(exc, Refusal):  # the budget is not there any more, or its store is away
                raise exc from None
            raise GatewayError(G.STORE_UNAVAILABLE, "the settlement could not be recorded; you were not charged",
                               status=503, headers={"Retry-After": "5"}, outcome="not_charged") from None

    async def finish(self, intent_id: str) -> bool:
        """False when the store is away (a committed intent left open is finished by recovery:
        the commit is idempotent)."""
        try:
            await self.intents.finish(intent_id)
            return True
        except IntentStoreUnavailableError:
            log.warning("settlement_intent_not_closed", extra={"intent": intent_id})
            return False

    async def hand_over(self, intent_id: str, owner: str) -> bool:
        """Let recovery take the intent at once (else it does when the lease lapses)."""
        try:
            await self.intents.lease(intent_id, owner, until_ms=0)
            return True
        except IntentStoreUnavailableError:
            log.warning("settlement_intent_not_handed_over", extra={"intent": intent_id})
            return False

    def refusal(self, call: PaidCall, settled: SettleResponse) -> GatewayError:
        """What the agent is told when settlement did not succeed."""
        reason = settled.error_reason or R.UNEXPECTED_SETTLE_ERROR.value
        headers = payment_response_header(call.payload, settled)
        if self.unresolved(settled):
            return GatewayError(reason, (settled.error_message or "settlement is not confirmed") + "; the content was not "
                                "served. Resend the same payment to get it once settled; do not pay again.",
                                headers=headers, extra={"transaction": settled.transaction, "network": settled.network})
        return GatewayError(reason, settled.error_message or "settlement failed; you were not charged", headers=headers,
                            offer=call.offer)

    async def save(self, record: PaymentRecord, request_id: str) -> None:
        """Once money may have moved, a store outage must not turn the answer into "nothing was
        charged": the record is written best-effort (and the facilitator's own store still refuses
        a second settlement of this payment)."""
        try:
            await self.records.save(record, ttl_s=RECORD_TTL_S)
        except RecordStoreUnavailableError:
            log.error("payment_record_not_saved", extra={"request_id": request_id, "tx": record.tx,
                                                         "state": record.state.value})

    async def release(self, record: PaymentRecord, claim: Claim) -> None:
        """Let the next resend have the record at once (else the lease lapses by itself)."""
        record.owner, record.lease_until_ms = "", 0
        try:
            await asyncio.shield(self.records.save(record, ttl_s=RECORD_TTL_S, owner=claim.owner))
        except (RecordStoreUnavailableError, asyncio.CancelledError):
            log.warning("payment_lease_not_released", extra={"tx": record.tx, "delivered": record.delivered})

    def owed_response(self, body: AsyncIterator[bytes], record: PaymentRecord, claim: Claim, *, status_code: int,
                      headers: dict[str, str]) -> StreamingResponse:
        """The body of a paid response that is not kept for replays."""
        return OwedResponse(body, self, record, claim, status_code=status_code, headers=headers)

    async def metered_stream(self, call: PaidCall, claim: Claim, first: bytes, upstream: UpstreamAnswer,
                             record: PaymentRecord, requirement: PaymentRequirements, hold: Hold,
                             tee: TeeStreamCheck | None = None) -> AsyncIterator[bytes]:
        """upto + SSE: the tokens flow as they come (the signed permit guarantees payment up to its
        maximum); the metered amount is settled when the stream ends and reported in a final
        `x402.payment` event. A client that leaves mid-stream is charged by the route's policy.
        From an enclave (`tee`): settled only when the final frame's proof holds; otherwise (bad
        proof, cut, client gone) nothing is settled and the hold is released."""
        meter = StreamMeter()
        finished = upstream_cut = False
        try:
            try:
                if first:
                    meter.feed(first)
                    if tee is not None:
                        tee.feed(first)
                    yield first
                async for chunk in upstream.content.iter_any():
                    meter.feed(chunk)
                    if tee is not None:
                        tee.feed(chunk)
                    yield chunk
            except (TimeoutError, aiohttp.ClientError):
                upstream_cut = True
                log.warning("upstream_stream_cut", extra={"request_id": call.request_id})
            finished = True
        finally:
            upstream.release()
            if not finished:  # the client went away: settle what it used (an enclave's: nothing), in the background
                task: asyncio.Task[object] = asyncio.ensure_future(
                    self._settle_stream(call, claim, record, requirement, hold, meter, cut=True) if tee is None
                    else self._unsettled_stream(call, claim, hold, "the client left before the proof"))
                self.background.add(task)
                task.add_done_callback(self.background.discard)
        checked = tee.verify() if tee is not None else None
        if tee is not None:
            if isinstance(checked, ProofError):
                await asyncio.shield(self._unsettled_stream(call, claim, hold, checked.reason))
                event = {"success": False, "errorReason": "tee_proof_invalid", "tee_id": tee.enclave.tee_id,
                         "message": f"the enclave's proof failed ({checked.reason}: {checked.message}); "
                                    "nothing was settled: you were not charged"}
                yield b"event: x402.payment\ndata: " + orjson.dumps(event) + b"\n\n"
                return
        settled, details = await asyncio.shield(self._settle_stream(
            call, claim, record, requirement, hold, meter, cut=upstream_cut or not meter.complete))
        if tee is not None and settled.success and checked is not None and not isinstance(checked, ProofError):
            await tee.settled(checked, settled.payer or call.payer)
        event = {"success": settled.success, "transaction": settled.transaction, "network": settled.network,
                 "amount": settled.amount, "errorReason": settled.error_reason, **details,
                 "paymentResponse": encode_settle_response(settled)}
        yield b"event: x402.payment\ndata: " + orjson.dumps({k: v for k, v in event.items() if v is not None}) + b"\n\n"

    async def _unsettled_stream(self, call: PaidCall, claim: Claim, hold: Hold, reason: str) -> None:
        """A stream that is not charged: the payment is freed, its budget hold released."""
        try:
            await self.budgets.release(hold)
            self.metrics.payments.labels(call.offer.route_id, "not_charged", "tee_proof_invalid").inc()
            log.warning("tee_stream_not_settled", extra={"request_id": call.request_id, "reason": reason})
        finally:
            await claim.abandon()

    async def _settle_stream(self, call: PaidCall, claim: Claim, record: PaymentRecord, requirement: PaymentRequirements,
                             hold: Hold, meter: StreamMeter, *, cut: bool) -> tuple[SettleResponse, ChargeDetails]:
        try:
            amount, details = metered_charge(call.offer, requirement, meter.usage, cut=cut)
            settle_requirement = requirement.model_copy(update={"amount": str(amount)})
            record.payment = stored_payment(call.payload, settle_requirement)
            record.delivered = True  # the tokens went out as they came; what they cost is settled now
            settled = await self.run(call, claim, record, settle_requirement, hold, amount, None, details)
        finally:
            await claim.close()
        if not settled.success:
            log.error("upto_stream_settlement_failed", extra={"request_id": call.request_id,
                                                              "reason": settled.error_reason, "tx": settled.transaction})
        return settled, details


class OwedResponse(StreamingResponse):
    """A paid body not kept for replays: the payment's record says delivered only once the server
    took the response's end (the final, empty frame included), not when the last chunk was
    yielded (a replica killed in between left the agent a cut response it could not get again).
    Cut before that (the client left, the upstream broke, the replica died), it stays owed to a
    resend of the same payment. A client already gone when the answer is ready (uvicorn then
    drops every send without a word) is not served either."""

    def __init__(self, body: AsyncIterator[bytes], settlement: Settlement, record: PaymentRecord, claim: Claim, *,
                 status_code: int, headers: dict[str, str]) -> None:
        self.settlement, self.record, self.claim = settlement, record, claim
        self.cut = False
        super().__init__(self._watched(body), status_code=status_code, headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await client_gone(receive):
            self.cut = True
        await super().__call__(scope, receive, send)

    async def _watched(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in body:
                yield chunk
        except (TimeoutError, aiohttp.ClientError):
            self.cut = True
            log.warning("upstream_stream_cut", extra={"tx": self.record.tx})

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
            self.record.delivered = not self.cut
        finally:
            await self.claim.close()
            await self.settlement.release(self.record, self.claim)
