"""One worker's state as the gateway sees it, and the choice of a worker for a call.

Least outstanding requests with power of two choices (Mitzenmacher; Envoy's LEAST_REQUEST):
two eligible workers drawn at random, the less loaded one wins. Load is the gateway's own count
of calls in flight on the worker plus the worker's own queue gauge where it reports one (vLLM),
which also counts calls other gateway replicas sent it. Round-robin is kept for comparison.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Worker:
    url: str
    models: frozenset[str] = frozenset()  # ready models, from the last probe
    ready: bool = False
    reachable: bool = False
    waiting: float = 0.0  # the worker's own queue gauge
    in_flight: int = 0
    failures: int = 0  # in a row
    ejections: int = 0  # in a row: the back-off doubles with each
    ejected_until: float = 0.0
    draining: bool = False  # left DNS: finishes its calls, gets no new ones
    down_at: float = 0.0  # when a call last found it unreachable (a probe begun before says nothing newer)
    calls: int = 0
    started: float = field(default_factory=time.monotonic)

    def eligible(self, model: str | None, now: float) -> bool:
        return (self.ready and not self.draining and self.ejected_until <= now
                and (model is None or model in self.models))

    @property
    def load(self) -> float:
        return self.in_flight + self.waiting


class Chooser:
    def __init__(self, policy: str, max_concurrency: int, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.max_concurrency = max_concurrency
        self.rng = rng or random.Random()
        self._rr = 0

    def choose(self, workers: list[Worker], model: str | None, now: float,
               exclude: frozenset[str] = frozenset()) -> Worker | None:
        """A worker with a free slot for `model`, or None when every eligible one is full."""
        free = [w for w in workers if w.url not in exclude and w.eligible(model, now)
                and w.in_flight < self.max_concurrency]
        if not free:
            return None
        if self.policy == "round_robin":
            self._rr += 1
            return free[self._rr % len(free)]
        if len(free) == 1:
            return free[0]
        a, b = self.rng.sample(free, 2)
        return a if a.load <= b.load else b
