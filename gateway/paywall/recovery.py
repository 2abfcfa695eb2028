"""Recovery of settlement intents whose replica is gone (or that were handed over unresolved).

Every replica runs the loop; the store's lease makes one of them the owner of each intent. The
truth is asked of the facilitator: its settle is idempotent and answers a repeated request with the
first result (our facilitator's exactly-once store; x402 facilitators key settlements by the
payment's nonce). Then:
- settled: the budget is committed and the ledger written, once (idempotent by the transaction), and
  the payment's record says settled and owed, so a resend of the same payment is served;
- never asked (the facilitator verifies the payment as unused: no settlement record, nonce unspent),
  or refused (nothing moved, nothing will: expired, nonce used by another payment, …): the hold is
  released and the payment freed; recovery never starts a settlement itself;
- unknown (the facilitator or its store is down, the transaction not final): asked again later,
  never released.

A metered stream's intent is the exception: its tokens were delivered, so its settlement is asked
for (the payee is owed it).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import SettleResponse
from gateway.budget_hook import Refusal
from gateway.intents import Intent, IntentStore, commit_key
from gateway.paywall.call import load_payment
from gateway.paywall.settle import RECORD_TTL_S, Settlement
from gateway.records import PaymentRecord, RecordState
from storage import StoreUnavailableError

log = logging.getLogger("gateway.recovery")

BATCH = 50
RETRY_MS = 5_000  # an unresolved intent is asked about again after this


class Recovery:
    def __init__(self, settlement: Settlement, intents: IntentStore, *, interval_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.settlement = settlement
        self.intents = intents
        self.interval_s = interval_s
        self.clock = clock
        self.owner = "recovery:" + uuid.uuid4().hex

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep()
            except StoreUnavailableError as exc:  # the next round tries again
                log.warning("intent_recovery_store_unavailable", extra={"error": str(exc)})
            except Exception:  # never let the loop die: an intent left open is money not counted
                log.exception("intent_recovery_failed")

    async def sweep(self) -> int:
        """Resolve what lapsed now; returns how many intents were finished."""
        finished = 0
        settings = self.settlement.settings
        self.settlement.metrics.open_intents.set(await self.intents.count())
        lease_ms = int((settings.settle_timeout_s + settings.record_lease_s) * 1000)
        for lapsed in await self.intents.lapsed(now_ms=self._now_ms(), limit=BATCH):
            intent = await self.intents.take(lapsed.id, self.owner, now_ms=self._now_ms(), lease_ms=lease_ms)
            if intent is not None and await self.resolve(intent):
                finished += 1
        return finished

    async def resolve(self, intent: Intent) -> bool:
        s = self.settlement
        payload, requirement = load_payment(intent.payment)
        route = intent.hold.route
        # The settling replica pins its hold only when the hold would not outlive it (settle.py
        # write_ahead): from here on nobody promises to end it soon, so it is pinned now.
        try:
            await s.budgets.pin(intent.hold)
        except Refusal as exc:  # expired and given away, or the store is away: what settled is committed anyway
            log.warning("settlement_intent_hold_not_pinned", extra={"request_id": intent.request_id,
                                                                     "reason": exc.reason})
        if await self._never_asked(intent):
            return await self._release(intent, "never_settled")
        try:
            settled = await asyncio.wait_for(s.facilitator.settle(payload, requirement), s.settings.settle_timeout_s)
        except TimeoutError:
            settled = SettleResponse(success=False, error_reason=R.UNEXPECTED_SETTLE_ERROR.value, transaction="",
                                     network=requirement.network)
        if settled.success:
            await self._owed(intent, settled)
            if not await s.budgets.commit(intent.hold, intent.amount, settled.transaction, intent.request_id,
                                          intent.details, once=commit_key(settled.transaction, intent.hold.id)):
                return await self._later(intent)
            await self.intents.finish(intent.id)
            s.metrics.payments.labels(route, "settled", "recovered_intent").inc()
            log.warning("settlement_intent_recovered", extra={"request_id": intent.request_id, "tx": settled.transaction,
                                                              "amount": str(intent.amount)})
            return True
        if s.unresolved(settled) or settled.error_reason == R.UNEXPECTED_SETTLE_ERROR.value:
            # Also a "final" dependency failure: nothing moved in *this* call, but the facilitator
            # could not read its own record of the first one (its store was away): ask again.
            log.warning("settlement_intent_unresolved", extra={"request_id": intent.request_id,
                                                               "reason": settled.error_reason, "tx": settled.transaction})
            return await self._later(intent)
        return await self._release(intent, settled.error_reason or "")

    async def _never_asked(self, intent: Intent) -> bool:
        """Whether the facilitator has no settlement of this payment at all, nor is its nonce
        spent: a valid verify says exactly that (ours checks its settlement store and the chain),
        so recovery never starts a settlement itself. A refusal of any kind: ask settle."""
        s = self.settlement
        if intent.delivered:  # a metered stream: its tokens went out, the settlement is owed to the payee
            return False
        payload, requirement = load_payment(intent.payment)
        try:
            verify = await asyncio.wait_for(s.facilitator.verify(payload, requirement), s.settings.verify_timeout_s)
        except TimeoutError:
            return False
        return verify.is_valid

    async def _release(self, intent: Intent, reason: str) -> bool:
        s = self.settlement
        if not await s.budgets.release(intent.hold):
            return await self._later(intent)
        await self._free(intent)
        await self.intents.finish(intent.id)
        s.metrics.payments.labels(intent.hold.route, "settle_failed", reason).inc()
        log.warning("settlement_intent_released", extra={"request_id": intent.request_id, "reason": reason})
        return True

    async def _later(self, intent: Intent) -> bool:
        await self.intents.lease(intent.id, self.owner, until_ms=self._now_ms() + RETRY_MS)
        return False

    async def _owed(self, intent: Intent, settled: SettleResponse) -> None:
        """The payment's record says settled (owed unless already delivered), unless a live
        request holds it (that request is resolving it itself)."""
        records = self.settlement.records
        now = self._now_ms()
        record = await records.acquire(intent.key, self.owner, now_ms=now, lease_ms=10_000)
        owner: str | None = self.owner
        if record is None:
            if await records.get(intent.key) is not None:
                return  # leased by a live request
            owner = None
            record = PaymentRecord(key=intent.key, state=RecordState.PROCESSING, request_fp=intent.request_fp,
                                   digest=intent.digest, payment=intent.payment, delivered=intent.delivered)
        if record.state != RecordState.SETTLED:
            record.state, record.tx = RecordState.SETTLED, settled.transaction
            record.settle = settled.model_dump_json(by_alias=True, exclude_none=True)
            record.payment = record.payment or intent.payment
        record.owner, record.lease_until_ms = "", 0
        await records.save(record, ttl_s=RECORD_TTL_S, owner=owner)

    async def _free(self, intent: Intent) -> None:
        """Nothing was charged: a resend of the payment may try again."""
        records = self.settlement.records
        if await records.acquire(intent.key, self.owner, now_ms=self._now_ms(), lease_ms=10_000) is not None:
            await records.abandon(intent.key, self.owner)
