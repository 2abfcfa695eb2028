"""A pool of inference workers behind one upstream name (kind = "workers").

- Membership: static URLs and/or every A record of a headless Service, re-resolved on an
  interval; a worker that leaves DNS drains (finishes its calls, gets no new ones).
- Probing: each worker's ready models and its own queue gauge (probe.py), on an interval.
- Choice: least outstanding requests, power of two choices (balance.py), at most
  `max_concurrency` calls per worker; a call finding every worker full waits in the gateway,
  at most `max_queue` per model (the door refuses the rest, see `admit`).
- Backpressure before payment: `admit` answers 404 for a model no worker serves and 503 with
  Retry-After when none is ready or all are full and the model's queue is full; the paywall asks
  right after pricing, before anything is verified or reserved.
- Failures: only a connect error is retried on another worker (nothing can have run); 5xx,
  timeouts and connect errors count towards ejection (outlier detection with a doubling
  back-off); a connect error also marks the worker not ready until a probe finds it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from gateway.metrics import GatewayMetrics
from gateway.settings import Upstream, WorkerPoolSettings
from gateway.workers.balance import Chooser, Worker
from gateway.workers.members import resolve
from gateway.workers.probe import probe

log = logging.getLogger(__name__)
_KSERVE_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$")


class PoolRefusal(Exception):
    """Refused at the door, before any payment work: `status` 404 (model) or 503 (busy/none ready)."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class NoWorkerError(Exception):
    """No worker could take the call (none ready, all full past the queue timeout, or every
    one refused the connection)."""


class WorkerCallFailedError(Exception):
    """The worker accepted the call, then failed (timeout, reset): not retried."""


class TrackedResponse(aiohttp.ClientResponse):
    """A response that tells its pool when it is done (released or closed), so a worker's
    in-flight count covers a stream to its last byte. The gateway's client session makes these."""

    on_done: Callable[[], None] | None = None

    def _done(self) -> None:
        callback, self.on_done = self.on_done, None
        if callback is not None:
            callback()

    def release(self) -> Any:
        self._done()
        return super().release()

    def close(self) -> None:
        self._done()
        super().close()


