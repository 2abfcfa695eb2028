"""What identifies a payment, for every layer that stores one: the facilitator's settlement records
and the gateway's payment records use these, so the same signed payment maps to the same key
however its header was encoded (v1 or v2, nonce with leading zeros, address case)."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson


def permit2_key(network: str, payer: str, nonce: int) -> str:
    # Permit2 nonces are per owner across all tokens and both proxies.
    return f"{network}:permit2:{payer.lower()}:{nonce}"


def eip3009_key(network: str, asset: str, payer: str, nonce: str) -> str:
    return f"{network}:{asset.lower()}:{payer.lower()}:{nonce.lower()}"


def payment_identity(inner: dict[str, Any], network: str, asset: str) -> tuple[str, str]:
    """(claimed payer, key) of a scheme payload (`PaymentPayload.payload`). The key is the
    payment's on-chain identity (network, nonce space, payer, nonce); a payload of no known shape
    gets a key of its own content."""
    p2 = inner.get("permit2Authorization")
    if isinstance(p2, dict) and isinstance(p2.get("from"), str) and isinstance(p2.get("nonce"), str):
        nonce = p2["nonce"]
        if nonce.isascii() and nonce.isdigit():
            return p2["from"], permit2_key(network, p2["from"], int(nonce))
    auth = inner.get("authorization")
    if isinstance(auth, dict) and isinstance(auth.get("from"), str) and isinstance(auth.get("nonce"), str):
        return auth["from"], eip3009_key(network, asset, auth["from"], auth["nonce"])
    return "", f"{network}:payload:{signed_payload_digest(inner)}"


def signed_payload_digest(inner: dict[str, Any]) -> str:
    """Digest of the signed payload as presented (signature included): a record answers only the
    request that presents this very payload, never a copy with another signature."""
    return hashlib.sha256(orjson.dumps(inner, option=orjson.OPT_SORT_KEYS)).hexdigest()
