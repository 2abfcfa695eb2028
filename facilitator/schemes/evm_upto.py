"""The `upto` scheme on EVM: a Permit2 permit for a maximum; settle moves the actual amount
(<= the maximum, 0 sends nothing) from the facilitator named in the signed witness."""

from __future__ import annotations

from typing import Any

from facilitator.errors import PaymentInvalidError
from facilitator.evm.chain import EvmChain
from facilitator.schemes.evm_exact.permit2 import Permit2Payment, prepare_permit2
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import PaymentPayload, PaymentRequirements


class UptoEvmScheme:
    scheme = "upto"
    amount_is_maximum = True

    def __init__(self, chain: EvmChain, facilitator_addresses: list[str]) -> None:
        self.chain = chain
        self.network = chain.network
        self._addresses = list(facilitator_addresses)
        self._lower = frozenset(a.lower() for a in facilitator_addresses)

    def prepare(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, now: float, settle: bool = False
    ) -> Permit2Payment:
        if payload.accepted.scheme != self.scheme or requirements.scheme != self.scheme:
            raise PaymentInvalidError(R.INVALID_UPTO_EVM_SCHEME, "scheme must be upto")
        if payload.accepted.network != requirements.network:
            raise PaymentInvalidError(R.INVALID_UPTO_EVM_NETWORK_MISMATCH, "accepted.network differs from the requirements")
        if "permit2Authorization" not in payload.payload:
            raise PaymentInvalidError(R.UNSUPPORTED_PAYLOAD_TYPE, "upto needs a permit2Authorization payload")
        return prepare_permit2(
            self.chain, payload.payload, requirements, now=now, upto=True,
            facilitator_addresses=self._lower, settle=settle,
        )  # fmt: skip

    def supported_extra(self) -> dict[str, Any] | None:
        # One address per kind, as the reference does; every one of ours can settle.
        return {"facilitatorAddress": self._addresses[0]}
