"""Shared fixtures: one dev chain (anvil + Permit2 + x402 proxies + tokens) per test session."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def devchain() -> Iterator[dict[str, Any]]:
    """Start one DevChain (4 agents) for the session; yields its description dict.

    anvil is terminated by pid at the end of the session (DevChain.stop)."""
    from devtools.devchain import DevChain

    chain = DevChain(agents=4)
    chain.start()
    try:
        yield chain.description
    finally:
        chain.stop()


# ---------------------------------------------------------------------------------------------
# Real processes: redis-server and facilitator services on free ports.

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, deadline_s: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {deadline_s}s")


class RedisServer:
    """A private redis-server on a free port (tests may stop and restart it)."""

    def __init__(self, extra_args: list[str] | None = None) -> None:
        self.port = _port()
        self.dir = tempfile.mkdtemp(prefix="x402-redis-")
        self.proc: subprocess.Popen | None = None
        self.extra_args = extra_args or []  # later options win: e.g. ["--appendonly", "yes"]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log"), *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: what survives is what was on disk (the AOF, with --appendonly yes)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def redis_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="session")
def devchain_file(devchain: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("devchain") / "devchain.json"
    path.write_text(json.dumps(devchain))
    return str(path)


class ServiceProcess:
    def __init__(self, argv: list[str], port: int, env: dict[str, str], log: Path) -> None:
        self.argv, self.port, self.env, self.log = argv, port, env, log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        self._fh = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._fh, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        try:
            wait_http(self.url + "/healthz", proc=self.proc)
        except Exception:
            self.stop()
            print(self.log.read_text()[-4000:], file=sys.stderr)
            raise
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, no cleanup."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_fh", None):
            self._fh.close()


@pytest.fixture
def spawn_facilitator(devchain_file: str, tmp_path: Path) -> Iterator[Any]:
    """spawn_facilitator(store_url, **env) -> a started `x402-facilitator serve` process."""
    started: list[ServiceProcess] = []

    def spawn(store_url: str, *, extra_env: dict[str, str] | None = None, port: int | None = None) -> ServiceProcess:
        port = port or _port()
        env = dict(os.environ) | {"FACILITATOR_STORE_URL": store_url} | (extra_env or {})
        argv = [sys.executable, "-m", "facilitator.cli", "serve", "--devchain", devchain_file, "--port", str(port)]
        proc = ServiceProcess(argv, port, env, tmp_path / f"facilitator-{port}.log")
        started.append(proc)
        return proc.start()

    yield spawn
    for p in started:
        p.stop()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """spawn(argv, port, env=None) -> a started process answering GET /healthz on `port`."""
    started: list[ServiceProcess] = []

    def run(argv: list[str], port: int, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(argv, port, dict(os.environ) | (env or {}), tmp_path / f"{Path(argv[2]).name}-{port}.log")
        started.append(proc)
        return proc.start()

    yield run
    for p in started:
        p.stop()


@pytest.fixture
def spawn_upstream(spawn: Any) -> Any:
    """A stand-in AI provider process (devtools.upstream) requiring the key `sk-upstream`."""

    def run(name: str = "devupstream") -> ServiceProcess:
        port = _port()
        return spawn([sys.executable, "-m", "devtools.upstream", "--port", str(port), "--name", name,
                      "--require-auth", "sk-upstream"], port)

    return run


@pytest.fixture
def spawn_gateway(spawn: Any, devchain_file: str, tmp_path: Path) -> Any:
    """A gateway process on the dev chain configuration. The in-process facilitator (when no
    facilitator_url is given) shares `store_url` with the gateway's records."""

    def run(upstream_url: str, store_url: str, *, facilitator_url: str | None = None, port: int | None = None,
            env: dict[str, str] | None = None, config: str | None = None) -> ServiceProcess:
        port = port or _port()
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--devchain", devchain_file, "--port", str(port),
                "--store", store_url]
        argv += ["--config", config] if config else ["--upstream", upstream_url]
        if facilitator_url:
            argv += ["--facilitator-url", facilitator_url]
        fac_store = store_url if store_url.startswith("redis") else f"sqlite://{tmp_path}/facilitator-{port}.sqlite3"
        base_env = {"FACILITATOR_STORE_URL": fac_store, "GATEWAY_DEV_UPSTREAM_KEY": "sk-upstream"}
        return spawn(argv, port, base_env | (env or {}))

    return run


@pytest.fixture
def spawn_hostile(spawn: Any) -> Any:
    """A hostile third-party facilitator forwarding to `real_url` unless told otherwise."""

    def run(real_url: str) -> ServiceProcess:
        port = _port()
        return spawn([sys.executable, "-m", "tests.hostile_facilitator", "--port", str(port), "--real", real_url], port)

    return run


