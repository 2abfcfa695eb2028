"""Budget enforcement for the gateway: which budgets apply to a payer, the cheap pre-check, and
reserve / commit / release around each paid call.

A paid call costs the store two round trips: reserve (which takes the rate limit's token too) and
commit. The pre-check reads nothing from the store on the hot path: policies are cached (1 s) and
the rate limit is peeked at in a local copy of each bucket that this enforcer's own reserves keep
(see RateMirror); the reserve stays the exact check.

Fails closed: if the store cannot be reached, the call is refused with 503 and nothing is
forwarded or charged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast
from zoneinfo import ZoneInfo

from budgets.leases import Leases
from budgets.models import DefaultPolicy, Hold, LedgerEntry, Policy, Refusal, Scope, hold_id_for
from budgets.rate_mirror import RateMirror
from budgets.store import BudgetStore, BudgetStoreUnavailableError, Check, LeaseStore
from budgets.windows import WindowCache

log = logging.getLogger("budgets.enforcer")
POLICY_CACHE_S = 1.0  # how stale a policy may be on the hot path (suspension takes effect within 1 s)
PIN_MARGIN_S = 60.0  # a hold left unpinned outlives its caller's promise by at least this


def _unavailable(exc: Exception) -> Refusal:
    return Refusal("budget_store_unavailable", f"budgets cannot be checked ({type(exc).__name__}); nothing was charged",
                   status=503, retry_after_s=5)


class BudgetEnforcer:
    def __init__(
        self,
        store: BudgetStore,
        *,
        defaults: dict[tuple[str, str], DefaultPolicy] | None = None,
        timezone: str = "UTC",
        hold_s: float = 600.0,
        lease_calls: int = 0,
        lease_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.defaults = {(n, a.lower()): d for (n, a), d in (defaults or {}).items()}
        self.tz = ZoneInfo(timezone)
        self.hold_s = hold_s
        self.clock = clock
        self._cache: dict[tuple[str, str, str, str], tuple[float, Policy | None]] = {}
        self._resolved: dict[tuple[str, str, str], tuple[float, tuple[Policy, Policy | None, bool]]] = {}
        self._scopes: dict[tuple[str, str | None, str, str], tuple[Scope, Scope | None]] = {}
        self.windows = WindowCache(self.tz)
        self.rates = RateMirror()
        self._pending: set[asyncio.Task] = set()  # commits waiting for the store to come back
        self._deferred: dict[str, int] = {}  # agents with such a commit: refused until it lands
        self.leases: Leases | None = None
        if lease_calls > 0:
            if not isinstance(store, LeaseStore):
                raise ValueError(f"budget leases need a store that can lease (Redis), not {type(store).__name__}")
            self.leases = Leases(store, self._lease_checks, calls=lease_calls, lease_s=lease_s, hold_s=hold_s,
                                 clock=clock)

    def _lease_checks(self, agent: str, policy: Policy, group: Policy | None, network: str, asset: str,
                      now: float) -> list[Check]:
        return self.checks(agent, policy, group, network, asset, now, with_rate=True)

    async def close(self) -> None:
        """Give back what leases hold unused (a replica shutting down)."""
        if self.leases is not None:
            await self.leases.close()

    async def _policy(self, kind: str, id: str, network: str, asset: str) -> Policy | None:
        return (await self._policy_until(kind, id, network, asset))[1]

    async def _policy_until(self, kind: str, id: str, network: str, asset: str) -> tuple[float, Policy | None]:
        """(until when it may be used, the policy)."""
        key = (kind, id.lower() if kind == "agent" else id, network, asset.lower())
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit
        policy = await self.store.get_policy(kind, id, network, asset)
        if len(self._cache) > 100_000:
            self._cache.clear()
        entry = self._cache[key] = (now + POLICY_CACHE_S, policy)
        return entry

    def invalidate(self) -> None:
        self._cache.clear()
        self._resolved.clear()

    async def put_policy(self, kind: str, owner: str, policy: Policy) -> None:
        """Store a policy (the operator's way: admin API, config). An agent that joins or leaves a
        group keeps its spend and holds: on Redis its keys carry the group's hash tag, so they are
        carried to the new tag."""
        old = await self.store.get_policy(kind, owner, policy.network, policy.asset) if kind == "agent" else None
        await self.store.put_policy(kind, owner, policy)
        old_group = old.group if old is not None else None  # unlisted agents have no group
        if kind == "agent" and old_group != policy.group:
            before = old or Policy(network=policy.network, asset=policy.asset)
            old_scope, _ = self.scopes(owner, before, policy.network, policy.asset)
            new_scope, _ = self.scopes(owner, policy, policy.network, policy.asset)
            await self.store.move_spend(old_scope, new_scope, self.windows.every(self.clock()))
        self.invalidate()

    async def policies_for(self, agent: str, network: str, asset: str) -> tuple[Policy, Policy | None, bool]:
        """(agent policy, group policy, listed). Unlisted agents get the default, or are refused.
        A paid call asks three times (pre-check, reserve, commit): the answer is kept as long as
        both policies it was made of may be."""
        key = (agent, network, asset)
        now = time.monotonic()
        hit = self._resolved.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        until, policy = await self._policy_until("agent", agent, network, asset)
        listed = policy is not None
        if policy is None:
            default = self.defaults.get((network, asset.lower()))
            if default is None or default.mode == "deny" or default.policy is None:
                raise Refusal("agent_not_allowed", "this wallet has no budget with this gateway", status=402)
            policy = default.policy
        group = None
        if policy.group:
            group_until, group = await self._policy_until("group", policy.group, network, asset)
            until = min(until, group_until)
        if len(self._resolved) > 100_000:
            self._resolved.clear()
        answer = policy, group, listed
        self._resolved[key] = (until, answer)
        return answer

    def scopes(self, agent: str, policy: Policy, network: str, asset: str) -> tuple[Scope, Scope | None]:
        key = (agent, policy.group, network, asset)
        hit = self._scopes.get(key)
        if hit is None:
            tag = f"g:{policy.group}" if policy.group else f"a:{agent.lower()}"
            agent_scope = Scope("agent", agent.lower(), network, asset.lower(), tag)
            group_scope = Scope("group", policy.group, network, asset.lower(), tag) if policy.group else None
            if len(self._scopes) > 100_000:
                self._scopes.clear()
            hit = self._scopes[key] = (agent_scope, group_scope)
        return hit

    def checks(self, agent: str, policy: Policy, group: Policy | None, network: str, asset: str, now: float,
               *, with_rate: bool, for_commit: bool = False) -> list[Check]:
        """`for_commit`: every window, so limits added later see this spend."""
        agent_scope, group_scope = self.scopes(agent, policy, network, asset)
        if for_commit:
            every = self.windows.every(now)
            out = [Check(agent_scope, every)]
            if group_scope is not None and group is not None:
                out.append(Check(group_scope, every))
            return out
        out = [Check(agent_scope, self.windows.limited(policy.limits, now), policy.rate_limit if with_rate else None)]
        if group_scope is not None and group is not None:
            out.append(Check(group_scope, self.windows.limited(group.limits, now),
                             group.rate_limit if with_rate else None))
        return out

    @staticmethod
    def _allowed(policy: Policy, route: str, model: str | None, who: str) -> None:
        if policy.suspended:
            raise Refusal("agent_suspended", f"{who} is suspended by the operator", status=402)
        if policy.allowed_routes is not None and route not in policy.allowed_routes:
            raise Refusal("route_not_allowed", f"{route} is not allowed for this {who}", status=402)
        if policy.allowed_models is not None and (model is None or model not in policy.allowed_models):
            raise Refusal("model_not_allowed", f"model {model!r} is not allowed for this {who}", status=402)

    # -- the hook the gateway calls ---------------------------------------------------------------

    async def precheck(self, payer: str, network: str, asset: str, route: str, model: str | None) -> None:
        """Before any signature work, on the *claimed* payer: suspended, not allowed, over its rate
        limit. Nothing is consumed here (the claim is not verified yet)."""
        if not payer:
            return
        try:
            policy, group, _ = await self.policies_for(payer, network, asset)
            self._allowed(policy, route, model, "agent")
            if group is not None:
                self._allowed(group, route, model, "group")
            now = self.clock()
            for p, scope in zip((policy, group), self.scopes(payer, policy, network, asset), strict=True):
                if p is not None and p.rate_limit is not None and scope is not None:
                    wait = self.rates.wait(scope, p.rate_limit, now)
                    if wait > 0:
                        wait_s = max(1, int(wait + 0.999))
                        raise Refusal("rate_limited", "rate limit reached", status=429, scope=scope.name,
                                      retry_after_s=wait_s, resets_at=now + wait_s)
        except BudgetStoreUnavailableError as exc:
            raise _unavailable(exc) from exc

    async def reserve(self, payer: str, network: str, asset: str, amount: int, route: str, model: str | None,
                      request_id: str) -> Hold:
        if payer.lower() in self._deferred:
            # Its last spend is not counted yet (the store was down): no new spend until it is.
            raise Refusal("budget_store_unavailable", "budgets are catching up after a store outage; retry shortly",
                          status=503, retry_after_s=1)
        hold_id = hold_id_for(request_id)
        try:
            policy, group, _ = await self.policies_for(payer, network, asset)
            self._allowed(policy, route, model, "agent")
            if group is not None:
                self._allowed(group, route, model, "group")
            for p, who in ((policy, "agent"), (group, "group")):
                if p is not None and p.per_call_max is not None and amount > p.per_call_max:
                    raise Refusal("per_call_limit", f"the call costs more than the {who}'s per-call maximum",
                                  status=402, remaining=p.per_call_max)
            now = self.clock()
            if self.leases is not None and amount > 0:
                lease = await self.leases.hand_out(payer, network, asset, amount, policy, group, now)
                if lease is not None:
                    for c in lease.checks:
                        if c.rate is not None:
                            self.rates.took(c.scope, c.rate, now)
                    return Hold(id=hold_id, agent=payer, network=network, asset=asset.lower(), amount=amount,
                                route=route, model=model, group=policy.group, reserved_at=lease.taken_at,
                                lease=lease.id)
            checks = self.checks(payer, policy, group, network, asset, now, with_rate=True)
            refusal = await self.store.reserve(checks, amount, hold_id, now=now, hold_s=self.hold_s)
        except BudgetStoreUnavailableError as exc:
            raise _unavailable(exc) from exc
        if refusal is not None:
            if refusal.reason == "rate_limited" and refusal.retry_after_s is not None:
                for c in checks:
                    if c.rate is not None and c.scope.name == refusal.scope:
                        self.rates.refused(c.scope, c.rate, now, refusal.retry_after_s)
            raise refusal
        for c in checks:
            if c.rate is not None:
                self.rates.took(c.scope, c.rate, now)
        return Hold(id=hold_id, agent=payer, network=network, asset=asset.lower(), amount=amount, route=route,
                    model=model, group=policy.group, reserved_at=now)

    async def pin(self, hold: Hold, *, within_s: float | None = None) -> None:
        """Settlement is about to be asked for: the hold must not expire on its own before it is
        committed or released. With `within_s` (the caller ends the hold within that long, or
        hands it to someone who pins it), a hold that outlives it by a margin is left as it is: no
        round trip. Otherwise it is pinned (never expires on its own); a hold that expired
        meanwhile (a slow upstream) is reserved again first, against the limits as they are now.
        Raises Refusal when it does not fit any more (budget_exceeded) or the store cannot be
        reached (503): then nothing is settled."""
        if within_s is not None and hold.reserved_at and \
                self.clock() + within_s + PIN_MARGIN_S < hold.reserved_at + self.hold_s:
            return
        try:
            policy, group = await self._commit_policies(hold)
            now = self.clock()
            checks = self.checks(hold.agent, policy, group, hold.network, hold.asset, now, with_rate=False)
            if await self.store.pin(checks, hold.id, hold.amount, now=now):
                return
            refusal = await self.store.reserve(checks, hold.amount, hold.id, now=now, hold_s=self.hold_s)
            if refusal is None and await self.store.pin(checks, hold.id, hold.amount, now=now):
                return
        except BudgetStoreUnavailableError as exc:
            raise _unavailable(exc) from exc
        raise refusal or Refusal("budget_exceeded", "the budget was given to other calls meanwhile", status=402)

    async def _commit_policies(self, hold: Hold) -> tuple[Policy, Policy | None]:
        try:
            policy, group, _listed = await self.policies_for(hold.agent, hold.network, hold.asset)
        except Refusal:  # the agent lost its policy since the reserve: still count the spend
            policy = Policy(network=hold.network, asset=hold.asset, group=hold.group)
            group = (await self._policy("group", hold.group, hold.network, hold.asset)) if hold.group else None
        return policy, group

    async def commit(self, hold: Hold, amount: int, tx_hash: str, request_id: str,
                     details: dict | None = None, *, once: str | None = None) -> bool:
        """The money moved: count it, even if the hold expired meanwhile. If the store is down,
        keep retrying in the background (commit is idempotent per hold), so the spend is counted
        once the store is back; the ledger must reconcile with the chain. True when it is
        counted now (or was before), False when it was deferred. `once`: what it is counted once
        for (default the hold; the gateway passes the settlement's transaction, so two requests
        that both settled one payment, a resend that took over a stalled claim and recovery of
        the first, count it once)."""
        now = self.clock()
        entry = LedgerEntry(ts=now, agent=hold.agent, group=hold.group, route=hold.route, model=hold.model,
                            amount=amount, asset=hold.asset, network=hold.network, tx_hash=tx_hash,
                            request_id=request_id, extra=details or {})
        if not await self._commit_once(hold, amount, entry, now, once):
            log.error("budget_commit_deferred", extra={"agent": hold.agent, "amount": str(amount), "tx": tx_hash,
                                                        "request_id": request_id})
            agent = hold.agent.lower()
            self._deferred[agent] = self._deferred.get(agent, 0) + 1
            task = asyncio.ensure_future(self._commit_later(hold, amount, entry, now, once))
            self._pending.add(task)

            def done(t: asyncio.Task) -> None:
                self._pending.discard(t)
                self._deferred[agent] -= 1
                if not self._deferred[agent]:
                    del self._deferred[agent]

            task.add_done_callback(done)
            return False
        return True

    async def _commit_later(self, hold: Hold, amount: int, entry: LedgerEntry, now: float, once: str | None) -> None:
        delay = 0.2
        for _ in range(10_000):  # about three hours at the capped delay
            await asyncio.sleep(delay)
            if await self._commit_once(hold, amount, entry, now, once):
                log.warning("budget_commit_recovered", extra={"agent": hold.agent, "request_id": entry.request_id})
                return
            delay = min(delay * 2, 1.0)
        log.error("budget_commit_lost", extra={"agent": hold.agent, "amount": str(amount), "tx": entry.tx_hash,
                                                "request_id": entry.request_id})

    async def _commit_once(self, hold: Hold, amount: int, entry: LedgerEntry, now: float, once: str | None) -> bool:
        for _attempt in range(2):
            try:
                policy, group = await self._commit_policies(hold)
                checks = self.checks(hold.agent, policy, group, hold.network, hold.asset, now, with_rate=False,
                                     for_commit=True)
                if hold.lease:
                    await self._end_leased(checks, hold, amount, entry, now, once or hold.id)
                else:
                    await self.store.commit(checks, hold.id, amount, entry, now=now, once=once)
                return True
            except BudgetStoreUnavailableError:
                continue
        return False

    async def _end_leased(self, checks: list[Check], hold: Hold, amount: int, entry: LedgerEntry | None, now: float,
                          once: str | None) -> None:
        """End a call handed out of a lease (some replica's: they share the store). Once it is
        ended in the store, this replica's lease (if it is one) counts it ended, even if the caller
        was cancelled meanwhile: else the lease would never be retired."""
        leases = self.leases
        await cast(LeaseStore, self.store).end_leased(
            checks, hold.lease, hold.id, hold.amount, amount, entry, now=now, once=once,
            ended=None if leases is None else (lambda: leases.ended(hold)))

    async def release(self, hold: Hold) -> bool:
        """False when the store cannot be reached: an unpinned hold expires by itself, a pinned
        one must be released again (the caller retries)."""
        try:
            policy, group = await self._commit_policies(hold)
            now = self.clock()
            if hold.lease:  # batched with commits (budgets/redis_store.py): with the windows they count in
                checks = self.checks(hold.agent, policy, group, hold.network, hold.asset, now, with_rate=False,
                                     for_commit=True)
                await self._end_leased(checks, hold, 0, None, now, None)
            else:
                checks = self.checks(hold.agent, policy, group, hold.network, hold.asset, now, with_rate=False)
                await self.store.release(checks, hold.id, now=now)
            return True
        except BudgetStoreUnavailableError:
            return False
