"""Where budgets plug into the payment flow. The gateway calls `precheck` before any signature
work, `reserve` after verification, `pin` right before settlement is asked for (the hold then
does not expire on its own before it ends: pinned, unless it outlives the settlement anyway), and
exactly one of `commit` (settled) or `release` (anything else) per hold. `NoBudgets` enforces
nothing; `budgets.enforcer.BudgetEnforcer` is the real one."""

from __future__ import annotations

from typing import Protocol

from budgets.models import Hold, Refusal, hold_id_for

__all__ = ["BudgetHook", "Hold", "NoBudgets", "Refusal"]


class BudgetHook(Protocol):
    async def precheck(self, payer: str, network: str, asset: str, route: str, model: str | None) -> None:
        """Raise Refusal for a claimed (not yet verified) payer that must be shed early."""
        ...

    async def reserve(self, payer: str, network: str, asset: str, amount: int, route: str, model: str | None,
                      request_id: str) -> Hold:
        """Raise Refusal if `amount` does not fit every budget that applies. The hold's id is
        unique per call (`hold_id_for`), whatever the request id."""
        ...

    async def pin(self, hold: Hold, *, within_s: float | None = None) -> None:
        """Raise Refusal when the hold cannot be pinned (then settlement is not asked for).
        `within_s`: the caller ends the hold within that long (or hands it over to recovery,
        which pins it): a hold that outlives that is not pinned (no round trip)."""
        ...

    async def commit(self, hold: Hold, amount: int, tx_hash: str, request_id: str,
                     details: dict | None = None, *, once: str | None = None) -> bool:
        """`amount` is what was charged (upto: the metered amount, at most the hold); `details`
        go to the ledger entry (usage, the missing-usage policy applied). Idempotent per `once`
        (default: the hold); True when counted (now or before), False when deferred (the store
        is down)."""
        ...

    async def release(self, hold: Hold) -> bool:
        """False when it could not be done now (the store is away)."""
        ...


class NoBudgets:
    async def precheck(self, payer: str, network: str, asset: str, route: str, model: str | None) -> None:
        return None

    async def reserve(self, payer: str, network: str, asset: str, amount: int, route: str, model: str | None,
                      request_id: str) -> Hold:
        return Hold(id=hold_id_for(request_id), agent=payer, network=network, asset=asset, amount=amount, route=route,
                    model=model)

    async def pin(self, hold: Hold, *, within_s: float | None = None) -> None:
        return None

    async def commit(self, hold: Hold, amount: int, tx_hash: str, request_id: str,
                     details: dict | None = None, *, once: str | None = None) -> bool:
        return True

    async def release(self, hold: Hold) -> bool:
        return True
