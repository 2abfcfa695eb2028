"""EIP-712 digests for the payment types x402 signs, and signer recovery.

This is the verify hot path: type hashes and domain separators are computed once, structs are
encoded by byte concatenation (every field is a static 32-byte word), and the signer is recovered
with libsecp256k1 through coincurve. That is about 6x faster than eth_account's generic
typed-data encoder (loadtests/results) and gives the same digest (tests/unit/test_eip712.py).
"""

from __future__ import annotations

from functools import lru_cache

import coincurve

try:  # safe-pysha3 is ~4x faster per call than pycryptodome's keccak (feasibility.md §6a)
    from sha3 import keccak_256 as _keccak_256

    def keccak(data: bytes) -> bytes:
        return _keccak_256(data).digest()

except ImportError:  # pragma: no cover - the dependency is declared; this keeps imports working
    from eth_hash.auto import keccak as _eth_keccak

    def keccak(data: bytes) -> bytes:
        return _eth_keccak(data)


SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N = SECP256K1_N // 2

DOMAIN_TYPEHASH_NO_VERSION = keccak(b"EIP712Domain(string name,uint256 chainId,address verifyingContract)")
DOMAIN_TYPEHASH = keccak(b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")

TOKEN_PERMISSIONS_TYPEHASH = keccak(b"TokenPermissions(address token,uint256 amount)")
EXACT_WITNESS_TYPEHASH = keccak(b"Witness(address to,uint256 validAfter)")
UPTO_WITNESS_TYPEHASH = keccak(b"Witness(address to,address facilitator,uint256 validAfter)")

# The string the proxies pass to Permit2; byte-exact or Permit2 reverts InvalidSigner().
EXACT_WITNESS_TYPE_STRING = (
    "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,uint256 validAfter)"
)
UPTO_WITNESS_TYPE_STRING = (
    "Witness witness)TokenPermissions(address token,uint256 amount)"
    "Witness(address to,address facilitator,uint256 validAfter)"
)
_PERMIT_WITNESS_PREFIX = (
    "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,"
)
EXACT_PERMIT_WITNESS_TYPEHASH = keccak((_PERMIT_WITNESS_PREFIX + EXACT_WITNESS_TYPE_STRING).encode())
UPTO_PERMIT_WITNESS_TYPEHASH = keccak((_PERMIT_WITNESS_PREFIX + UPTO_WITNESS_TYPE_STRING).encode())

TRANSFER_WITH_AUTHORIZATION_TYPEHASH = keccak(
    b"TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)"
)


class SignatureFormatError(ValueError):
    """The signature bytes cannot be an ECDSA signature (length, v, or s out of range)."""


def word_address(address: bytes) -> bytes:
    return b"\x00" * 12 + address


def word_uint(value: int) -> bytes:
    return value.to_bytes(32, "big")


def address_bytes(address: str) -> bytes:
    """'0x' + 40 hex chars (any case) -> 20 bytes. Callers validated the format already."""
    return bytes.fromhex(address[2:])


@lru_cache(maxsize=256)
def permit2_domain_separator(chain_id: int, permit2: bytes) -> bytes:
    return keccak(DOMAIN_TYPEHASH_NO_VERSION + keccak(b"Permit2") + word_uint(chain_id) + word_address(permit2))


@lru_cache(maxsize=256)
def token_domain_separator(name: str, version: str, chain_id: int, token: bytes) -> bytes:
    return keccak(
        DOMAIN_TYPEHASH
        + keccak(name.encode())
        + keccak(version.encode())
        + word_uint(chain_id)
        + word_address(token)
    )


def typed_digest(domain_separator: bytes, struct_hash: bytes) -> bytes:
    return keccak(b"\x19\x01" + domain_separator + struct_hash)


def permit2_witness_digest(
    *,
    chain_id: int,
    permit2: bytes,
    token: bytes,
    amount: int,
    spender: bytes,
    nonce: int,
    deadline: int,
    to: bytes,
    valid_after: int,
    facilitator: bytes | None = None,
) -> bytes:
    """Digest of a PermitWitnessTransferFrom with x402's exact witness, or the upto one when
    `facilitator` is given."""
    if facilitator is None:
        witness = keccak(EXACT_WITNESS_TYPEHASH + word_address(to) + word_uint(valid_after))
        typehash = EXACT_PERMIT_WITNESS_TYPEHASH
    else:
        witness = keccak(
            UPTO_WITNESS_TYPEHASH + word_address(to) + word_address(facilitator) + word_uint(valid_after)
        )
        typehash = UPTO_PERMIT_WITNESS_TYPEHASH
    permitted = keccak(TOKEN_PERMISSIONS_TYPEHASH + word_address(token) + word_uint(amount))
    struct_hash = keccak(
        typehash + permitted + word_address(spender) + word_uint(nonce) + word_uint(deadline) + witness
    )
    return typed_digest(permit2_domain_separator(chain_id, permit2), struct_hash)


def witness_hash(to: bytes, valid_after: int, facilitator: bytes | None = None) -> bytes:
    if facilitator is None:
        return keccak(EXACT_WITNESS_TYPEHASH + word_address(to) + word_uint(valid_after))
    return keccak(UPTO_WITNESS_TYPEHASH + word_address(to) + word_address(facilitator) + word_uint(valid_after))


def transfer_with_authorization_digest(
    *,
    domain_separator: bytes,
    from_: bytes,
    to: bytes,
    value: int,
    valid_after: int,
    valid_before: int,
    nonce: bytes,
) -> bytes:
    struct_hash = keccak(
        TRANSFER_WITH_AUTHORIZATION_TYPEHASH
        + word_address(from_)
        + word_address(to)
        + word_uint(value)
        + word_uint(valid_after)
        + word_uint(valid_before)
        + nonce
    )
    return typed_digest(domain_separator, struct_hash)


def split_signature(signature: bytes, *, require_low_s: bool) -> tuple[int, int, int]:
    """65-byte r||s||v (v 27/28 or 0/1) or 64-byte EIP-2098 compact -> (v 27/28, r, s)."""
    if len(signature) == 65:
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:64], "big")
        v = signature[64]
        if v < 27:
            v += 27
    elif len(signature) == 64:
        r = int.from_bytes(signature[:32], "big")
        vs = int.from_bytes(signature[32:], "big")
        s = vs & ((1 << 255) - 1)
        v = 27 + (vs >> 255)
    else:
        raise SignatureFormatError(f"signature must be 64 or 65 bytes, got {len(signature)}")
    if v not in (27, 28):
        raise SignatureFormatError(f"invalid recovery id v={v}")
    if not (0 < r < SECP256K1_N and 0 < s < SECP256K1_N):
        raise SignatureFormatError("r or s out of range")
    if require_low_s and s > SECP256K1_HALF_N:
        raise SignatureFormatError("malleable signature (high s)")
    return v, r, s


