"""Shared helpers for the benchmark scripts in loadtests/ (not a test module).

- payload signing with the official x402 client (one client per agent, reused),
- bounded load runners (count *and* time bounded, latencies per operation),
- the `x402-facilitator serve` subprocess, started on 127.0.0.1 and always stopped by pid,
- machine description and the results files (JSON + markdown + LATEST-*.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import importlib.metadata
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOADTESTS = ROOT / "loadtests"
RESULTS = LOADTESTS / "results"
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

HOST = "127.0.0.1"  # every load in these scripts goes to loopback only


# ---------------------------------------------------------------------------------------------
# Signals: SIGTERM is handled like Ctrl-C, so every `finally` / context manager (anvil, serve,
# redis keys) runs. While an asyncio.Runner is running, its own SIGINT handler cancels the main
# task (clean unwinding through every `async with`); outside it, KeyboardInterrupt is raised.


def install_sigterm_handler() -> None:
    def _on_term(signum: int, frame: object) -> None:
        signal.raise_signal(signal.SIGINT)

    # A shell starts background jobs with SIGINT ignored; restore the default so both work.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_term)


# ---------------------------------------------------------------------------------------------
# The official SDK facilitator needs `jsonschema` at import time on its Permit2 verify path
# (x402/extensions/bazaar imports it; verify never calls it). The project depends on
# x402[evm,httpx] only, so without x402[extensions] the SDK's Permit2 verify raises ImportError.


def ensure_sdk_importable() -> bool:
    """Returns True when a stub `jsonschema` module had to be inserted."""
    try:
        import jsonschema  # noqa: F401

        return False
    except ImportError:
        sys.modules["jsonschema"] = types.ModuleType("jsonschema")
        return True


# ---------------------------------------------------------------------------------------------
# Statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an unsorted sequence; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))  # ceil(q/100 * n)
    return ordered[rank - 1]


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]  # drop nan
    return statistics.median(vals) if vals else float("nan")


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_s(pid: int | None = None) -> float:
    """User+system CPU seconds of a process (this one when pid is None), all threads."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
    except (OSError, IndexError, ValueError):
        return float("nan")


