"""What a scheme implementation provides to the facilitator service.

A scheme turns (payload, requirements) into a `PreparedPayment` with local checks only (no I/O),
whose `confirm()` reads the chain once, and whose `plan()` is everything `settle` needs to send
one transaction. verify and settle both go through prepare + confirm, so their checks
cannot drift apart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from facilitator.evm.statecache import Effect
from facilitator.x402.types import PaymentPayload, PaymentRequirements


@dataclass(frozen=True, slots=True)
class SettlementPlan:
    payer: str
    amount: int  # what the transaction moves (0: nothing to send)
    asset: str
    pay_to: str
    tx_to: str
    tx_data: bytes
    gas: int
    sender: str | None = None  # a signer that must send it (upto: witness.facilitator)
    # batch-settlement's claims move no tokens: sent even at amount 0, no Transfer to check
    transfers: bool = True
    response_amount: str | None = None  # the response's `amount` when not str(amount) (claims: "")
    extra: dict[str, Any] | None = None  # the success response's `extra` (batch: channelState)
    # what the mined transaction does to the payer's reads, applied to the state cache (none: the
    # payer is dropped from it)
    effects: tuple[Effect, ...] = ()


class PreparedPayment(Protocol):
    # Read-only members, so that a dataclass field and a computed property both qualify.
    @property
    def payer(self) -> str: ...
    @property
    def record_key(self) -> str: ...  # network + nonce space + payer + nonce: unique per on-chain authorization
    @property
    def digest(self) -> str: ...  # payment_digest(): same signed payment <=> same digest
    @property
    def nonce_used_reason(self) -> str: ...
    @property
    def settle_amount(self) -> int: ...
    @property
    def verify_extra(self) -> dict[str, Any] | None: ...  # a valid verify response's `extra`

    def check_time(self, now: float) -> None: ...  # prepare()'s validity-window checks, at another time

    async def confirm(self, *, fresh: bool = True) -> None: ...  # fresh=False: verify, may use the state cache

    def plan(self) -> SettlementPlan: ...


class SchemeFacilitator(Protocol):
    """One scheme on one network (or a pattern of networks), registered in the `SchemeRegistry`."""

    scheme: str
    network: str
    # The accepted amount is a ceiling: a settle request carries the amount to move, so settle
    # does not compare the requirements with `accepted` (the signature still bounds the amount).
    amount_is_maximum: bool

    def prepare(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, now: float, settle: bool = False
    ) -> PreparedPayment: ...

    def supported_extra(self) -> dict[str, Any] | None: ...


def payment_digest(typed_digest: bytes, signature: bytes) -> str:
    """Identifies one signed payment: its EIP-712 digest and its signature. A copy of a settled
    payment with another signature (forged, or a malleated twin) is another payment and never
    gets the first one's result."""
    return hashlib.sha256(typed_digest + signature).hexdigest()