def expand_signature(signature: bytes) -> bytes:
    """An EOA signature as 65-byte r || s || v (v 27/28), from either form split_signature reads."""
    v, r, s = split_signature(signature, require_low_s=False)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes((v,))


def recover_signer(digest: bytes, signature: bytes, *, require_low_s: bool = False) -> bytes:
    """The 20-byte address that signed `digest`. Raises SignatureFormatError for malformed
    signatures; a well-formed signature by someone else recovers to another address."""
    v, r, s = split_signature(signature, require_low_s=require_low_s)
    compact = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes((v - 27,))
    try:
        public_key = coincurve.PublicKey.from_signature_and_message(compact, digest, hasher=None)
    except Exception as exc:  # libsecp256k1 rejects points that are not on the curve
        raise SignatureFormatError(f"signature does not recover: {exc}") from exc
    return keccak(public_key.format(compressed=False)[1:])[-20:]


@lru_cache(maxsize=4096)
def checksum_address(address: str) -> str:
    """EIP-55 checksum with the fast keccak (eth_utils' takes ~18 µs, this ~6 µs uncached). The
    same payers, tokens and payees recur, so it is cached."""
    lower = address[2:].lower()
    hashed = keccak(lower.encode()).hex()
    return "0x" + "".join(c.upper() if c > "9" and hashed[i] > "7" else c for i, c in enumerate(lower))