class CpuMeter:
    """CPU seconds used by named processes between start() and stop() (None = this process)."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: proc_cpu_s(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.used = {name: proc_cpu_s(pid) - self._start[name] for name, pid in self.pids.items()}
        return self.used


@dataclass
class LoadResult:
    """One bounded load run: `ops` completed in `elapsed_s`, per-op latencies in seconds."""

    ops: int = 0
    ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process during the run

    @property
    def rate(self) -> float:
        return self.ops / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    def summary(self) -> dict[str, Any]:
        return {
            "ops": self.ops,
            "ok": self.ok,
            "failures": dict(self.failures),
            "elapsed_s": round(self.elapsed_s, 4),
            "ops_per_s": round(self.rate, 2),
            "p50_ms": round(self.p(50) * 1e3, 4),
            "p99_ms": round(self.p(99) * 1e3, 4),
            "cpu_s": {k: round(v, 3) for k, v in self.cpu_s.items()},
            "cpu_us_per_op": {k: round(v / self.ops * 1e6, 1) if self.ops else None for k, v in self.cpu_s.items()},
        }


async def run_load(
    op: Callable[[Any], Awaitable[tuple[bool, str]]],
    items: Iterator[Any],
    *,
    concurrency: int,
    max_ops: int,
    max_seconds: float,
    cpu: CpuMeter | None = None,
) -> LoadResult:
    """`concurrency` workers take items and await `op(item)` -> (ok, reason) until `max_ops`
    operations were started, `items` is exhausted, or `max_seconds` passed (bounded both ways).
    A single operation is also bounded by max_seconds + 30 s (asyncio.wait_for)."""
    res = LoadResult()
    started = 0
    if cpu is not None:
        cpu.start()
    start = time.perf_counter()
    deadline = start + max_seconds

    async def worker() -> None:
        nonlocal started
        while started < max_ops and time.perf_counter() < deadline:
            try:
                item = next(items)
            except StopIteration:
                return
            started += 1
            t0 = time.perf_counter()
            try:
                ok, reason = await asyncio.wait_for(op(item), timeout=max_seconds + 30)
            except Exception as exc:  # noqa: BLE001 - counted, reported; a benchmark must not hide failures
                ok, reason = False, f"exception:{type(exc).__name__}"
            res.latencies.append(time.perf_counter() - t0)
            res.ops += 1
            if ok:
                res.ok += 1
            else:
                res.failures[reason] = res.failures.get(reason, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.elapsed_s = time.perf_counter() - start
    if cpu is not None:
        res.cpu_s = cpu.stop()
    return res


def event_loop_runner() -> asyncio.Runner:
    """uvloop when installed (what `x402-facilitator serve` uses), else the default loop."""
    try:
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        return asyncio.Runner()


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401

        return "uvloop"
    except ImportError:  # pragma: no cover
        return "asyncio"


# ---------------------------------------------------------------------------------------------
# Payloads signed by the official x402 client


@dataclass
class SignedPayment:
    method: str  # "permit2" | "eip3009"
    symbol: str
    agent: int
    amount: int
    requirements: dict[str, Any]
    payload: dict[str, Any]
    body: dict[str, Any]  # the facilitator request body
    body_bytes: bytes = b""


async def sign_payments(
    devchain: dict[str, Any],
    symbol: str,
    count: int,
    *,
    agents: int,
    amount: Callable[[int], int] = lambda i: 1000,
    max_timeout_seconds: int = 3600,
) -> list[SignedPayment]:
    """`count` payments for `symbol` signed by the official x402 client, round-robin over the
    agents. Every payment has its own random nonce (the client draws it)."""
    import orjson
    from eth_account import Account
    from payments import facilitator_body, requirements_for
    from x402 import x402Client
    from x402.mechanisms.evm.exact.register import register_exact_evm_client
    from x402.schemas import PaymentRequired, PaymentRequirements, ResourceInfo

    clients = []
    for i in range(agents):
        client = x402Client()
        register_exact_evm_client(client, Account.from_key(devchain["accounts"]["agents"][i]["private_key"]))
        client.set_spend_controls(False)  # the dev tokens are not in the SDK's default-asset table
        clients.append(client)
    method = devchain["tokens"][symbol]["transfer_method"]
    out: list[SignedPayment] = []
    for i in range(count):
        agent = i % agents
        amt = amount(i)
        req = requirements_for(devchain, symbol, amt, max_timeout_seconds=max_timeout_seconds)
        model = PaymentRequirements.model_validate(req)
        payload = await clients[agent].create_payment_payload(
            PaymentRequired(accepts=[model], resource=ResourceInfo(url=f"http://{HOST}/bench/{i}"))
        )
        wire = payload.model_dump(by_alias=True, exclude_none=True)
        body = facilitator_body(wire, req)
        out.append(SignedPayment(method, symbol, agent, amt, req, wire, body, orjson.dumps(body)))
    return out


def cycle(items: Sequence[Any]) -> Iterator[Any]:
    return itertools.cycle(items)


# ---------------------------------------------------------------------------------------------
# Settlement store


def store_for_run(url: str, run_id: str) -> tuple[str, str]:
    """(store_url, store_prefix): a unique key prefix per run so runs never see each other."""
    return url, f"bench:{run_id}:"


async def purge_redis_prefix(url: str, prefix: str) -> int:
    """Delete the keys this run created (bounded SCAN)."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return 0
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=prefix + "*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await client.delete(*batch)
                batch = []
        if batch:
            deleted += await client.delete(*batch)
    finally:
        await client.aclose()
    return deleted


# ---------------------------------------------------------------------------------------------
# The facilitator service as a subprocess


