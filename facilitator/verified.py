"""Payments verified in this process, kept for their settlement (in-process callers only).

The gateway verifies a payment and, once the call is served, settles the very same payload and
requirement objects. Preparing the payment again (payload validation, digest, signature
recovery, checksums) would redo work whose inputs cannot have changed: the same objects, held
here so that their ids cannot be reused by other objects. Only what can change is checked again
at settle: the validity window against the clock (`check_time`) and the chain state
(`confirm()`, in the settler).

Over HTTP every request is parsed into new objects, so nothing ever matches: a remote caller
always gets a fresh prepare.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from facilitator.schemes.base import PreparedPayment

MAX_KEPT = 4096
# How long a verified payment waits for its settlement (a paid call's upstream time). Past it the
# settlement simply prepares again; nothing depends on an entry being there.
KEEP_S = 600.0


@dataclass(eq=False, slots=True)
class _Kept:
    payload: object
    requirements: object
    prepared: PreparedPayment
    network: str  # CAIP-2
    until: float


class VerifiedPayments:
    def __init__(self, *, max_kept: int = MAX_KEPT, keep_s: float = KEEP_S) -> None:
        self._kept: OrderedDict[tuple[int, int], _Kept] = OrderedDict()
        self._max = max_kept
        self._keep_s = keep_s

    def keep(self, payload: object, requirements: object, prepared: PreparedPayment, network: str) -> None:
        key = (id(payload), id(requirements))
        self._kept[key] = _Kept(payload, requirements, prepared, network, time.monotonic() + self._keep_s)
        self._kept.move_to_end(key)
        while len(self._kept) > self._max:
            self._kept.popitem(last=False)

    def take(self, payload: object, requirements: object) -> tuple[PreparedPayment, str] | None:
        """The payment verified for these very objects, once (a second settle prepares again)."""
        kept = self._kept.pop((id(payload), id(requirements)), None)
        if kept is None or kept.payload is not payload or kept.requirements is not requirements:
            return None
        if time.monotonic() > kept.until:
            return None
        return kept.prepared, kept.network

    def __len__(self) -> int:
        return len(self._kept)
