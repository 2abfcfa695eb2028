"""The `exact` scheme on EVM networks: dispatches on the payload's shape (the reference's
rule: `permit2Authorization` present -> Permit2, otherwise EIP-3009)."""

from __future__ import annotations

from typing import Any

from facilitator.errors import PaymentInvalidError
from facilitator.evm.chain import EvmChain
from facilitator.schemes.evm_exact.eip3009 import Eip3009Payment, prepare_eip3009
from facilitator.schemes.evm_exact.permit2 import Permit2Payment, prepare_permit2
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import PaymentPayload, PaymentRequirements


class ExactEvmScheme:
    scheme = "exact"
    amount_is_maximum = False

    def __init__(self, chain: EvmChain) -> None:
        self.chain = chain
        self.network = chain.network

    def prepare(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, now: float, settle: bool = False
    ) -> Permit2Payment | Eip3009Payment:
        if payload.accepted.scheme != self.scheme or requirements.scheme != self.scheme:
            raise PaymentInvalidError(R.UNSUPPORTED_SCHEME, "scheme must be exact")
        if payload.accepted.network != requirements.network:
            raise PaymentInvalidError(R.NETWORK_MISMATCH, "accepted.network differs from the requirements")
        inner = payload.payload
        if "permit2Authorization" in inner:
            return prepare_permit2(self.chain, inner, requirements, now=now)
        if "authorization" in inner:
            return prepare_eip3009(self.chain, inner, requirements, now=now)
        raise PaymentInvalidError(R.INVALID_PAYLOAD, "payload has neither permit2Authorization nor authorization")

    def supported_extra(self) -> dict[str, Any] | None:
        return None
