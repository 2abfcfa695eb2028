"""A paid call: the payment decoded from its header and bound to what the route offers, before
anything is asked of the facilitator."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from starlette.requests import Request

from facilitator.x402.errors import PaymentHeaderError, UnknownNetworkError
from facilitator.x402.headers import decode_payment_header
from facilitator.x402.identity import payment_identity, signed_payload_digest
from facilitator.x402.networks import to_caip2
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import PaymentPayload, PaymentPayloadV1, PaymentRequirements, PaymentRequirementsV1
from gateway.errors import GatewayError
from gateway.pricing import BATCH_SCHEME, Offer, OfferMismatchError, to_v1, v1_offered
from gateway.proxy import path_of

PAYMENT_ID = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
AnyPayload = PaymentPayload | PaymentPayloadV1
AnyRequirement = PaymentRequirements | PaymentRequirementsV1


@dataclass(frozen=True, slots=True)
class PaidCall:
    request: Request
    offer: Offer
    body: bytes  # as forwarded (metered routes: max_tokens capped)
    payload: AnyPayload
    requirement: AnyRequirement  # the offered requirement the payment is bound to (its wire version)
    network: str  # CAIP-2
    key: str  # the payment's on-chain identity: one record per payment across replicas
    digest: str  # of the signed payload as presented: only this very payment gets its recorded result
    fp: str  # of the request (method, path, query, body as sent)
    payer: str  # as the payload claims it (verify names the real one)
    payment_id: str | None  # payment-identifier, where the route declares the extension
    request_id: str

    @property
    def amount(self) -> int:
        r = self.requirement
        return int(r.amount if isinstance(r, PaymentRequirements) else r.max_amount_required)

    @property
    def upto(self) -> bool:
        return isinstance(self.requirement, PaymentRequirements) and self.requirement.scheme == "upto"


def decode_call(request: Request, offer: Offer, body: bytes, forward_body: bytes, request_id: str, *,
                resource_url: Callable[[], str], payment_ids: bool) -> PaidCall:
    """Raises GatewayError: 400 for a header that cannot be decoded, 402 (a challenge) for a
    payment that is not for what this route offers. A batch-settlement voucher has no per-call
    payment record: its key, digest and request fingerprint are left empty (not computed on the
    hot path)."""
    try:
        payload = decode_payment_header(request.headers)
        if payload is None:
            raise PaymentHeaderError(R.INVALID_PAYLOAD, "no payment header")
        # Where the extension is not declared, an id a client sends anyway is ignored.
        pid = payment_id_of(payload) if payment_ids else None
    except PaymentHeaderError as exc:
        raise GatewayError(exc.reason.value, exc.message, status=400, offer=offer) from None
    requirement = bind(payload, offer, resource_url)
    if isinstance(requirement, PaymentRequirements):
        network = requirement.network
        if requirement.scheme == BATCH_SCHEME:
            return PaidCall(request, offer, forward_body, payload, requirement, network, "", "", "", "", pid, request_id)
    else:
        network = to_caip2(requirement.network)
    payer, key = payment_identity(payload.payload, network, requirement.asset)
    target = path_of(request.scope).encode() + b"?" + request.scope["query_string"]
    fp = hashlib.sha256(b"%s %s\n" % (request.method.encode(), target) + body).hexdigest()
    return PaidCall(request, offer, forward_body, payload, requirement, network, key,
                    signed_payload_digest(payload.payload), fp, payer, pid, request_id)


def bind(payload: AnyPayload, offer: Offer, resource_url: Callable[[], str]) -> AnyRequirement:
    """The offered requirement this payment is for, compared field for field, before any
    facilitator call: a payment for a cheaper route, another payTo, asset or network fails here."""
    if isinstance(payload, PaymentPayload):
        try:
            return offer.bind(payload.accepted)
        except OfferMismatchError as exc:
            raise GatewayError(R.INVALID_PAYMENT_REQUIREMENTS.value, str(exc), offer=offer) from None
    for offered in filter(v1_offered, offer.requirements):
        try:
            same_network = to_caip2(payload.network) == offered.network
        except UnknownNetworkError:
            same_network = False
        if payload.scheme == offered.scheme and same_network:
            return to_v1(offered, resource_url(), offer.route.description, offer.route.mime_type)
    raise GatewayError(R.INVALID_PAYMENT_REQUIREMENTS.value, "no offered requirement has this payment's scheme and network",
                       offer=offer)


def payment_id_of(payload: AnyPayload) -> str | None:
    ext = getattr(payload, "extensions", None) or {}
    info = (ext.get("payment-identifier") or {}).get("info") if isinstance(ext, dict) else None
    pid = info.get("id") if isinstance(info, dict) else None
    if pid is None:
        return None
    if not isinstance(pid, str) or not PAYMENT_ID.match(pid):
        raise PaymentHeaderError(R.INVALID_PAYLOAD, "payment-identifier id must be 16-128 of [A-Za-z0-9_-]")
    return pid


def stored_payment(payload: AnyPayload, requirement: AnyRequirement) -> str:
    """What a record keeps to settle the payment again later (idempotent at the facilitator)."""
    return orjson.dumps({
        "payload": payload.model_dump(by_alias=True, exclude_none=True),
        "requirements": requirement.model_dump(by_alias=True, exclude_none=True),
    }).decode()


def load_payment(stored: str) -> tuple[AnyPayload, AnyRequirement]:
    doc = orjson.loads(stored)
    if doc["payload"].get("x402Version") == 1:
        return PaymentPayloadV1.model_validate(doc["payload"]), PaymentRequirementsV1.model_validate(doc["requirements"])
    return PaymentPayload.model_validate(doc["payload"]), PaymentRequirements.model_validate(doc["requirements"])
