"""A local copy of the rate buckets, for the pre-check.

The pre-check runs on the *claimed* payer before any signature work, to shed calls that would be
refused anyway; it must not cost a store round trip. So each enforcer mirrors the token buckets
its own reserves took from (the store takes the token inside reserve, atomically) and the
refusals it got, and the pre-check peeks at the mirror. The mirror only ever errs towards letting
a call through (it does not see other replicas' calls, and a refusal's wait is rounded down):
the reserve, in the store, is the exact check.
"""

from __future__ import annotations

from budgets.models import RateLimit, Scope

_MAX_SCOPES = 100_000


class RateMirror:
    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # scope name -> (tokens, at)

    @staticmethod
    def _shape(rate: RateLimit) -> tuple[float, float]:
        return float(rate.burst or rate.per_minute), rate.per_minute / 60.0

    def _tokens(self, scope: Scope, rate: RateLimit, now: float) -> float:
        cap, per_s = self._shape(rate)
        state = self._buckets.get(scope.name)
        if state is None:
            return cap
        return min(cap, state[0] + max(0.0, now - state[1]) * per_s)

    def wait(self, scope: Scope, rate: RateLimit, now: float) -> float:
        """Seconds until the mirrored bucket has a token (0: a call may go on to verification)."""
        tokens = self._tokens(scope, rate, now)
        return 0.0 if tokens >= 1 else (1 - tokens) / self._shape(rate)[1]

    def took(self, scope: Scope, rate: RateLimit, now: float) -> None:
        """A reserve took a token (the store had one, whatever the mirror thought)."""
        self._set(scope, max(1.0, self._tokens(scope, rate, now)) - 1, now)

    def refused(self, scope: Scope, rate: RateLimit, now: float, retry_after_s: int) -> None:
        """The store's bucket is empty: its next token comes in about `retry_after_s` (rounded up
        by the store; the mirror takes a second less, so it never refuses longer than the store)."""
        self._set(scope, 1 - max(0, retry_after_s - 1) * self._shape(rate)[1], now)

    def _set(self, scope: Scope, tokens: float, now: float) -> None:
        if len(self._buckets) >= _MAX_SCOPES and scope.name not in self._buckets:
            self._buckets.clear()
        self._buckets[scope.name] = (tokens, now)
