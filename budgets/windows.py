"""The windows of one moment, computed once and reused until the first of them moves on.

Resolving windows in the operator's time zone (zoneinfo, DST) costs more than the rest of the
enforcer's Python side of a call; the answer only changes when a window does: at the next rolling
bucket (a minute, for the rolling hour) or calendar boundary. So the eight windows (four calendar
periods, four rolling) are resolved once for [computed at, first reset) and every call in between
takes them from here: a commit all eight, a reserve those its policy limits.
"""

from __future__ import annotations

import math
from dataclasses import replace
from zoneinfo import ZoneInfo

from budgets.models import Limit, Window, commit_windows

_MAX_SHAPES = 10_000  # distinct limit lists kept (policies are few; a bound, not a tuning knob)


class WindowCache:
    def __init__(self, tz: ZoneInfo) -> None:
        self.tz = tz
        self._from = math.inf
        self._until = -math.inf
        self._every: tuple[Window, ...] = ()
        self._by: dict[tuple[str, bool], Window] = {}
        self._limited: dict[tuple[tuple[str, bool, int], ...], tuple[Window, ...]] = {}

    def every(self, now: float) -> tuple[Window, ...]:
        """Every period's window at `now` (limits 0): what a commit counts in. A window's
        `ttl_s` is counted from the moment it was resolved, so it is at most a bucket longer."""
        if not self._from <= now < self._until:  # also when a test's clock goes back
            every = tuple(commit_windows([], now, self.tz))
            self._every = every
            self._by = {(w.period, w.rolling): w for w in every}
            self._from, self._until = now, min(w.resets_at for w in every)
            self._limited.clear()
        return self._every

    def limited(self, limits: list[Limit], now: float) -> tuple[Window, ...]:
        """The windows `limits` name, in their order, with their amounts: what a reserve checks."""
        self.every(now)
        shape = tuple((lim.period, lim.rolling, lim.amount) for lim in limits)
        hit = self._limited.get(shape)
        if hit is None:
            hit = tuple(replace(self._by[(period, rolling)], limit=amount) for period, rolling, amount in shape)
            if len(self._limited) >= _MAX_SHAPES:
                self._limited.clear()
            self._limited[shape] = hit
        return hit
