"""Errors raised by the x402 wire layer (codecs, body parsing, network names)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

from facilitator.x402.reasons import ErrorReason

__all__ = ["FieldError", "PaymentHeaderError", "UnknownNetworkError", "WireFormatError"]


class FieldError(TypedDict):
    """One field that failed validation: wire (camelCase) dotted path and what was wrong."""

    loc: str
    msg: str


class WireFormatError(ValueError):
    """Bytes on the wire that are not a valid x402 object.

    ``reason`` is ``invalid_payload`` or ``invalid_x402_version``; ``message`` says what was
    wrong in words; ``errors`` lists the offending fields when the input was a JSON object
    that failed validation (empty for undecodable or oversized input).
    """

    def __init__(
        self,
        reason: ErrorReason,
        message: str,
        errors: Sequence[FieldError] = (),
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.errors: list[FieldError] = list(errors)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready body for a 400 response."""
        body: dict[str, Any] = {"error": str(self.reason), "message": self.message}
        if self.errors:
            body["errors"] = [dict(e) for e in self.errors]
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason.value!r}, {self.message!r})"


class PaymentHeaderError(WireFormatError):
    """A payment header (``PAYMENT-SIGNATURE``, ``X-PAYMENT``, ...) that cannot be decoded."""


class UnknownNetworkError(ValueError):
    """A network name or CAIP-2 id that is malformed or not in the known table."""

    def __init__(self, network: str, message: str | None = None) -> None:
        super().__init__(message or f"unknown network: {network!r}")
        self.network = network
