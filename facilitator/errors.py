"""The facilitator's domain errors. `service.py` turns them into wire responses in one place."""

from __future__ import annotations

from facilitator.x402.reasons import ErrorReason

MAX_MESSAGE = 500  # the SDK truncates invalidMessage/errorMessage to this length


class PaymentInvalidError(Exception):
    """The payment fails a check; `reason` is the spec's code for it."""

    def __init__(self, reason: ErrorReason, message: str = "") -> None:
        super().__init__(f"{reason.value}: {message}" if message else reason.value)
        self.reason = reason
        self.message = message[:MAX_MESSAGE]


class ChainUnavailableError(Exception):
    """The chain could not be read; verify and settle fail closed."""
