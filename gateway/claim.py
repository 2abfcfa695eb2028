"""One request's lease on a payment's record, kept alive while the request works on it.

The lease is short (`record_lease_s`, seconds) and renewed in the background every third of it,
so a replica killed mid-call loses its claim within seconds and a resend to another replica takes
over; a live replica keeps its claim however long the upstream or the chain takes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable

from gateway.records import PaymentRecords, RecordStoreUnavailableError

log = logging.getLogger("gateway.claim")


def new_owner() -> str:
    return uuid.uuid4().hex


def retry_after_s(lease_until_ms: int, now_ms: int) -> int:
    """When a resend can find the lease lapsed, should its holder have died (at least 1 s)."""
    return max(1, math.ceil((lease_until_ms - now_ms) / 1000))


class Claim:
    """Held from `begin`/`acquire` until `close()`. `close()` stops renewing; what happens to the
    record (saved, abandoned) is the caller's decision, taken before."""

    def __init__(self, records: PaymentRecords, key: str, owner: str, lease_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.records = records
        self.key = key
        self.owner = owner
        self.lease_ms = int(lease_s * 1000)
        self.clock = clock
        self.lost = False  # another request took the record over (this one stalled past its lease)
        self.settling = False  # settlement was asked for: never abandoned from here on
        self.kept = False  # the response's body carries on with the claim and closes it
        self._task: asyncio.Task[None] | None = None

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def start(self) -> Claim:
        self._task = asyncio.ensure_future(self._renew_forever())
        return self

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                held = await self.records.renew(self.key, self.owner, now_ms=self.now_ms(), lease_ms=self.lease_ms)
            except RecordStoreUnavailableError as exc:  # try again next time; the lease may lapse
                log.warning("payment_lease_not_renewed", extra={"key": self.key, "error": str(exc)})
                continue
            if not held:
                self.lost = True
                return

    async def abandon(self) -> None:
        """Nothing was charged: free the payment for another try (best effort: a lease that is
        not removed lapses by itself)."""
        await self.close()
        try:
            await self.records.abandon(self.key, self.owner)
        except RecordStoreUnavailableError as exc:
            log.warning("payment_record_not_abandoned", extra={"key": self.key, "error": str(exc)})

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
