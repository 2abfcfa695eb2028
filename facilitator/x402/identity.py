"""What identifies a payment and whom it claims to come from, for every layer that stores one: the
facilitator's settlement records and the gateway's payment records use these, so the same signed
payment maps to the same key however its header was encoded (v1 or v2, nonce with leading zeros,
address case)."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

PERMIT2 = "permit2"
EIP3009 = "eip3009"


def permit2_key(network: str, payer: str, nonce: int) -> str:
    # Permit2 nonces are per owner across all tokens and both proxies.
    return f"{network}:permit2:{payer.lower()}:{nonce}"


def eip3009_key(network: str, asset: str, payer: str, nonce: str) -> str:
    return f"{network}:{asset.lower()}:{payer.lower()}:{nonce.lower()}"


def signed_authorization(inner: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """("permit2" | "eip3009", the signed authorization) of a scheme payload
    (`PaymentPayload.payload`), by the reference's dispatch rule: `permit2Authorization` present
    -> Permit2, else `authorization` -> EIP-3009. Shape only: nothing here is verified."""
    if "permit2Authorization" in inner:
        kind, auth = PERMIT2, inner["permit2Authorization"]
    elif "authorization" in inner:
        kind, auth = EIP3009, inner["authorization"]
    else:
        return None
    return (kind, auth) if isinstance(auth, dict) else None


def claimed_payer(inner: dict[str, Any]) -> str | None:
    """The payer a scheme payload names (`from` of its authorization), before any check: verify
    proves it (or names the real one)."""
    found = signed_authorization(inner)
    payer = found[1].get("from") if found is not None else None
    return payer if isinstance(payer, str) else None


def payment_identity(inner: dict[str, Any], network: str, asset: str) -> tuple[str, str]:
    """(claimed payer, key) of a scheme payload (`PaymentPayload.payload`). The key is the
    payment's on-chain identity (network, nonce space, payer, nonce); a payload of no known shape
    gets a key of its own content and no payer."""
    found = signed_authorization(inner)
    if found is not None:
        kind, auth = found
        payer, nonce = claimed_payer(inner), auth.get("nonce")
        if payer is not None and isinstance(nonce, str):
            if kind == EIP3009:
                return payer, eip3009_key(network, asset, payer, nonce)
            if nonce.isascii() and nonce.isdigit():
                return payer, permit2_key(network, payer, int(nonce))
    return "", f"{network}:payload:{signed_payload_digest(inner)}"


def signed_payload_digest(inner: dict[str, Any]) -> str:
    """Digest of the signed payload as presented (signature included): a record answers only the
    request that presents this very payload, never a copy with another signature."""
    return hashlib.sha256(orjson.dumps(inner, option=orjson.OPT_SORT_KEYS)).hexdigest()
