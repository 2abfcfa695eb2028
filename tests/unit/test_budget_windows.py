"""The enforcer's window cache (budgets/windows.py) gives, at every moment, the windows a fresh
resolution gives (but a TTL at most one bucket longer), across DST changes and clocks that go
back; and the rate mirror (budgets/rate_mirror.py) never refuses longer than the store would."""

from __future__ import annotations

import datetime as dt
import random
from zoneinfo import ZoneInfo

import pytest

from budgets.models import Limit, RateLimit, Scope, commit_windows, resolve_windows
from budgets.rate_mirror import RateMirror
from budgets.windows import WindowCache

LIMITS = [Limit(period="day", amount=100), Limit(period="hour", amount=7, rolling=True),
          Limit(period="month", amount=10**21), Limit(period="week", amount=5, rolling=True)]


def same(a, b) -> None:  # type: ignore[no-untyped-def]
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.period, x.rolling, x.limit, x.key, x.bucket, x.bucket_s, x.resets_at) == \
               (y.period, y.rolling, y.limit, y.key, y.bucket, y.bucket_s, y.resets_at)
        assert y.ttl_s <= x.ttl_s <= y.ttl_s + max(60, y.bucket_s)


@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"])
def test_cached_windows_match_a_fresh_resolution(tz: str) -> None:
    zone = ZoneInfo(tz)
    cache = WindowCache(zone)
    rng = random.Random(tz)
    # every ~10 minutes for three days around a DST change, then random jumps forward and back
    t = dt.datetime(2026, 3, 7, 12, tzinfo=ZoneInfo("America/New_York")).timestamp()
    moments = [t + i * 631.7 for i in range(400)]
    moments += [t + rng.uniform(-86400 * 40, 86400 * 300) for _ in range(300)]
    for now in moments:
        same(cache.every(now), commit_windows([], now, zone))
        same(cache.limited(LIMITS, now), resolve_windows(LIMITS, now, zone))
        same(cache.limited([], now), [])


def test_the_mirror_sheds_after_the_reserves_it_saw_and_lets_calls_through_otherwise() -> None:
    mirror, rate = RateMirror(), RateLimit(per_minute=2)
    scope = Scope("agent", "0xa", "eip155:1", "0x" + "11" * 20, "a:0xa")
    assert mirror.wait(scope, rate, 100.0) == 0  # never seen: the reserve decides
    mirror.took(scope, rate, 100.0)
    assert mirror.wait(scope, rate, 100.0) == 0
    mirror.took(scope, rate, 100.0)
    assert mirror.wait(scope, rate, 100.0) == pytest.approx(30)
    assert mirror.wait(scope, rate, 130.0) == 0
    # the store refused (another replica emptied the bucket): wait at most what the store said
    mirror.refused(scope, rate, 200.0, 30)
    assert 0 < mirror.wait(scope, rate, 200.0) <= 30
    assert mirror.wait(scope, rate, 230.0) == 0
    # a token the store granted is taken even when the mirror thought there was none
    mirror.took(scope, rate, 200.0)
    assert mirror.wait(scope, rate, 200.0) > 0