class WorkerPool:
    def __init__(self, name: str, upstream: Upstream, metrics: GatewayMetrics | None = None) -> None:
        assert upstream.workers is not None
        self.name = name
        self.config = upstream
        self.settings: WorkerPoolSettings = upstream.workers
        self.metrics = metrics
        self.workers: dict[str, Worker] = {}
        self.known_models: set[str] = set(self.settings.models)  # ever served: 503 while down, not 404
        self.chooser = Chooser(self.settings.balance, self.settings.max_concurrency)
        self.waiting: dict[str, int] = {}
        self._freed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._timeout = aiohttp.ClientTimeout(total=None, connect=upstream.connect_timeout_s,
                                              sock_read=upstream.timeout_s)
        self._probe_headers: dict[str, str] = {}
        if upstream.auth_header and upstream.auth_value is not None:
            self._probe_headers[upstream.auth_header] = upstream.auth_value.get_secret_value()
        for url in upstream.urls:
            self.workers[url] = Worker(url)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, session: aiohttp.ClientSession) -> None:
        """First membership and probe round (so the pool can serve at once), then the loops."""
        await self.refresh_members(session)
        await self.probe_all(session)
        self._tasks = [asyncio.create_task(self._every(self.settings.probe_every_s, self.probe_all, session))]
        if self.settings.dns is not None:
            self._tasks.append(asyncio.create_task(
                self._every(self.settings.resolve_every_s, self.refresh_members, session)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _every(self, interval_s: float, step: Callable[[aiohttp.ClientSession], Any],
                     session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await step(session)
            except Exception:  # a bad round must not end the loop; the next one tries again
                log.exception("worker pool %s: %s failed", self.name, getattr(step, "__name__", step))

    async def refresh_members(self, session: aiohttp.ClientSession) -> None:
        urls = await resolve(self.config)
        if urls is None:
            return
        fresh = [u for u in urls if u not in self.workers]
        for url in fresh:
            self.workers[url] = Worker(url)
        for url, worker in list(self.workers.items()):
            worker.draining = url not in urls
            if worker.draining and worker.in_flight == 0:
                self._forget(worker)
        if fresh:
            await asyncio.gather(*(self._probe_one(session, self.workers[u]) for u in fresh))

    async def probe_all(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._probe_one(session, w) for w in list(self.workers.values())))

    async def _probe_one(self, session: aiohttp.ClientSession, worker: Worker) -> None:
        started = time.monotonic()
        result = await probe(session, worker.url, self.settings, self._probe_headers)
        if result.ready and worker.down_at >= started:
            return  # answered before a call found the worker gone: the next probe decides
        worker.reachable, worker.ready, worker.models, worker.waiting = (
            result.reachable, result.ready, result.models, result.waiting)
        self.known_models |= result.models
        if self.metrics is not None:
            self.metrics.worker_queue.labels(self.name, worker.url).set(worker.waiting)
            self.metrics.worker_ready.labels(self.name, worker.url).set(
                1 if worker.eligible(None, time.monotonic()) else 0)
        if worker.ready:
            self._wake()

    def _mark_down(self, worker: Worker) -> None:
        """Not ready until a probe (begun from now on) finds it again."""
        worker.ready = False
        worker.down_at = time.monotonic()
        if self.metrics is not None:
            self.metrics.worker_ready.labels(self.name, worker.url).set(0)

    def _forget(self, worker: Worker) -> None:
        self.workers.pop(worker.url, None)
        if self.metrics is not None:
            self.metrics.worker_ready.labels(self.name, worker.url).set(0)

    # -- the door -----------------------------------------------------------------------------

    def model_of(self, path: str, body: bytes) -> str | None:
        if self.settings.protocol == "kserve":
            m = _KSERVE_INFER.match(path)
            return m.group(1) if m else None
        try:
            doc = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return None
        model = doc.get("model") if isinstance(doc, dict) else None
        return model if isinstance(model, str) and model else None

    def admit(self, model: str | None) -> None:
        """Raise PoolRefusal when the call cannot be served soon; nothing is held."""
        now = time.monotonic()
        retry = self.settings.retry_after_s
        if model is not None and self.known_models and model not in self.known_models:
            self._refused(model, "unknown_model")
            raise PoolRefusal(404, f"no worker of this gateway serves model {model!r}")
        eligible = [w for w in self.workers.values() if w.eligible(model, now)]
        if not eligible:
            self._refused(model, "none_ready")
            raise PoolRefusal(503, "no worker is ready for this model; nothing was charged", retry)
        full = all(w.in_flight >= self.settings.max_concurrency for w in eligible)
        if full and self.waiting.get(model or "", 0) >= self.settings.max_queue:
            self._refused(model, "saturated")
            raise PoolRefusal(503, "every worker for this model is busy; nothing was charged", retry)

    def _refused(self, model: str | None, reason: str) -> None:
        if self.metrics is not None:
            label = model if model in self.known_models else "-"  # labels stay bounded
            self.metrics.backpressure.labels(self.name, label or "-", reason).inc()

    # -- a call -------------------------------------------------------------------------------

    async def open(self, session: aiohttp.ClientSession, method: str, path_qs: str, headers: dict[str, str],
                   body: bytes) -> aiohttp.ClientResponse:
        """The chosen worker's response (status and headers read, body not yet); the worker's
        slot is held until the response is released or closed."""
        model = self.model_of(path_qs.split("?", 1)[0], body)
        tried: set[str] = set()
        errors: list[str] = []
        while True:
            worker = await self._acquire(model, frozenset(tried))
            if worker is None:
                raise NoWorkerError("; ".join(errors) or "no worker is ready for this model")
            started = time.perf_counter()
            try:
                resp = await session.request(method, worker.url + path_qs, headers=headers, data=body or None,
                                             timeout=self._timeout, allow_redirects=False, auto_decompress=False)
            except aiohttp.ClientConnectorError as exc:
                # Not connected: nothing ran, so another worker may take it.
                self._mark_down(worker)
                self._finish(worker, model, started, failed=True)
                tried.add(worker.url)
                errors.append(f"{worker.url}: {type(exc).__name__}")
                continue
            except (TimeoutError, aiohttp.ClientError) as exc:
                # The request may have reached the worker (a reused connection dropped, a reset,
                # a timeout): never retried. A dropped connection also means "probably gone".
                if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
                    self._mark_down(worker)
                self._finish(worker, model, started, failed=True)
                raise WorkerCallFailedError(type(exc).__name__) from exc
            except BaseException:
                self._finish(worker, model, started, failed=False)
                raise
            self._outcome(worker, failed=resp.status >= 500)
            if isinstance(resp, TrackedResponse):
                resp.on_done = functools.partial(self._finish, worker, model, started, failed=None)
            else:  # an untracked session: the slot cannot follow the body
                self._finish(worker, model, started, failed=None)
            return resp

    async def _acquire(self, model: str | None, exclude: frozenset[str]) -> Worker | None:
        """A worker slot for `model`, waiting (in the model's queue) while every eligible worker
        is full; None when no worker is eligible or the wait ran out."""
        deadline = time.monotonic() + self.settings.queue_timeout_s
        key = model or ""
        queued = False
        try:
            while True:
                now = time.monotonic()
                worker = self.chooser.choose(list(self.workers.values()), model, now, exclude)
                if worker is not None:
                    self._take(worker)
                    return worker
                if not any(w.url not in exclude and w.eligible(model, now) for w in self.workers.values()):
                    return None
                if now >= deadline:
                    return None
                if not queued:
                    queued = True
                    self._queue(key, +1)
                freed = self._freed
                with contextlib.suppress(asyncio.TimeoutError):
                    # Wake on a freed slot, or recheck every second (ejections expire, probes land).
                    await asyncio.wait_for(freed.wait(), min(1.0, deadline - now))
        finally:
            if queued:
                self._queue(key, -1)

    def _queue(self, key: str, delta: int) -> None:
        self.waiting[key] = self.waiting.get(key, 0) + delta
        if self.metrics is not None and key in self.known_models:
            self.metrics.model_waiting.labels(self.name, key).set(self.waiting[key])

    def _take(self, worker: Worker) -> None:
        worker.in_flight += 1
        worker.calls += 1
        if self.metrics is not None:
            self.metrics.worker_in_flight.labels(self.name, worker.url).set(worker.in_flight)

    def _finish(self, worker: Worker, model: str | None, started: float, *, failed: bool | None) -> None:
        worker.in_flight -= 1
        if failed is not None:
            self._outcome(worker, failed)
        if self.metrics is not None:
            self.metrics.worker_in_flight.labels(self.name, worker.url).set(worker.in_flight)
            if failed is None and model in self.known_models:
                self.metrics.worker_seconds.labels(self.name, worker.url, model).observe(time.perf_counter() - started)
        if worker.draining and worker.in_flight == 0:
            self._forget(worker)
        self._wake()

    def _outcome(self, worker: Worker, failed: bool) -> None:
        """Outlier detection: `eject_after` failures in a row eject the worker for a back-off
        that doubles with each ejection in a row; a success resets both counts."""
        if not failed:
            worker.failures = worker.ejections = 0
            return
        worker.failures += 1
        if worker.failures < self.settings.eject_after:
            return
        worker.failures = 0
        worker.ejections += 1
        backoff = min(self.settings.eject_base_s * 2 ** (worker.ejections - 1), self.settings.eject_max_s)
        worker.ejected_until = time.monotonic() + backoff
        if self.metrics is not None:
            self.metrics.worker_ejections.labels(self.name, worker.url).inc()
            self.metrics.worker_ready.labels(self.name, worker.url).set(0)

    def _wake(self) -> None:
        freed, self._freed = self._freed, asyncio.Event()
        freed.set()

    async def healthy(self, session: aiohttp.ClientSession) -> bool:
        now = time.monotonic()
        return any(w.eligible(None, now) for w in self.workers.values())

    def snapshot(self) -> list[dict[str, Any]]:
        """Each worker's state (for tests and the benchmark)."""
        now = time.monotonic()
        return [{"url": w.url, "ready": w.ready, "eligible": w.eligible(None, now), "models": sorted(w.models),
                 "in_flight": w.in_flight, "waiting": w.waiting, "calls": w.calls, "draining": w.draining,
                 "ejected": w.ejected_until > now} for w in self.workers.values()]
