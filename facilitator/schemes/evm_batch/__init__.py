"""The `batch-settlement` scheme on EVM (payment channels with cumulative vouchers, x402's
specs/schemes/batch-settlement): dispatches on `payload.type` as the reference facilitator does."""

from __future__ import annotations

from typing import Any

from facilitator.errors import PaymentInvalidError
from facilitator.evm.chain import EvmChain
from facilitator.schemes.evm_batch.operations import (
    ClaimOp,
    DepositOp,
    RefundOp,
    SweepOp,
    VoucherCheck,
    prepare_claim,
    prepare_deposit,
    prepare_refund,
    prepare_sweep,
    prepare_voucher,
)
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import PaymentPayload, PaymentRequirements

SCHEME = "batch-settlement"


class BatchSettlementEvmScheme:
    scheme = SCHEME
    # A settle request carries server-authored payloads (claim, settle, refund) whose `accepted`
    # is the route's requirement, not what is moved: settle does not compare them.
    amount_is_maximum = True

    def __init__(self, chain: EvmChain) -> None:
        self.chain = chain
        self.network = chain.network

    def prepare(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, now: float, settle: bool = False
    ) -> DepositOp | VoucherCheck | ClaimOp | SweepOp | RefundOp:
        if payload.accepted.scheme != SCHEME or requirements.scheme != SCHEME:
            raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_SCHEME, "scheme must be batch-settlement")
        if payload.accepted.network != requirements.network:
            raise PaymentInvalidError(
                R.INVALID_BATCH_SETTLEMENT_EVM_NETWORK_MISMATCH, "accepted.network differs from the requirements"
            )
        inner = payload.payload
        kind = inner.get("type")
        if kind == "deposit":
            return prepare_deposit(self.chain, inner, requirements, now=now)
        if settle:
            if kind == "claim":
                return prepare_claim(self.chain, inner)
            if kind == "settle":
                return prepare_sweep(self.chain, inner)
            if kind == "refund" and "refundNonce" in inner and "claims" in inner:
                return prepare_refund(self.chain, inner, requirements)
        elif kind in ("voucher", "refund"):
            return prepare_voucher(self.chain, inner, requirements, refund=kind == "refund")
        raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_PAYLOAD_TYPE, f"payload type {kind!r} is not accepted here")

    def supported_extra(self) -> dict[str, Any] | None:
        return None  # no receiverAuthorizer: servers sign claims and refunds themselves
