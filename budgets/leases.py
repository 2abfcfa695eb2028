"""Budget leases: one hold in the store for several calls, handed out from memory.

A paid call costs the store a reserve and a commit. With leases (`budgets.lease_calls` > 0, a
store that can lease: Redis), the first call of an agent reserves `lease_calls` times its amount
(and as many rate tokens) under one lease id, and this replica hands the following calls out of
it with no round trip; each call is still ended in the store, once (commit with its ledger entry,
or release), and the lease gives up that call's amount there.

Exact, as the per-call holds are: the store holds the whole lease until each of its calls is
ended, so a budget is never exceeded, and what a lease holds unused goes back as soon as it stops
serving: when a call does not fit it (before the store is asked for that call alone), when the
agent's or group's policy changed, and `lease_s` after it was taken. Until then another replica
sees that room as reserved (usage reports it so): a call there may be refused for up to `lease_s`
that would fit once the lease is given back. A lease the store refuses (the room left is smaller
than a lease, or the rate bucket has fewer tokens) is not asked again for `lease_s`: near a limit
calls go one by one, as without leases.

Crashes: a lease is a hold like any other, so a replica that dies leaves it to expire (`hold_s`);
a call it settled is ended by recovery from the intent (the call's hold names its lease), which
the store counts once whoever ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from budgets.models import Hold, Policy, Refusal
from budgets.store import BudgetStoreUnavailableError, Check, LeaseStore

log = logging.getLogger("budgets.leases")

_MAX_REFUSED = 100_000  # remembered refusals (a bound, not a tuning knob)


@dataclass(slots=True, eq=False)
class Lease:
    id: str
    key: tuple[str, str, str]  # agent, network, asset
    policy: Policy  # what it was taken under: a call under another policy does not use it
    group: Policy | None
    checks: list[Check]
    size: int  # what the store holds for it, less the room given back
    calls_left: int | None  # rate tokens it holds (None: no rate limit applies)
    taken_at: float
    handed: int = 0  # amount handed out to calls
    open: int = 0  # calls handed out and not ended yet
    serving: bool = True
    ended: set[str] = field(default_factory=set)  # calls ended (a call may be ended twice: once counts)


ChecksFor = Callable[[str, Policy, Policy | None, str, str, float], list[Check]]


class Leases:
    def __init__(self, store: LeaseStore, checks: ChecksFor, *, calls: int, lease_s: float, hold_s: float,
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.checks = checks
        self.calls = calls
        self.lease_s = lease_s
        self.hold_s = hold_s
        self.clock = clock
        self._serving: dict[tuple[str, str, str], Lease] = {}
        self._by_id: dict[str, Lease] = {}  # every lease this replica still has in the store
        self._taking: dict[tuple[str, str, str], asyncio.Future[bool]] = {}  # renewals: did it go through
        self._refused: dict[tuple[str, str, str], float] = {}  # no lease asked for until then
        self._tasks: set[asyncio.Future] = set()  # takes, give-backs and retires on their way
        self._closed = False

    async def hand_out(self, agent: str, network: str, asset: str, amount: int, policy: Policy,
                       group: Policy | None, now: float) -> Lease | None:
        """The lease this call is handed out of, or None: then it is reserved on its own."""
        if self._closed:
            return None
        key = (agent.lower(), network, asset.lower())
        renewals = 0
        while True:  # ends: each turn hands out, gives up, waits for a renewal, or renews (twice at most)
            lease = self._serving.get(key)
            if lease is not None and (lease.policy is policy or lease.policy == policy) \
                    and (lease.group is group or lease.group == group) and now < lease.taken_at + self.lease_s \
                    and lease.size - lease.handed >= amount and lease.calls_left != 0:
                lease.handed += amount
                lease.open += 1
                if lease.calls_left is not None:
                    lease.calls_left -= 1
                return lease
            if lease is None and self._refused.get(key, 0.0) > now:
                return None
            pending = self._taking.get(key)
            if pending is not None:  # another call of this agent is renewing it: wait, then look again
                if not await asyncio.shield(pending):  # it failed (the store is away): no renewal after it
                    return None
                continue
            if renewals == 2:
                return None
            renewals += 1
            async with self._alone(key):
                if lease is not None:
                    await self._stop(lease)  # its unused room goes back before the store is asked again
                if self._refused.get(key, 0.0) > now or \
                        not await self._take(key, agent, network, asset, amount, policy, group, now):
                    return None

    @contextlib.asynccontextmanager
    async def _alone(self, key: tuple[str, str, str]) -> AsyncIterator[None]:
        """One renewal (stop, give back, take) of an agent's lease at a time; its other calls wait
        for it, and learn whether it failed (then they do not renew one after another)."""
        while (pending := self._taking.get(key)) is not None:
            await asyncio.shield(pending)
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._taking[key] = done
        ok = False
        try:
            yield
            ok = True
        finally:
            del self._taking[key]
            done.set_result(ok)

    async def _take(self, key: tuple[str, str, str], agent: str, network: str, asset: str, amount: int,
                    policy: Policy, group: Policy | None, now: float) -> bool:
        checks = self.checks(agent, policy, group, network, asset, now)
        lease_id = "lease:" + uuid.uuid4().hex
        rated = any(c.rate is not None for c in checks)
        taking = self._track(asyncio.ensure_future(self.store.reserve_lease(
            checks, amount * self.calls, lease_id, now=now, hold_s=self.hold_s, calls=self.calls)))
        try:
            refusal = await asyncio.shield(taking)
        except asyncio.CancelledError:  # the caller went away: a lease granted anyway goes back whole

            def give_back(t: asyncio.Future[Refusal | None]) -> None:
                if not t.cancelled() and t.exception() is None and t.result() is None:
                    self._background(self._retire_quietly(checks, lease_id, self.calls if rated else 0))

            taking.add_done_callback(give_back)
            raise
        if refusal is not None:
            if len(self._refused) >= _MAX_REFUSED:
                self._refused.clear()
            self._refused[key] = now + self.lease_s
            return False
        lease = Lease(lease_id, key, policy, group, checks, amount * self.calls, self.calls if rated else None, now)
        self._serving[key] = self._by_id[lease_id] = lease
        asyncio.get_running_loop().call_later(self.lease_s, self._lapse, lease)
        return True

    def _lapse(self, lease: Lease) -> None:
        if lease.serving:
            self._background(self._stop_alone(lease))

    async def _stop_alone(self, lease: Lease) -> None:
        async with self._alone(lease.key):
            await self._stop(lease)

    async def _stop(self, lease: Lease) -> None:
        """No more calls out of it; what it holds unused goes back now (all of it once no call is open)."""
        if not lease.serving:
            return
        lease.serving = False
        if self._serving.get(lease.key) is lease:
            del self._serving[lease.key]
        if lease.open == 0:
            await self._retire(lease)
            return
        rest = lease.size - lease.handed
        if rest > 0:
            lease.size -= rest
            try:
                await self.store.end_leased(lease.checks, lease.id, lease.id + ":rest", rest, 0, None,
                                            now=self.clock())
            except BudgetStoreUnavailableError:  # given back with the rest when the lease retires
                log.warning("budget_lease_not_shrunk", extra={"lease": lease.id, "agent": lease.key[0]})

    async def _retire(self, lease: Lease) -> None:
        self._by_id.pop(lease.id, None)
        # shielded: a caller that goes away meanwhile does not leave the lease held until hold_s
        await asyncio.shield(self._track(asyncio.ensure_future(
            self._retire_quietly(lease.checks, lease.id, lease.calls_left or 0))))

    async def _retire_quietly(self, checks: list[Check], lease_id: str, unused_calls: int) -> None:
        try:
            await self.store.retire_lease(checks, lease_id, now=self.clock(), unused_calls=unused_calls)
        except BudgetStoreUnavailableError:  # it expires by itself (hold_s)
            log.warning("budget_lease_not_retired", extra={"lease": lease_id})

    def ended(self, hold: Hold) -> None:
        """A call handed out of one of this replica's leases was ended in the store."""
        lease = self._by_id.get(hold.lease)
        if lease is None or hold.id in lease.ended:
            return
        lease.ended.add(hold.id)
        lease.open -= 1
        if lease.open == 0 and not lease.serving:
            self._background(self._retire(lease))

    def _background(self, work) -> None:
        self._track(asyncio.ensure_future(work))

    def _track(self, fut: asyncio.Future) -> asyncio.Future:
        self._tasks.add(fut)
        fut.add_done_callback(self._tasks.discard)
        return fut

    async def close(self) -> None:
        """Stop every lease; give back what they hold (a lease with a call still open keeps that
        call's amount: the call, or recovery, ends it)."""
        self._closed = True  # no lease is taken from now on
        while self._taking:  # renewals on their way land (or fail) first
            await asyncio.gather(*(asyncio.shield(f) for f in list(self._taking.values())), return_exceptions=True)
        for lease in list(self._serving.values()):
            await self._stop_alone(lease)
        while self._tasks:  # a give-back may schedule a retire: until nothing is left on its way
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
