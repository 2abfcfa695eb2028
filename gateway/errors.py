"""The gateway's refusals: one exception type, rendered in one place
(gateway.paywall.responses.render_refusal).

Reasons keep the x402 spec's names where the spec has one (facilitator.x402.reasons.ErrorReason,
passed through as they come); the gateway's own are below, and budgets' come from budgets.models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.pricing import Offer


class GatewayReason(StrEnum):
    PAYMENT_REQUIRED = "payment_required"
    PAYMENT_ALREADY_USED = "payment_already_used"
    PAYMENT_IN_PROGRESS = "payment_in_progress"
    PAYMENT_IDENTIFIER_CONFLICT = "payment_identifier_conflict"
    SESSION_UNKNOWN = "session_unknown"
    SESSION_EXHAUSTED = "session_exhausted"
    SESSION_EXPIRED = "session_expired"
    SESSION_CLOSED = "session_closed"
    SESSION_MISSING = "session_missing"
    SESSION_DEADLINE = "session_deadline"
    INVALID_REQUEST = "invalid_request"
    MODEL_NOT_OFFERED = "model_not_offered"
    PROMPT_TOO_LARGE = "prompt_too_large"
    REQUEST_TOO_LARGE = "request_too_large"
    REQUEST_INCOMPLETE = "request_incomplete"  # the body did not arrive whole (the client left, or too slowly)
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_ERROR = "upstream_error"
    STORE_UNAVAILABLE = "store_unavailable"
    PRICE_UNAVAILABLE = "price_unavailable"
    NO_PAYMENT_OPTION = "no_payment_option"
    TEE_PROOF_INVALID = "tee_proof_invalid"
    TEE_STREAM_REFUSED = "tee_stream_refused"


@dataclass(eq=False)  # exceptions stay hashable
class GatewayError(Exception):
    """A call the gateway refuses. `offer` set: the refusal is a challenge (402 with
    PAYMENT-REQUIRED and the v1 body), so the agent can pay (again) at once."""

    reason: str
    message: str
    status: int = 402
    headers: dict[str, str] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)  # transaction, network, ... (empty ones dropped)
    offer: Offer | None = None
    outcome: str = "refused"  # the payments metric's outcome label ("not_charged": the upstream failed)

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"


class UpstreamRefused(GatewayError):
    """The upstream refused the request itself (4xx: a bad request, the provider's own rate
    limit): its answer passes through as it came, in the format the agent's SDK reads; nothing is
    charged. An upstream that failed (5xx) is the gateway's 502 `upstream_error` instead."""

    def __init__(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        super().__init__(GatewayReason.UPSTREAM_ERROR, f"the upstream answered {status}", status=status,
                         outcome="not_charged")
        self.body = body
        self.upstream_headers = headers
