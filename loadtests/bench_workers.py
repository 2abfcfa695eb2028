"""Worker-pool benchmark: load-aware routing (least outstanding requests, power of two choices,
informed by the workers' own vLLM-style queue gauge) against round-robin, in the same run.

Four stand-in GPU workers (`python -m devtools.upstream` processes on 127.0.0.1), each with
`--concurrency` slots (calls beyond them wait inside the worker, reported as
`vllm:num_requests_waiting` on /metrics); three answer in `--fast-ms`, one is 5x slower. A
closed loop of `--concurrency` callers sends chat completions through the gateway's own
`gateway.workers.pool.WorkerPool` (the code the gateway runs for a `workers` upstream, over real
HTTP to the real worker processes; no payment, so only the routing differs between the two
policies). Repetitions alternate the policies; the report gives medians of the repetitions and
the ratio load-aware / round-robin of each repetition. Nothing here asserts a timing.

Run: `.venv/bin/python loadtests/bench_workers.py` (~1 min).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from _common import (
    HOST,
    ROOT,
    event_loop_runner,
    fmt,
    install_sigterm_handler,
    machine_info,
    md_machine,
    md_table,
    median,
    now_iso,
    percentile,
    write_results,
)

from devtools.devchain import free_port
from gateway.settings import Upstream
from gateway.workers.pool import NoWorkerError, TrackedResponse, WorkerCallFailedError, WorkerPool

BODY = b'{"model": "m1", "messages": [{"role": "user", "content": "route me"}]}'
HEADERS = {"content-type": "application/json"}


class Worker:
    def __init__(self, name: str, latency_ms: float, slots: int, log_dir: Path) -> None:
        self.name = name
        self.port = free_port(HOST)
        self.url = f"http://{HOST}:{self.port}"
        argv = [sys.executable, "-m", "devtools.upstream", "--host", HOST, "--port", str(self.port), "--name", name,
                "--models", "m1", "--latency-ms", str(latency_ms), "--concurrency", str(slots), "--log-level", "warning"]
        self.log = open(log_dir / f"{name}.log", "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=str(ROOT))

    def wait(self, deadline_s: float = 20.0) -> None:
        import urllib.request

        end = time.monotonic() + deadline_s
        while True:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"worker {self.name} did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


async def one_run(policy: str, workers: list[Worker], args: argparse.Namespace) -> dict[str, Any]:
    upstream = Upstream.model_validate({"kind": "workers", "urls": [w.url for w in workers], "workers": {
        "balance": policy, "probe_every_s": args.probe_s, "max_concurrency": 256, "max_queue": 1024}})
    pool = WorkerPool("bench", upstream)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=256)
    async with aiohttp.ClientSession(connector=connector, response_class=TrackedResponse) as session:
        await pool.start(session)
        latencies: list[float] = []
        served: Counter[str] = Counter()
        failures = 0
        started = 0
        t0 = time.perf_counter()
        deadline = t0 + args.seconds

        async def caller() -> None:
            nonlocal started, failures
            while started < args.max_ops and time.perf_counter() < deadline:
                started += 1
                t = time.perf_counter()
                try:
                    resp = await pool.open(session, "POST", "/v1/chat/completions", HEADERS, BODY)
                    try:
                        await resp.read()
                        ok = resp.status == 200
                        served[resp.headers.get("x-devupstream-name", "?")] += 1
                    finally:
                        resp.release()
                except (aiohttp.ClientError, TimeoutError, NoWorkerError, WorkerCallFailedError):
                    ok = False
                latencies.append(time.perf_counter() - t)
                failures += not ok

        await asyncio.gather(*(caller() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
        await pool.close()
    n = len(latencies)
    return {"policy": policy, "ops": n, "failures": failures, "elapsed_s": round(elapsed, 3),
            "ops_per_s": round(n / elapsed, 1), "p50_ms": round(percentile(latencies, 50) * 1e3, 2),
            "p99_ms": round(percentile(latencies, 99) * 1e3, 2),
            "share": {w.name: round(served[w.name] / n, 4) if n else 0.0 for w in workers}}


async def run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    spec = [("fast1", args.fast_ms), ("fast2", args.fast_ms), ("fast3", args.fast_ms), ("slow", args.fast_ms * 5)]
    workers = [Worker(name, ms, args.slots, log_dir) for name, ms in spec]
    try:
        for w in workers:
            w.wait()
        runs = []
        for rep in range(args.reps):
            order = ("least_request", "round_robin") if rep % 2 == 0 else ("round_robin", "least_request")
            for policy in order:
                result = await one_run(policy, workers, args) | {"rep": rep}
                print(f"rep {rep} {policy:>13}: {result['ops_per_s']:>7} ops/s  p99 {result['p99_ms']:>8} ms  "
                      f"slow share {result['share']['slow']:.3f}", flush=True)
                runs.append(result)
    finally:
        for w in workers:
            w.stop()
    return {"runs": runs}


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    by = {p: [r for r in data["runs"] if r["policy"] == p] for p in ("least_request", "round_robin")}
    summary: dict[str, Any] = {}
    for policy, runs in by.items():
        summary[policy] = {k: median(r[k] for r in runs) for k in ("ops_per_s", "p50_ms", "p99_ms")}
        summary[policy]["slow_share"] = median(r["share"]["slow"] for r in runs)
    reps = sorted({r["rep"] for r in data["runs"]})
    pair = {rep: {r["policy"]: r for r in data["runs"] if r["rep"] == rep} for rep in reps}
    summary["ratio_throughput"] = median(pair[i]["least_request"]["ops_per_s"] / pair[i]["round_robin"]["ops_per_s"]
                                         for i in reps)
    summary["ratio_p99"] = median(pair[i]["least_request"]["p99_ms"] / pair[i]["round_robin"]["p99_ms"] for i in reps)
    return summary


def render(data: dict[str, Any], args: argparse.Namespace) -> str:
    s = data["summary"]
    rows = [[p, fmt(s[p]["ops_per_s"], 1), fmt(s[p]["p50_ms"], 1), fmt(s[p]["p99_ms"], 1), f"{s[p]['slow_share']:.3f}"]
            for p in ("least_request", "round_robin")]
    runs = [[r["rep"], r["policy"], r["ops"], r["failures"], fmt(r["ops_per_s"], 1), fmt(r["p99_ms"], 1),
             " ".join(f"{k}={v:.3f}" for k, v in r["share"].items())] for r in data["runs"]]
    return "\n".join([
        f"# Worker pool routing: least-request (P2C) vs round-robin ({data['at']})", "",
        f"4 stand-in workers, {args.slots} slots each: three answer in {args.fast_ms:g} ms, one in "
        f"{args.fast_ms * 5:g} ms (5x slower). {args.concurrency} callers in a closed loop through "
        f"`gateway.workers.pool.WorkerPool` over HTTP, {args.seconds:g} s or {args.max_ops} calls per run, "
        f"{args.reps} repetitions alternating the policies; medians of the repetitions.", "",
        md_table(["policy", "calls/s", "p50 ms", "p99 ms", "slow worker's share"], rows), "",
        f"Load-aware / round-robin, median of per-repetition ratios: throughput x{s['ratio_throughput']:.2f}, "
        f"p99 x{s['ratio_p99']:.2f}. An even split would give the slow worker 0.250; its capacity share is "
        f"{1 / 16:.3f} (1/5 of a fast worker's).", "",
        "## Runs", "", md_table(["rep", "policy", "calls", "failures", "calls/s", "p99 ms", "share"], runs), "",
        "## Machine", "", md_machine(data["machine"]), "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--fast-ms", type=float, default=20.0)
    p.add_argument("--slots", type=int, default=4, help="calls each worker serves at once")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--max-ops", type=int, default=20_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--probe-s", type=float, default=0.5, help="how often the pool polls /metrics")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    install_sigterm_handler()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="x402-bench-workers-") as d, event_loop_runner() as runner:
        machine = machine_info()
        data = runner.run(run(args, Path(d)))
        machine["loadavg_end"] = list(__import__("os").getloadavg())
    data |= {"at": now_iso(), "machine": machine, "args": vars(args)}
    data["summary"] = summarize(data)
    md = render(data, args)
    print(md)
    if not args.no_write:
        for path in write_results("workers", data, md):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
