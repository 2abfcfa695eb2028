"""The budget store: atomic check-and-reserve, commit, release, usage, policies and the ledger.

Which budgets apply and what their windows are is decided in Python (budgets/enforcer.py); the
store only does the atomic part: for every `Check` at once, refuse if spent + reserved + amount
would pass any window's limit, else hold `amount` under a reservation id that expires by itself
(so a crashed replica cannot hold budget forever) until its settlement is asked for: then it
is pinned and never expires on its own (gateway/intents.py resolves it). Reserving more than is finally charged is
allowed: commit adds the amount actually settled and drops the hold (the `upto` scheme reserves
its signed maximum and commits what was used).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import storage
from budgets.models import BudgetUsage, LedgerEntry, Policy, RateLimit, Refusal, Scope, Window


class BudgetStoreUnavailableError(storage.StoreUnavailableError):
    """The store cannot be reached: enforcement fails closed."""


@dataclass(frozen=True, slots=True)
class Check:
    scope: Scope
    windows: tuple[Window, ...]
    rate: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class RateState:
    allowed: bool
    retry_after_s: float


@runtime_checkable
class LeaseStore(Protocol):
    """A store that can lease: one hold for several calls' amount (and rate tokens) that one replica
    hands out from memory (budgets/leases.py), each call ended in the store once."""

    async def reserve_lease(self, checks: list[Check], amount: int, lease_id: str, *, now: float, hold_s: float,
                            calls: int) -> Refusal | None: ...

    async def end_leased(self, checks: list[Check], lease_id: str, call_id: str, reserved: int, amount: int,
                         entry: LedgerEntry | None, *, now: float, once: str | None = None,
                         ended: Callable[[], None] | None = None) -> bool: ...

    async def retire_lease(self, checks: list[Check], lease_id: str, *, now: float, unused_calls: int) -> None: ...


class BudgetStore(Protocol):
    async def reserve(self, checks: list[Check], amount: int, reservation_id: str, *, now: float,
                      hold_s: float) -> Refusal | None: ...

    async def commit(self, checks: list[Check], reservation_id: str, amount: int, entry: LedgerEntry,
                     *, now: float, once: str | None = None) -> bool:
        """Add `amount` to the windows (every period's, from the enforcer: a store may count only
        those a budget is limited by, if it can rebuild the others exactly or conservatively),
        drop the hold, append the ledger entry. Idempotent per `once` (default: the reservation
        id; the gateway passes the settlement's transaction, so two holds for one payment count it
        once): returns False, only dropping this hold, if it
        was already committed."""
        ...

    async def release(self, checks: list[Check], reservation_id: str, *, now: float) -> None: ...

    async def pin(self, checks: list[Check], reservation_id: str, amount: int, *, now: float) -> bool:
        """Make the hold under `reservation_id` never expire: its settlement is about to be asked
        for, so only a commit or a release ends it (a crashed replica's recovery does, by the
        intent). False, writing nothing, when the hold is gone (it expired: its budget may have
        been given to another call since; reserve again before settling)."""
        ...

    async def rate_peek(self, scope: Scope, rate: RateLimit, *, now: float) -> RateState:
        """Would a call be allowed now? Does not consume. (The enforcer's pre-check peeks at its
        local mirror instead: budgets/rate_mirror.py.)"""
        ...

    async def rate_take(self, scope: Scope, rate: RateLimit, *, now: float) -> RateState:
        """Consume one call from the token bucket (after verification)."""
        ...

    async def usage(self, check: Check, *, now: float) -> list[BudgetUsage]: ...

    async def move_spend(self, old: Scope, new: Scope, windows: tuple[Window, ...]) -> None:
        """Carry a budget's counters and holds to the scope's new place (an agent that joined or
        left a group has a new Cluster hash tag on Redis). Not atomic across slots: an admin
        operation, not a hot path."""
        ...

    async def get_policy(self, kind: str, id: str, network: str, asset: str) -> Policy | None: ...

    async def put_policy(self, kind: str, id: str, policy: Policy) -> None: ...

    async def delete_policy(self, kind: str, id: str, network: str, asset: str) -> bool: ...

    async def list_policies(self) -> list[tuple[str, str, Policy]]: ...

    async def ledger(self, *, agent: str | None, start: float, end: float, limit: int) -> list[LedgerEntry]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
