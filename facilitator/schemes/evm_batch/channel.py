"""batch-settlement channels: the config a channel is named by, and the EIP-712 digests of what
is signed about it (Voucher, Refund, ClaimBatch), computed the way the escrow contract computes
them (facilitator/contracts/X402BatchSettlement.sol). Pure: no I/O, so the gateway verifies a
voucher with this module alone (one keccak chain and one ECDSA recovery)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from facilitator.errors import PaymentInvalidError
from facilitator.evm import contracts
from facilitator.evm.eip712 import (
    DOMAIN_TYPEHASH,
    SignatureFormatError,
    address_bytes,
    checksum_address,
    keccak,
    recover_signer,
    typed_digest,
    word_address,
    word_uint,
)
from facilitator.x402.reasons import ErrorReason as R

MIN_WITHDRAW_DELAY = 900
MAX_WITHDRAW_DELAY = 2_592_000
UINT128_MAX = 2**128 - 1
ZERO_ADDRESS = "0x" + "00" * 20

CHANNEL_CONFIG_TYPEHASH = keccak(
    b"ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,"
    b"address token,uint40 withdrawDelay,bytes32 salt)"
)
VOUCHER_TYPEHASH = keccak(b"Voucher(bytes32 channelId,uint128 maxClaimableAmount)")
REFUND_TYPEHASH = keccak(b"Refund(bytes32 channelId,uint256 nonce,uint128 amount)")
CLAIM_ENTRY_TYPEHASH = keccak(b"ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)")
CLAIM_BATCH_TYPEHASH = keccak(
    b"ClaimBatch(ClaimEntry[] claims)ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
)

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
_HEX = re.compile(r"^0x(?:[0-9a-fA-F]{2})*$")


@lru_cache(maxsize=64)
def domain_separator(chain_id: int, verifying_contract: str = contracts.BATCH_SETTLEMENT) -> bytes:
    return keccak(
        DOMAIN_TYPEHASH
        + keccak(b"x402 Batch Settlement")
        + keccak(b"1")
        + word_uint(chain_id)
        + word_address(address_bytes(verifying_contract))
    )


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    payer: str  # checksummed
    payer_authorizer: str  # checksummed; ZERO_ADDRESS: the payer signs (ERC-1271 allowed)
    receiver: str
    receiver_authorizer: str
    token: str
    withdraw_delay: int
    salt: bytes  # 32 bytes

    @classmethod
    def from_wire(cls, raw: Any, reason: R) -> ChannelConfig:
        """The wire object (`channelConfig`), shape-checked; raises `reason` when malformed. A
        channel's every call repeats its config: parsed configs are cached by their field values."""
        if not isinstance(raw, dict):
            raise PaymentInvalidError(reason, "channelConfig must be an object")
        try:
            fields = tuple(raw[k] for k in _CONFIG_FIELDS)
        except KeyError as exc:
            raise PaymentInvalidError(reason, f"channelConfig: {exc}") from None
        if not all(type(v) in (str, int) for v in fields):  # hashable, and nothing else is valid anyway
            raise PaymentInvalidError(reason, "channelConfig: addresses and salt must be strings, withdrawDelay an integer")
        try:
            return _config_of(*fields)
        except ValueError as exc:
            raise PaymentInvalidError(reason, f"channelConfig: {exc}") from None

    def as_tuple(self) -> tuple[Any, ...]:
        """The ABI tuple (address,address,address,address,address,uint40,bytes32)."""
        return (
            self.payer,
            self.payer_authorizer,
            self.receiver,
            self.receiver_authorizer,
            self.token,
            self.withdraw_delay,
            self.salt,
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "payer": self.payer,
            "payerAuthorizer": self.payer_authorizer,
            "receiver": self.receiver,
            "receiverAuthorizer": self.receiver_authorizer,
            "token": self.token,
            "withdrawDelay": self.withdraw_delay,
            "salt": "0x" + self.salt.hex(),
        }

    def struct_hash(self) -> bytes:
        return keccak(
            CHANNEL_CONFIG_TYPEHASH
            + b"".join(word_address(address_bytes(a)) for a in self.as_tuple()[:5])
            + word_uint(self.withdraw_delay)
            + self.salt
        )

    def channel_id(self, chain_id: int) -> bytes:
        return _channel_id(self, chain_id)

    @property
    def voucher_signer(self) -> str:
        """Who must sign vouchers: the payerAuthorizer, else the payer."""
        return self.payer if self.payer_authorizer == ZERO_ADDRESS else self.payer_authorizer


