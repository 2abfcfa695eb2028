"""Facilitator signer keys and transaction signing. Keys never leave this module: no repr,
no log line and no response carries them.

Signing is on every settlement's path, so it does not go through eth_account: that re-derives
the key and builds a validated transaction object per call (~800 µs). We keep the parsed
libsecp256k1 key (coincurve) and encode the one transaction type we send, EIP-1559 (type 2),
straight to RLP (~5x less CPU). eth_account's RFC 6979 signing is deterministic too, so the
bytes are identical: tests/unit/test_fast_signer.py checks that on a corpus.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import coincurve

from facilitator.evm import rlp
from facilitator.evm.eip712 import checksum_address, keccak

_EMPTY_ACCESS_LIST: list = []


@dataclass(frozen=True, slots=True)
class SignedTransaction:
    raw: str  # 0x-hex, what eth_sendRawTransaction takes
    tx_hash: str  # 0x-hex
    nonce: int


def eip1559_unsigned(*, chain_id: int, nonce: int, to: bytes, data: bytes, gas: int, max_fee: int,
                     priority_fee: int, value: int = 0) -> list:
    """The fields of an EIP-1559 transaction in RLP order, before the signature."""
    return [chain_id, nonce, priority_fee, max_fee, gas, to, value, data, _EMPTY_ACCESS_LIST]


@dataclass(eq=False)
class Signer:
    address: str  # checksummed
    _key: coincurve.PrivateKey = field(repr=False)

    @classmethod
    def from_key(cls, private_key: str) -> Signer:
        hex_key = private_key[2:] if private_key.startswith(("0x", "0X")) else private_key
        key = coincurve.PrivateKey(bytes.fromhex(hex_key))
        public = key.public_key.format(compressed=False)[1:]
        return cls(address=checksum_address("0x" + keccak(public)[-20:].hex()), _key=key)

    def sign(self, *, chain_id: int, nonce: int, to: str, data: bytes, gas: int, max_fee: int,
             priority_fee: int) -> SignedTransaction:
        """Sign one EIP-1559 call with value 0 and an empty access list (all we ever send)."""
        fields = eip1559_unsigned(chain_id=chain_id, nonce=nonce, to=bytes.fromhex(to[2:]), data=data, gas=gas,
                                  max_fee=max_fee, priority_fee=priority_fee)
        signature = self._key.sign_recoverable(keccak(b"\x02" + rlp.encode(fields)), hasher=None)
        # coincurve gives r || s || recovery id, with s already low (libsecp256k1 normalises it).
        fields += [signature[64], int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big")]
        raw = b"\x02" + rlp.encode(fields)
        return SignedTransaction(raw="0x" + raw.hex(), tx_hash="0x" + keccak(raw).hex(), nonce=nonce)

    def __repr__(self) -> str:
        return f"Signer({self.address})"


class SignerPool:
    """Round-robin over the configured keys: each key has its own nonce sequence, so more keys
    mean more settlements in flight without nonce contention."""

    def __init__(self, signers: list[Signer]) -> None:
        if not signers:
            raise ValueError("at least one facilitator signer key is required")
        self.signers = signers
        self._cycle = itertools.cycle(signers)
        self._by_address = {s.address.lower(): s for s in signers}

    def next(self) -> Signer:
        return next(self._cycle)

    def get(self, address: str) -> Signer | None:
        return self._by_address.get(address.lower())

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.signers]
