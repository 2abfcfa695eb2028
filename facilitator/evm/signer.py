"""Facilitator signer keys and transaction signing. Keys never leave this module: no repr,
no log line and no response carries them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from eth_account import Account
from eth_account.signers.local import LocalAccount


@dataclass(frozen=True, slots=True)
class SignedTransaction:
    raw: str  # 0x-hex, what eth_sendRawTransaction takes
    tx_hash: str  # 0x-hex
    nonce: int


@dataclass(eq=False)
class Signer:
    address: str  # checksummed
    _account: LocalAccount = field(repr=False)

    @classmethod
    def from_key(cls, private_key: str) -> Signer:
        account: LocalAccount = Account.from_key(private_key)
        return cls(address=account.address, _account=account)

    def sign(self, tx: dict) -> SignedTransaction:
        signed = self._account.sign_transaction(tx)
        return SignedTransaction(
            raw="0x" + bytes(signed.raw_transaction).hex(),
            tx_hash="0x" + bytes(signed.hash).hex(),
            nonce=int(tx["nonce"]),
        )

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