class RedisCluster:
    """Three redis-server masters joined with `redis-cli --cluster create` (no replicas)."""

    def __init__(self) -> None:
        self.nodes = [RedisServer() for _ in range(3)]
        self._pick_ports()

    def _pick_ports(self) -> None:
        # The cluster bus listens on port + 10000. Both stay below the kernel's ephemeral range
        # (32768 up), where an outgoing connection of any process could take them first.
        for n in self.nodes:
            n.port = _port_below(22767)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> None:
        for attempt in range(3):  # a port taken between the pick and the bind: pick again
            try:
                self._start()
                return
            except TimeoutError:
                if attempt == 2:
                    raise
                self.stop()
                for n in self.nodes:
                    n.dir = tempfile.mkdtemp(prefix="x402-cluster-")
                self._pick_ports()

    def _start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        for n in self.nodes:
            n.proc = subprocess.Popen(
                [binary, "--bind", "127.0.0.1", "--port", str(n.port), "--save", "", "--appendonly", "no",
                 "--cluster-enabled", "yes", "--cluster-config-file", os.path.join(n.dir, "nodes.conf"),
                 "--dir", n.dir, "--logfile", os.path.join(n.dir, "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for n in self.nodes:
            _wait_port(n.port)
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=30)
        end = time.monotonic() + 15
        while time.monotonic() < end:
            out = subprocess.run([cli, "-p", str(self.nodes[0].port), "cluster", "info"], capture_output=True,
                                 text=True).stdout
            if "cluster_state:ok" in out:
                return
            time.sleep(0.1)
        raise TimeoutError("redis cluster did not become ok")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
            shutil.rmtree(n.dir, ignore_errors=True)


class RedisSentinel:
    """A master and one Sentinel watching it as `x402master`."""

    def __init__(self) -> None:
        self.master = RedisServer()
        self.port = _port()
        self.dir = tempfile.mkdtemp(prefix="x402-sentinel-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/x402master"

    def start(self) -> None:
        self.master.start()
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as fh:
            fh.write(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                     f"sentinel monitor x402master 127.0.0.1 {self.master.port} 1\n"
                     "sentinel down-after-milliseconds x402master 5000\n")
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen([binary, conf, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.master.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _port_below(limit: int) -> int:
    import random

    for _ in range(200):
        candidate = random.randint(20000, limit)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate + 10000))
            except OSError:
                continue
        return candidate
    raise RuntimeError("no free port pair")


def _wait_port(port: int, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"redis on port {port} did not start")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    sentinel = RedisSentinel()
    sentinel.start()
    try:
        yield sentinel
    finally:
        sentinel.stop()


REDIS_TOPOLOGIES = ["redis", "redis-sentinel", "redis-cluster"]


def redis_url_for(request: pytest.FixtureRequest, topology: str) -> str:
    fixture = {"redis": "redis_server", "redis-sentinel": "redis_sentinel", "redis-cluster": "redis_cluster"}[topology]
    return request.getfixturevalue(fixture).url


# ---------------------------------------------------------------------------------------------
# One clock for the store suites. Every `now` a test passes to a store, and every expiry it
# expects, comes from `clock`: the real clock, or the real clock shifted a year ahead or behind
# (Redis keeps its real clock). A store that mixes the caller's now with a clock of its own fails
# a shifted run: an absolute EXPIREAT taken from the caller's now makes Redis drop the key at once
# a year behind; an expiry taken from time.time() is long past a year ahead.

YEAR_S = 365 * 86400
CLOCK_SHIFTS = {"now": 0.0, "year-ahead": float(YEAR_S), "year-behind": float(-YEAR_S)}
# The shifted runs are on SQLite and one Redis: Sentinel and Cluster run the same store code.
_UNSHIFTED_ONLY = {"redis-sentinel", "redis-cluster"}


class TestClock:
    """The tests' notion of now: time.time() plus a fixed offset."""

    __test__ = False  # not a test class

    def __init__(self, offset_s: float) -> None:
        self.offset_s = offset_s

    def __call__(self) -> float:
        return time.time() + self.offset_s

    def ms(self) -> int:
        return int(self() * 1000)


@pytest.fixture(params=list(CLOCK_SHIFTS.values()), ids=list(CLOCK_SHIFTS))
def clock(request: pytest.FixtureRequest) -> TestClock:
    return TestClock(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    drop = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("clock", 0.0) != 0.0 and _UNSHIFTED_ONLY & {v for v in params.values() if isinstance(v, str)}:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        dropped = {id(item) for item in drop}
        items[:] = [item for item in items if id(item) not in dropped]
