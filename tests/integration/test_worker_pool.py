"""Worker pools (gateway/workers/) against real stand-in worker processes over HTTP: model
routing, readiness, backpressure at the door, connect-error retry and re-admission, DNS
membership from a hosts file the test controls. The paid end-to-end cases are in
tests/e2e/test_gateway_workers.py."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.settings import Upstream
from gateway.workers.balance import Worker
from gateway.workers.pool import PoolRefusal, TrackedResponse, WorkerPool
from tests.conftest import ServiceProcess, _port

CHAT = "/v1/chat/completions"


def worker_argv(port: int, name: str, *extra: str, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "devtools.upstream", "--host", host, "--port", str(port), "--name", name, *extra]


def start_worker(spawn: Any, name: str, *extra: str, port: int | None = None) -> Any:
    port = port or _port()
    return spawn(worker_argv(port, name, *extra), port)


def pool_of(urls: list[str], **workers: Any) -> WorkerPool:
    opts = {"probe_every_s": 0.2, "eject_base_s": 0.5} | workers
    return WorkerPool("gpu", Upstream.model_validate({"kind": "workers", "urls": urls, "workers": opts}))


async def until(check: Any, what: str, deadline_s: float = 15.0) -> None:
    """Poll a condition (bounded): probes land on their own schedule."""
    end = time.monotonic() + deadline_s
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def chat(pool: WorkerPool, session: aiohttp.ClientSession, model: str,
               headers: dict[str, str] | None = None) -> tuple[int, str]:
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}]}}'.encode()
    resp = await pool.open(session, "POST", CHAT, {"content-type": "application/json", **(headers or {})}, body)
    try:
        await resp.read()
        return resp.status, resp.headers.get("x-devupstream-name", "")
    finally:
        resp.release()


class HostProcess(ServiceProcess):
    """A stand-in worker bound to another loopback address."""

    def __init__(self, argv: list[str], host: str, port: int, log: Path) -> None:
        super().__init__(argv, port, dict(os.environ), log)
        self.host = host

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession(response_class=TrackedResponse) as s:
        yield s


async def test_model_routing_and_a_worker_ready_mid_run(spawn: Any, session: aiohttp.ClientSession) -> None:
    a = start_worker(spawn, "a", "--models", "m1")
    b = start_worker(spawn, "b", "--models", "m1,m2")
    c = start_worker(spawn, "c", "--models", "m2", "--ready-after-s", "2")
    pool = pool_of([a.url, b.url, c.url])
    await pool.start(session)
    try:
        served = Counter([(await chat(pool, session, "m1"))[1] for _ in range(20)])
        assert set(served) == {"a", "b"}, served
        with pytest.raises(PoolRefusal) as refused:
            pool.admit("no-such-model")
        assert refused.value.status == 404
        before = Counter([(await chat(pool, session, "m2"))[1] for _ in range(6)])
        assert set(before) == {"b"}, before  # c is still loading
        await until(lambda: any(w["url"] == c.url and w["ready"] for w in pool.snapshot()), "c ready")
        after = Counter([(await chat(pool, session, "m2"))[1] for _ in range(30)])
        assert after["c"] > 0 and set(after) <= {"b", "c"}, after
    finally:
        await pool.close()


async def test_saturation_refuses_at_the_door_then_recovers(spawn: Any, session: aiohttp.ClientSession) -> None:
    a = start_worker(spawn, "a", "--models", "m1")
    pool = pool_of([a.url], max_concurrency=1, max_queue=0, retry_after_s=2)
    await pool.start(session)
    try:
        pool.admit("m1")
        held = asyncio.create_task(chat(pool, session, "m1", {"x-devupstream-fault": "slow:1500"}))
        await until(lambda: pool.workers[a.url].in_flight == 1, "the slot taken")
        with pytest.raises(PoolRefusal) as refused:
            pool.admit("m1")
        assert (refused.value.status, refused.value.retry_after_s) == (503, 2)
        assert (await held)[0] == 200
        assert pool.workers[a.url].in_flight == 0
        pool.admit("m1")  # recovered
        assert (await chat(pool, session, "m1"))[0] == 200
    finally:
        await pool.close()


async def test_admitted_calls_wait_for_a_slot(spawn: Any, session: aiohttp.ClientSession) -> None:
    a = start_worker(spawn, "a", "--models", "m1")
    pool = pool_of([a.url], max_concurrency=2, max_queue=8)
    await pool.start(session)
    try:
        replies = await asyncio.gather(*(chat(pool, session, "m1", {"x-devupstream-fault": "slow:100"})
                                         for _ in range(8)))
        assert [status for status, _ in replies] == [200] * 8
        assert pool.workers[a.url].in_flight == 0 and pool.waiting.get("m1", 0) == 0
    finally:
        await pool.close()


async def test_killed_worker_is_skipped_then_readmitted(spawn: Any, session: aiohttp.ClientSession) -> None:
    a = start_worker(spawn, "a", "--models", "m1")
    port_b = _port()
    b = start_worker(spawn, "b", "--models", "m1", port=port_b)
    pool = pool_of([a.url, b.url], probe_every_s=60)  # no probe in between: the calls find b gone
    await pool.start(session)
    try:
        b.kill()  # before any call: the pool holds no connection to b (probes close theirs)
        # Every call is served: a connect error to b is retried on a (nothing ran on b).
        served = Counter([(await chat(pool, session, "m1"))[1] for _ in range(10)])
        assert served == {"a": 10}, served
        assert not pool.workers[b.url].ready and pool.workers[b.url].calls == 1
        start_worker(spawn, "b", "--models", "m1", port=port_b)
        await pool.probe_all(session)
        await until(lambda: pool.workers[b.url].eligible("m1", time.monotonic()), "b re-admitted")
        served = Counter([(await chat(pool, session, "m1"))[1] for _ in range(20)])
        assert served["b"] > 0, served
    finally:
        await pool.close()


async def test_5xx_ejects_with_backoff(spawn: Any, session: aiohttp.ClientSession) -> None:
    a = start_worker(spawn, "a", "--models", "m1")
    bad = start_worker(spawn, "bad", "--models", "m1", "--fault", "500")
    pool = pool_of([a.url, bad.url], eject_after=2, eject_base_s=30, probe_every_s=60)
    await pool.start(session)
    try:
        statuses = [await chat(pool, session, "m1") for _ in range(12)]
        assert sum(1 for s, _ in statuses if s == 500) == 2, statuses  # ejected after its second 5xx
        assert any(w["url"] == bad.url and w["ejected"] for w in pool.snapshot())
    finally:
        await pool.close()


async def test_dns_membership_from_a_hosts_file(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    port = _port()
    started = []
    for i in (2, 3):  # every 127.0.0.x is this machine: two workers on one port, as a headless Service has
        host = f"127.0.0.{i}"
        started.append(HostProcess(worker_argv(port, f"w{i}", "--models", "m1", host=host), host, port,
                                   tmp_path / f"w{i}.log"))
    try:
        for proc in started:
            proc.start()
        await _dns_membership(session, tmp_path, port)
    finally:
        for proc in started:
            proc.stop()


async def _dns_membership(session: aiohttp.ClientSession, tmp_path: Path, port: int) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.2 workers.gpu.svc\n")
    pool = WorkerPool("gpu", Upstream.model_validate({"kind": "workers", "workers": {
        "dns": "workers.gpu.svc", "port": port, "hosts_file": str(hosts), "resolve_every_s": 0.2,
        "probe_every_s": 0.2}}))
    await pool.start(session)
    try:
        assert {(await chat(pool, session, "m1"))[1] for _ in range(5)} == {"w2"}
        hosts.write_text("127.0.0.2 workers.gpu.svc\n127.0.0.3 workers.gpu.svc\n")
        await until(lambda: len([w for w in pool.snapshot() if w["eligible"]]) == 2, "w3 joined")
        assert "w3" in {(await chat(pool, session, "m1"))[1] for _ in range(20)}
        hosts.write_text("127.0.0.3 workers.gpu.svc\n")
        await until(lambda: [w["url"] for w in pool.snapshot()] == [f"http://127.0.0.3:{port}"], "w2 drained")
        assert {(await chat(pool, session, "m1"))[1] for _ in range(5)} == {"w3"}
    finally:
        await pool.close()


async def test_a_probe_begun_before_a_call_found_the_worker_gone_does_not_readmit_it(monkeypatch: Any) -> None:
    """Found by CI: a probe in flight when a worker died answered "ready" after the failed call had
    marked it down, and the dead worker stayed in rotation until the next probe."""
    import gateway.workers.pool as pool_module
    from gateway.workers.probe import Probe

    url = "http://127.0.0.1:9"
    pool = pool_of([url])
    release = asyncio.Event()

    async def slow_ready_probe(*args: Any) -> Probe:
        await release.wait()
        return Probe(reachable=True, ready=True, models=frozenset({"m"}))

    monkeypatch.setattr(pool_module, "probe", slow_ready_probe)
    worker = Worker(url=url, ready=True, reachable=True)
    probing = asyncio.ensure_future(pool._probe_one(None, worker))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    pool._mark_down(worker)  # a call found it gone meanwhile
    release.set()
    await probing
    assert not worker.ready
    await pool._probe_one(None, worker)  # type: ignore[arg-type]  # a probe begun after: it decides
    assert worker.ready
