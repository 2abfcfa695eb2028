"""Where the gateway's CPU goes in one settled `exact` call: py-spy samples the gateway process
(`x402-gateway serve --devchain`, in-process facilitator on anvil) during N paid calls at
concurrency 1, and the report gives µs per call for the top frames, by own time and by inclusive
time (project functions only).

Not a test and not part of `make bench`. Run: `.venv/bin/python loadtests/profile_paid_call.py`
(needs `py-spy` on PATH or in PY_SPY; ~1 min). Writes `results/profile-paid-call-<date>.txt`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, event_loop_runner, install_sigterm_handler, now_iso
from bench_gateway import (
    CHAT,
    PaymentPool,
    PaymentSigner,
    Target,
    gateway_proc,
    measure,
    offered_requirement,
    pyspy_path,
    start_chain,
    upstream_proc,
)

RATE = 500  # py-spy samples per second
PROJECT = ("gateway/", "facilitator/", "budgets/", "storage/")


def frames_of(line: str) -> tuple[list[str], int]:
    """py-spy's raw line `fn (file:line);fn (file:line) count`, frames without their line numbers
    (a function's samples add up whatever line they were on)."""
    stack, _, count = line.rpartition(" ")
    return [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")], int(count)


def report(raw: Path, calls: int, top: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        frames, count = frames_of(line)
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            if any(p in frame for p in PROJECT):
                inclusive[frame] += count
    us = 1e6 / RATE / max(calls, 1)  # µs of samples per call
    head = (f"{calls} paid calls at concurrency 1, {total} samples at {RATE} Hz: "
            f"{total * us:,.0f} µs of time holding the GIL per call")
    lines = [head, "", f"Top {top} frames by own time, µs per call:"]
    lines += [f"{n * us:9.1f}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", f"Top {2 * top} project functions by inclusive time, µs per call:"]
    lines += [f"{n * us:9.1f}  {frame}" for frame, n in inclusive.most_common(2 * top)]
    return "\n".join(lines)


async def run(args: argparse.Namespace, log_dir: Path, stack: contextlib.ExitStack) -> tuple[int, Path]:
    spy = pyspy_path()
    if spy is None:
        raise SystemExit("py-spy not found (PATH or PY_SPY)")
    chain = start_chain(args.agents)
    stack.callback(chain.stop)
    devchain = chain.description
    dc = log_dir / "devchain.json"
    dc.write_text(json.dumps(devchain))
    up = upstream_proc(log_dir).start()
    stack.callback(up.stop)
    gw = gateway_proc(log_dir, "gateway-anvil", str(dc), upstream_url=up.url, log_level="info").start()
    stack.callback(gw.stop)
    accepted, resource = offered_requirement(gw.url, devchain["tokens"]["OPG"]["address"])
    keys = [a["private_key"] for a in devchain["accounts"]["agents"]]
    pool = PaymentPool(PaymentSigner(devchain, accepted, resource, keys))
    pool.ensure(args.calls + 20)
    target = Target("gateway_anvil", gw.url + CHAT, True, pool, {"gateway": gw.pid})
    await measure(target, 1, max_ops=20, max_seconds=30, warmup=0)  # warm: imports, connections
    out = log_dir / "raw.txt"
    outcome: dict[str, int] = {}

    async def load() -> None:
        res = await measure(target, 1, max_ops=args.calls, max_seconds=args.seconds, warmup=0)
        outcome["ok"] = int(res.summary["ok"])

    assert gw.pid is not None
    # --gil: sample only while the gateway holds the GIL, i.e. runs Python. Without it, on this
    # VM the samples are dominated by the event loop's wait and by socket writes that a woken peer
    # preempts (loadtests/README.md, profile notes).
    proc = subprocess.Popen([spy, "record", "--pid", str(gw.pid), "--rate", str(RATE), "--gil", "--nonblocking",
                             "--duration", str(int(args.seconds) + 5), "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await asyncio.sleep(0.5)
        await load()
        proc.wait(timeout=args.seconds + 40)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
    return outcome.get("ok", 0), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--seconds", type=float, default=30.0, help="time bound of the profiled run")
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    install_sigterm_handler()
    with tempfile.TemporaryDirectory(prefix="x402-profile-") as tmp, contextlib.ExitStack() as stack:
        with event_loop_runner() as runner:
            calls, raw = runner.run(run(args, Path(tmp), stack))
        text = f"# Profile of one paid call — {now_iso()}\n\n`loadtests/profile_paid_call.py`\n\n" + report(raw, calls, args.top)
        stack.close()
    print(text)
    if not args.no_write:
        path = ROOT / "loadtests" / "results" / f"profile-paid-call-{time.strftime('%Y-%m-%d')}.txt"
        path.write_text(text + "\n")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
