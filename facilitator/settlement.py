"""Exactly-once settlement: claim the payment in the shared store, re-check it, send one
transaction, wait for its receipt, record the outcome.

The state machine (facilitator/store/base.py) is what makes it safe across processes:
- a payment already SETTLED or FAILED returns its first result, without touching the chain;
- a payment SUBMITTED by anyone is finished by waiting for *that* transaction (rebroadcasting
  its recorded bytes if the node lost it), never by signing another;
- a payment CLAIMED by a live process is waited for; a claim whose process died before it
  broadcast anything expires and can be taken over;
- a receipt that does not come in time gives `settlement_pending` with the hash, and the record
  stays SUBMITTED for the next /settle or the reconciler to finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from facilitator.errors import ChainUnavailableError, PaymentInvalidError
from facilitator.evm.chain import EvmChain
from facilitator.evm.contracts import TRANSFER_TOPIC
from facilitator.evm.nonces import NonceUnavailableError
from facilitator.evm.signer import SignedTransaction, SignerPool
from facilitator.evm.transactions import BroadcastRejectedError, Receipt
from facilitator.schemes.base import PreparedPayment, SettlementPlan
from facilitator.store.base import TERMINAL, SettlementRecord, SettlementState, SettlementStore, StoreUnavailableError
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import SettleResponse

log = logging.getLogger("facilitator.settlement")


def _dump(resp: SettleResponse) -> str:
    return resp.model_dump_json(by_alias=True, exclude_none=True)


def transfer_logged(receipt: Receipt, plan: SettlementPlan) -> bool:
    """The receipt has Transfer(payer -> payTo, amount) emitted by the asset."""
    asset = plan.asset.lower()
    payer = plan.payer.lower()[2:]
    pay_to = plan.pay_to.lower()[2:]
    for entry in receipt.logs:
        topics = entry.get("topics") or []
        if (
            len(topics) == 3
            and str(entry.get("address", "")).lower() == asset
            and topics[0] == TRANSFER_TOPIC
            and topics[1][-40:].lower() == payer
            and topics[2][-40:].lower() == pay_to
            and int(entry.get("data", "0x0") or "0x0", 16) == plan.amount
        ):
            return True
    return False


def _success(plan: SettlementPlan, tx_hash: str, network: str) -> SettleResponse:
    amount = str(plan.amount) if plan.response_amount is None else plan.response_amount
    return SettleResponse(success=True, payer=plan.payer, transaction=tx_hash, network=network, amount=amount,
                          extra=plan.extra)


class Settler:
    def __init__(
        self,
        store: SettlementStore,
        signers: SignerPool,
        *,
        receipt_timeout_s: float = 20.0,
        lease_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.signers = signers
        self.receipt_timeout_s = receipt_timeout_s
        self.lease_ms = int(lease_s * 1000)
        self.unfinished = 0  # what the last reconcile pass found (a gauge)
        self.clock = clock

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def settle(self, chain: EvmChain, prepared: PreparedPayment) -> SettleResponse:
        key, digest = prepared.record_key, prepared.digest
        give_up = time.monotonic() + self.receipt_timeout_s
        while True:
            claim = await self.store.claim(key, digest, now_ms=self._now_ms(), lease_ms=self.lease_ms)
            if claim.won:
                break
            record = claim.record
            assert record is not None
            if record.digest != digest:
                if record.state in TERMINAL or record.state == SettlementState.SUBMITTED:
                    return self._failure(
                        chain, prepared.payer, R(prepared.nonce_used_reason),
                        "another payment with this nonce was settled", final=True,
                    )  # fmt: skip
                # Another copy is being checked (a forged or malleated one fails its re-check and
                # lets go): its outcome is awaited, never taken as this payment's.
            elif record.state in TERMINAL:
                return SettleResponse.model_validate_json(record.response)
            elif record.state == SettlementState.SUBMITTED:
                return await self._finish_submitted(chain, record, prepared.payer)
            if time.monotonic() >= give_up:
                return self._failure(chain, prepared.payer, R.SETTLEMENT_PENDING, "another process is settling this payment")
            await asyncio.sleep(0.02)
        return await self._settle_claimed(chain, prepared)

    async def _settle_claimed(self, chain: EvmChain, prepared: PreparedPayment) -> SettleResponse:
        key, digest = prepared.record_key, prepared.digest
        try:
            await prepared.confirm()
            plan = prepared.plan()
        except PaymentInvalidError as exc:
            await self.store.release(key, digest)
            return self._failure(chain, prepared.payer, exc.reason, exc.message, final=True)
        except ChainUnavailableError as exc:
            await self.store.release(key, digest)
            return self._failure(chain, prepared.payer, R.UNEXPECTED_SETTLE_ERROR, f"chain unavailable: {exc}", final=True)
        except Exception:  # a bug, not the payment's fault: nothing was signed, so the payment is let go
            log.exception("settle_recheck_failed", extra={"key": key})
            await self.store.release(key, digest)
            return self._failure(chain, prepared.payer, R.UNEXPECTED_SETTLE_ERROR, "the re-check failed", final=True)
        if plan.amount == 0 and plan.transfers:  # upto settled at zero: nothing moves, no transaction
            resp = SettleResponse(success=True, payer=plan.payer, transaction="", network=chain.network, amount="0",
                                  extra=plan.extra)
            await self.store.finish(key, digest, state=SettlementState.SETTLED, response=_dump(resp), now_ms=self._now_ms())
            return resp
        signer = self.signers.get(plan.sender) if plan.sender else self.signers.next()
        if signer is None:
            await self.store.release(key, digest)
            return self._failure(chain, plan.payer, R.UPTO_FACILITATOR_MISMATCH, "no key for the signer the payment names",
                                 final=True)

        sent: list[str] = []  # every transaction signed for it (a nonce collision signs another)

        async def persist(signed: SignedTransaction) -> None:
            sent.append(signed.tx_hash)
            chain.state.own_tx(signed.tx_hash, plan.payer)
            success = _success(plan, signed.tx_hash, chain.network)
            await self.store.mark_submitted(
                key, digest, tx_hash=signed.tx_hash, raw_tx=signed.raw, signer=signer.address,
                response=_dump(success), now_ms=self._now_ms(),
            )  # fmt: skip

        # While it is in flight, verifies of this payer count its amount as spent; when it ends, the
        # state cache applies its effects to the payer (mined) or drops what it holds about them.
        stamp = chain.state.add_inflight(plan.asset, plan.payer, plan.amount)
        mined = False
        try:
            try:
                signed = await chain.sender.send(signer, to=plan.tx_to, data=plan.tx_data, gas=plan.gas, persist=persist)
            except (BroadcastRejectedError, NonceUnavailableError) as exc:
                await self.store.release(key, digest)  # refused, or never sent: nothing is on the network
                log.warning("settlement_broadcast_rejected", extra={"reason": str(exc), "signer": signer.address})
                return self._failure(chain, plan.payer, R.UNEXPECTED_SETTLE_ERROR, f"broadcast rejected: {exc}", final=True)
            receipt = await chain.sender.wait_receipt(signed.tx_hash, signed.raw, self.receipt_timeout_s)
            resp = await self._conclude(chain, key, digest, plan, signed.tx_hash, receipt)
            mined = resp.success
            return resp
        finally:
            chain.state.settled(plan.asset, plan.payer, plan.amount, stamp=stamp,
                                effects=plan.effects if mined else (), tx_hashes=sent)

    async def _finish_submitted(self, chain: EvmChain, record: SettlementRecord, payer: str) -> SettleResponse:
        receipt = await chain.sender.wait_receipt(record.tx_hash, record.raw_tx, self.receipt_timeout_s)
        if receipt is None:
            return self._failure(chain, payer, R.SETTLEMENT_PENDING, "transaction not yet confirmed", tx=record.tx_hash)
        return await self.record_receipt(chain, record, receipt)

    async def record_receipt(self, chain: EvmChain, record: SettlementRecord, receipt: Receipt) -> SettleResponse:
        """Finish a SUBMITTED record from its receipt (used after a restart, by the reconciler)."""
        success = SettleResponse.model_validate_json(record.response)
        if receipt.status == 1:
            resp = success
            state = SettlementState.SETTLED
        else:
            resp = self._failure(chain, success.payer or "", R.TRANSACTION_FAILED, "transaction reverted",
                                 tx=record.tx_hash, final=True)
            state = SettlementState.FAILED
        await self._finish_record(record.key, record.digest, state, resp)
        return resp

    async def _finish_record(self, key: str, digest: str, state: SettlementState, resp: SettleResponse) -> None:
        """After the chain has spoken, a store outage must not turn the outcome into an error: the
        record stays SUBMITTED and the reconciler finishes it from the receipt later."""
        try:
            await self.store.finish(key, digest, state=state, response=_dump(resp), now_ms=self._now_ms())
        except StoreUnavailableError:
            log.error("settlement_record_not_finished", extra={"key": key, "tx": resp.transaction})

    async def _conclude(
        self, chain: EvmChain, key: str, digest: str, plan: SettlementPlan, tx_hash: str, receipt: Receipt | None
    ) -> SettleResponse:
        if receipt is None:
            log.warning("settlement_pending", extra={"tx": tx_hash})
            return self._failure(chain, plan.payer, R.SETTLEMENT_PENDING, "receipt not received in time", tx=tx_hash)
        if receipt.status != 1:
            resp = self._failure(chain, plan.payer, R.TRANSACTION_FAILED, "transaction reverted", tx=tx_hash, final=True)
            state = SettlementState.FAILED
        elif plan.transfers and not transfer_logged(receipt, plan):
            resp = self._failure(
                chain, plan.payer, R.INVALID_EXACT_EVM_TRANSFER_EVENT_MISMATCH,
                "receipt has no matching Transfer event", tx=tx_hash,
            )  # fmt: skip
            state = SettlementState.FAILED
        else:
            resp = _success(plan, tx_hash, chain.network)
            state = SettlementState.SETTLED
        await self._finish_record(key, digest, state, resp)
        return resp

    @staticmethod
    def _failure(chain: EvmChain, payer: str, reason: R, message: str, *, tx: str = "", final: bool = False) -> SettleResponse:
        """`final`: no money moved for this payment and none will (nothing was broadcast, or the
        transaction reverted); a caller may treat the payment as not charged."""
        return SettleResponse(
            success=False,
            error_reason=reason.value,
            error_message=message,
            payer=payer or None,
            transaction=tx,
            network=chain.network,
            extra={"final": True} if final else None,
        )

    async def reconcile_once(self, chains: dict[str, EvmChain], *, older_than_s: float) -> int:
        """Finish records a crashed or timed-out process left behind. Returns how many changed."""
        changed = 0
        records = await self.store.unfinished(older_than_ms=self._now_ms() - int(older_than_s * 1000))
        self.unfinished = len(records)
        for record in records:
            if record.state == SettlementState.CLAIMED:
                await self.store.release(record.key, record.digest)  # expired, nothing broadcast
                changed += 1
                continue
            chain = chains.get(":".join(record.key.split(":")[:2]))  # keys start with the CAIP-2 network
            if chain is None:
                continue
            # A record found unfinished: if the node does not know its transaction (dropped, or the
            # process died between recording and broadcasting), send the recorded bytes again now.
            receipt = await chain.sender.wait_receipt(record.tx_hash, record.raw_tx, 0.5, lookup_after_s=0.0)
            if receipt is not None:
                await self.record_receipt(chain, record, receipt)
                changed += 1
        return changed