def voucher_digest(chain_id: int, channel_id: bytes, max_claimable: int) -> bytes:
    return typed_digest(domain_separator(chain_id), keccak(VOUCHER_TYPEHASH + channel_id + word_uint(max_claimable)))


def refund_digest(chain_id: int, channel_id: bytes, nonce: int, amount: int) -> bytes:
    return typed_digest(domain_separator(chain_id), keccak(REFUND_TYPEHASH + channel_id + word_uint(nonce) + word_uint(amount)))


def claim_batch_digest(chain_id: int, entries: list[tuple[bytes, int, int]]) -> bytes:
    """`entries`: (channelId, maxClaimableAmount, totalClaimed) per row, in order."""
    hashes = b"".join(keccak(CLAIM_ENTRY_TYPEHASH + cid + word_uint(m) + word_uint(t)) for cid, m, t in entries)
    return typed_digest(domain_separator(chain_id), keccak(CLAIM_BATCH_TYPEHASH + keccak(hashes)))


def recovers_to(digest: bytes, signature: bytes, expected: str) -> bool:
    """ECDSA only, as the contract's payerAuthorizer path (OpenZeppelin: 65 bytes, low s)."""
    if len(signature) != 65:
        return False
    try:
        return recover_signer(digest, signature, require_low_s=True) == address_bytes(expected)
    except SignatureFormatError:
        return False


def parse_uint(value: Any, reason: R, what: str, *, bits: int = 128) -> int:
    """A decimal string (or int) within uint<bits>; raises `reason` otherwise."""
    if isinstance(value, bool):
        raise PaymentInvalidError(reason, f"{what} must be a decimal integer")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 78:
        number = int(value)
    else:
        raise PaymentInvalidError(reason, f"{what} must be a decimal integer")
    if not 0 <= number < 2**bits:
        raise PaymentInvalidError(reason, f"{what} out of range")
    return number


def parse_bytes32(value: Any, reason: R, what: str) -> bytes:
    if not isinstance(value, str) or not _BYTES32.fullmatch(value):
        raise PaymentInvalidError(reason, f"{what} must be 0x + 64 hex digits")
    return bytes.fromhex(value[2:])


def parse_hex(value: Any, reason: R, what: str) -> bytes:
    if not isinstance(value, str) or not _HEX.fullmatch(value) or len(value) > 20_002:
        raise PaymentInvalidError(reason, f"{what} must be 0x-prefixed hex bytes")
    return bytes.fromhex(value[2:])


_CONFIG_FIELDS = ("payer", "payerAuthorizer", "receiver", "receiverAuthorizer", "token", "withdrawDelay", "salt")


@lru_cache(maxsize=8192)
def _config_of(payer: Any, payer_authorizer: Any, receiver: Any, receiver_authorizer: Any, token: Any, delay: Any,
               salt: Any) -> ChannelConfig:
    """Raises ValueError (not cached)."""
    if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay < 2**40:
        raise ValueError("withdrawDelay must be a uint40")
    if not isinstance(salt, str) or not _BYTES32.fullmatch(salt):
        raise ValueError("salt must be 0x + 64 hex digits")
    return ChannelConfig(_address(payer), _address(payer_authorizer), _address(receiver), _address(receiver_authorizer),
                         _address(token), delay, bytes.fromhex(salt[2:]))


@lru_cache(maxsize=8192)
def _channel_id(config: ChannelConfig, chain_id: int) -> bytes:
    return typed_digest(domain_separator(chain_id), config.struct_hash())


def _address(value: Any) -> str:
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        raise ValueError("addresses must be 0x + 40 hex digits")
    return checksum_address(value)
