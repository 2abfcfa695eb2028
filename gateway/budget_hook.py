"""Where budgets plug into the payment flow. The gateway calls `precheck` before any signature
work, `reserve` after verification, and exactly one of `commit` (settled) or `release` (anything
else) per reservation. The default enforces nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from gateway.pricing import Offer


@dataclass
class BudgetRefusal(Exception):
    status: int  # 402, 429, or 503 when the budget store is unreachable (fail closed)
    reason: str
    message: str
    details: dict = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Hold:
    id: str
    payer: str
    amount: int


class BudgetHook(Protocol):
    async def precheck(self, payer: str, network: str, asset: str, offer: Offer) -> None:
        """Raise BudgetRefusal for a claimed payer that must be refused before verification."""
        ...

    async def reserve(self, payer: str, network: str, asset: str, amount: int, offer: Offer, request_id: str) -> Hold:
        """Raise BudgetRefusal if `amount` does not fit every budget that applies."""
        ...

    async def commit(self, hold: Hold, amount: int, tx_hash: str, request_id: str) -> None: ...

    async def release(self, hold: Hold) -> None: ...


class NoBudgets:
    async def precheck(self, payer: str, network: str, asset: str, offer: Offer) -> None:
        return None

    async def reserve(self, payer: str, network: str, asset: str, amount: int, offer: Offer, request_id: str) -> Hold:
        return Hold(id=request_id, payer=payer, amount=amount)

    async def commit(self, hold: Hold, amount: int, tx_hash: str, request_id: str) -> None:
        return None

    async def release(self, hold: Hold) -> None:
        return None
