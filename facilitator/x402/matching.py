"""Is the requirement a client accepted the one that was offered? One rule for every layer: the
gateway binds a payment to its offer with it before any facilitator call, and the facilitator
checks `paymentPayload.accepted` against `paymentRequirements` with it.

The rule is the official SDK server's (`find_matching_requirements`): scheme, network, amount,
asset, payTo and maxTimeoutSeconds equal, and every offered `extra` field echoed unchanged (the
client may add fields). Addresses compare case-insensitively; amounts as the strings they are.
"""

from __future__ import annotations

from collections.abc import Sequence

from facilitator.x402.types import PaymentRequirements


class RequirementMismatchError(ValueError):
    """The accepted requirement is none of those offered; `field` is the wire name of what differs."""

    def __init__(self, field: str) -> None:
        super().__init__(f"{field} differs")
        self.field = field


def requirement_mismatch(accepted: PaymentRequirements, offered: PaymentRequirements) -> str | None:
    """None when `accepted` is `offered`; else the wire name of the first field that differs."""
    if accepted.scheme != offered.scheme:
        return "scheme"
    if accepted.network != offered.network:
        return "network"
    if accepted.asset.lower() != offered.asset.lower():
        return "asset"
    if accepted.amount != offered.amount:
        return "amount"
    if accepted.pay_to.lower() != offered.pay_to.lower():
        return "payTo"
    if accepted.max_timeout_seconds != offered.max_timeout_seconds:
        return "maxTimeoutSeconds"
    for key, value in offered.extra.items():
        if accepted.extra.get(key) != value:
            return f"extra.{key}"
    return None


def find_offered(accepted: PaymentRequirements, offered: Sequence[PaymentRequirements]) -> PaymentRequirements:
    """The offered requirement `accepted` is; else raises RequirementMismatchError naming the
    field that differs from the closest offer (the first in the same asset, else the first)."""
    for option in offered:
        if requirement_mismatch(accepted, option) is None:
            return option
    closest = next((o for o in offered if o.asset.lower() == accepted.asset.lower()), offered[0] if offered else None)
    field = requirement_mismatch(accepted, closest) if closest is not None else None
    raise RequirementMismatchError(field or "scheme")
