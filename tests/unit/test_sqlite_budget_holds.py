"""SQLite budgets keep a scope's outstanding holds as a running total; a file written before the
totals existed gets them on first use, exactly."""

from __future__ import annotations

import time
from pathlib import Path
from zoneinfo import ZoneInfo

from budgets.models import Limit, Scope, resolve_windows
from budgets.sqlite_store import SQLiteBudgetStore
from budgets.store import Check


def _check(now: float) -> Check:
    windows = tuple(resolve_windows([Limit(period="day", amount=10**30)], now, ZoneInfo("UTC")))
    return Check(Scope("agent", "0xc1", "eip155:8453", "0x" + "22" * 20, "a:0xc1"), windows)


async def test_holds_from_a_file_without_running_totals_are_counted(tmp_path: Path) -> None:
    now = time.time()
    store = SQLiteBudgetStore(str(tmp_path / "b.db"))
    check = _check(now)
    for i, amount in enumerate([7 * 10**18, 5, 11]):
        assert await store.reserve([check], amount, f"r{i}", now=now, hold_s=60 + i) is None
    store._db.execute("DELETE FROM held")  # as a file from before the running totals has it
    await store.release([check], "r1", now=now)  # dropped before the total exists
    (usage,) = await store.usage(check, now=now)
    assert usage.reserved == 7 * 10**18 + 11
    assert await store.reserve([check], 2, "r3", now=now + 60.5, hold_s=60) is None  # r0 expired, swept
    (usage,) = await store.usage(check, now=now + 60.5)
    assert usage.reserved == 11 + 2
    await store.close()
