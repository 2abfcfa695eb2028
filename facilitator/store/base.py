"""The settlement record store: how a payment moves claimed -> submitted -> settled/failed,
shared by every facilitator process so each payment is settled at most once.

A record is keyed by what makes a payment unique on-chain: network, asset, payer and the
payer's nonce (Permit2 unordered nonce or EIP-3009 nonce). Its `digest` identifies the signed
payload, so a second, different payload for the same nonce is told apart from a retry.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import storage


class SettlementState(StrEnum):
    CLAIMED = "claimed"  # a process is settling it; no transaction has been broadcast yet
    SUBMITTED = "submitted"  # a signed transaction exists (raw_tx) and may be on the network
    SETTLED = "settled"  # terminal: confirmed on-chain
    FAILED = "failed"  # terminal: the transaction reverted or the payment was refused on-chain


TERMINAL = frozenset({SettlementState.SETTLED, SettlementState.FAILED})


@dataclass(slots=True)
class SettlementRecord:
    key: str
    digest: str
    state: SettlementState
    lease_until_ms: int = 0
    tx_hash: str = ""
    raw_tx: str = ""
    signer: str = ""
    response: str = ""  # SettleResponse JSON, set when terminal
    updated_ms: int = 0


@dataclass(frozen=True, slots=True)
class ClaimResult:
    won: bool
    record: SettlementRecord | None  # the existing record when not won


class StoreUnavailableError(storage.StoreUnavailableError):
    """The settlement store could not be reached; callers must fail closed."""


class SettlementStore(Protocol):
    async def claim(self, key: str, digest: str, *, now_ms: int, lease_ms: int) -> ClaimResult:
        """Atomically create a CLAIMED record, or take over one whose claim expired without a
        broadcast. Otherwise return the existing record."""
        ...

    async def mark_submitted(
        self, key: str, digest: str, *, tx_hash: str, raw_tx: str, signer: str, response: str, now_ms: int
    ) -> None:
        """Record the signed transaction before it is broadcast, with the SettleResponse it
        will produce if it confirms (so a reconciler can finish it without the payload)."""
        ...

    async def finish(self, key: str, digest: str, *, state: SettlementState, response: str, now_ms: int) -> None: ...

    async def release(self, key: str, digest: str) -> None:
        """Drop an unfinished record whose transaction was never accepted by the network, so the
        payment may be tried again. Callers release only when nothing was broadcast."""
        ...

    async def get(self, key: str) -> SettlementRecord | None: ...

    async def unfinished(self, *, older_than_ms: int, limit: int = 100) -> list[SettlementRecord]:
        """SUBMITTED records not updated since `older_than_ms`, and CLAIMED ones whose lease
        expired: what a reconciler must finish after a crash."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