class ServeProcess:
    """`x402-facilitator serve` (1 uvicorn worker, uvloop + httptools) on a free loopback port.
    Stopped by pid (SIGTERM, then SIGKILL) in stop()/__exit__, whatever happens."""

    def __init__(self, devchain: dict[str, Any], *, store_url: str, store_prefix: str,
                 signer_keys: list[str] | None = None, log_level: str = "warning") -> None:
        from devtools.devchain import free_port

        self.port = free_port(HOST)
        self.url = f"http://{HOST}:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="x402-bench-")
        d = Path(self._dir.name)
        (d / "devchain.json").write_text(json.dumps(devchain))
        # store_prefix and log level have no CLI flag: give them in a settings file.
        (d / "facilitator.toml").write_text(
            f'store_prefix = "{store_prefix}"\nlog_level = "{log_level}"\n'
        )
        exe = Path(sys.executable).with_name("x402-facilitator")
        self.argv = [str(exe), "serve", "--config", str(d / "facilitator.toml"), "--devchain", str(d / "devchain.json"),
                     "--host", HOST, "--port", str(self.port), "--store", store_url]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FACILITATOR_")}
        if signer_keys is not None:
            env["FACILITATOR_SIGNER_KEYS"] = ",".join(signer_keys)
        self._env = env
        self._log_path = d / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        log = open(self._log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self._env, cwd=str(ROOT))
        log.close()
        import http.client

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"x402-facilitator serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=1.0)
                conn.request("GET", "/readyz")
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"x402-facilitator serve was not ready in {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._dir.cleanup()

    def __enter__(self) -> ServeProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# Machine and results


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def anvil_version() -> str | None:
    try:
        from devtools.solidity import ANVIL_BIN, find_node_modules

        out = subprocess.run([str(find_node_modules() / ANVIL_BIN), "--version"], capture_output=True, text=True,
                             timeout=10, check=False)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except Exception:  # noqa: BLE001 - best-effort machine description
        return None


def machine_info() -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    try:
        from eth_hash.auto import keccak as _k

        _k(b"")
        hasher = getattr(_k, "hasher", None)
        eth_hash_backend = type(getattr(hasher, "__self__", hasher)).__name__
    except Exception:  # noqa: BLE001 - best-effort machine description
        eth_hash_backend = None
    try:
        from facilitator.evm import eip712

        fk = getattr(eip712, "_keccak_256", None)
        fast_keccak = f"{fk.__module__}.keccak_256 (safe-pysha3)" if fk is not None else "eth_hash.auto (fallback)"
    except Exception:  # noqa: BLE001 - best-effort machine description
        fast_keccak = None
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "loadavg_start": list(os.getloadavg()),
        "packages": {name: _version(name) for name in (
            "x402", "web3", "coincurve", "eth-account", "eth-hash", "safe-pysha3", "pycryptodome", "aiohttp",
            "uvicorn", "uvloop", "httptools", "starlette", "pydantic", "orjson", "redis", "hiredis",
        )},
        "anvil": anvil_version(),
        "eth_hash_backend (eth_account)": eth_hash_backend,
        "keccak used by facilitator/evm/eip712.py": fast_keccak,
        "redis_server": shutil.which("redis-server"),
    }


def today() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d")


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def write_results(kind: str, data: dict[str, Any], markdown: str) -> list[Path]:
    """results/<kind>-<date>.json, results/<kind>-<date>.md and results/LATEST-<kind>.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}-{today()}"
    paths = [RESULTS / f"{stem}.json", RESULTS / f"{stem}.md", RESULTS / f"LATEST-{kind}.md"]
    paths[0].write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    paths[1].write_text(markdown)
    paths[2].write_text(markdown)
    return paths


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def md_machine(m: dict[str, Any]) -> str:
    pk = m["packages"]
    pkgs = ", ".join(f"{k} {v}" for k, v in pk.items() if v)
    return "\n".join([
        f"- host: {m['nproc']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, Python {m['python']}",
        f"- anvil: {m['anvil']}",
        f"- keccak: eth_account uses eth-hash backend `{m['eth_hash_backend (eth_account)']}`; "
        f"facilitator/evm/eip712.py uses `{m['keccak used by facilitator/evm/eip712.py']}`",
        f"- packages: {pkgs}",
        f"- load average at start: {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}"
        + (f"; at end: {', '.join(f'{x:.2f}' for x in m['loadavg_end'])}" if "loadavg_end" in m else ""),
    ])


def fmt(x: float, digits: int = 0) -> str:
    if x != x:
        return "n/a"
    return f"{x:,.{digits}f}"
