"""The JSON-RPC transport: our kept-alive HTTP/1.1 client (facilitator/http11.py) against the
aiohttp ClientSession it replaced, on the same anvil, the same loop (uvloop), in the same run.

Each repetition runs both clients back to back (the order alternating) at concurrency 1 and 16:
a JSON-RPC request (`eth_chainId`, then a 4-call batch as a verify's cold read sends) posted and
its JSON answer read. Reported: CPU of this process per exchange (the client's own cost; anvil
runs apart) and wall time per exchange, medians of the repetitions, and ours ÷ aiohttp.

Not a test. Run: `.venv/bin/python loadtests/bench_rpc_transport.py` (~1 min).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import orjson
from _common import event_loop_runner, fmt, machine_info, md_machine, md_table, median, now_iso, write_results

from devtools.devchain import free_port
from devtools.solidity import ANVIL_BIN, find_node_modules
from facilitator.http11 import Http11Client

SINGLE = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
BATCH = orjson.dumps([{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in enumerate([
    ("eth_getCode", ["0x000000000022D473030F116dDEE9F6B43aC78BA3", "latest"]),
    ("eth_getBalance", ["0x70997970C51812dc3A65C30aa3fB8bdD7C0C8Fc3", "latest"]),
    ("eth_blockNumber", []),
    ("eth_chainId", []),
])])


class AiohttpPost:
    """The replaced transport, as facilitator/evm/rpc.py had it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300),
                                             timeout=aiohttp.ClientTimeout(total=10))

    async def post(self, body: bytes) -> Any:
        async with self.session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as resp:
            return orjson.loads(await resp.read())

    async def close(self) -> None:
        await self.session.close()


class OursPost:
    def __init__(self, url: str) -> None:
        self.client = Http11Client(url, limit=64, timeout_s=10)

    async def post(self, body: bytes) -> Any:
        return orjson.loads((await self.client.post(body)).body)

    async def close(self) -> None:
        await self.client.close()


async def measure(client: Any, body: bytes, concurrency: int, n: int) -> dict[str, float]:
    async def worker(k: int) -> None:
        for _ in range(k):
            await client.post(body)

    await asyncio.gather(*(worker(max(1, n // 10 // concurrency)) for _ in range(concurrency)))  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    done = n // concurrency * concurrency
    return {"cpu_us": (time.process_time() - cpu) / done * 1e6, "wall_us": (time.perf_counter() - wall) / done * 1e6}


async def run(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    rows = []
    for rep in range(args.reps):
        for body_name, body in (("eth_chainId", SINGLE), ("4-call batch", BATCH)):
            for concurrency in (1, 16):
                order = [("aiohttp", AiohttpPost), ("ours", OursPost)]
                for name, kind in order if rep % 2 == 0 else order[::-1]:
                    client = kind(url)
                    try:
                        got = await measure(client, body, concurrency, args.n)
                    finally:
                        await client.close()
                    rows.append({"rep": rep, "request": body_name, "concurrency": concurrency, "client": name, **got})
    return rows


def render(rows: list[dict[str, Any]], machine: dict[str, Any], args: argparse.Namespace) -> str:
    table, ratios = [], []
    for body_name in ("eth_chainId", "4-call batch"):
        for concurrency in (1, 16):
            def pick(client: str, key: str, b: str = body_name, c: int = concurrency) -> list[float]:
                return [r[key] for r in rows if r["request"] == b and r["concurrency"] == c and r["client"] == client]
            for client in ("aiohttp", "ours"):
                table.append([body_name, concurrency, client, fmt(median(pick(client, "cpu_us"))),
                              fmt(median(pick(client, "wall_us")))])
            per_rep = [o / a for o, a in zip(pick("ours", "cpu_us"), pick("aiohttp", "cpu_us"), strict=True)]
            wall = [o / a for o, a in zip(pick("ours", "wall_us"), pick("aiohttp", "wall_us"), strict=True)]
            ratios.append([body_name, concurrency, f"{median(per_rep):.2f}", ", ".join(f"{x:.2f}" for x in per_rep),
                           f"{median(wall):.2f}"])
    return "\n".join([
        f"# JSON-RPC transport benchmark ({now_iso()})", "",
        f"`loadtests/bench_rpc_transport.py` — {args.reps} repetitions of {args.n} exchanges per cell, "
        "both clients back to back in each (order alternating), uvloop, one anvil.", "",
        "## Machine", "", md_machine(machine), "",
        "## Per exchange (medians of the repetitions)", "",
        "CPU is this process's (the client's own work; anvil runs in its own process).", "",
        md_table(["request", "concurrency", "client", "CPU µs", "wall µs"], table), "",
        "## Ours ÷ aiohttp (lower is better)", "",
        md_table(["request", "concurrency", "CPU ratio (median)", "CPU ratio per repetition", "wall ratio (median)"], ratios),
        "",
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("-n", type=int, default=3200, help="exchanges per cell")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    port = free_port()
    anvil = subprocess.Popen([str(find_node_modules() / ANVIL_BIN), "--port", str(port), "--silent"])
    try:
        time.sleep(2)
        machine = machine_info()
        with event_loop_runner() as runner:
            rows = runner.run(run(args, f"http://127.0.0.1:{port}"))
    finally:
        anvil.terminate()
        anvil.wait(10)
    machine["loadavg_end"] = list(__import__("os").getloadavg())
    markdown = render(rows, machine, args)
    print(markdown)
    if not args.no_write:
        for path in write_results("rpc-transport", {"machine": machine, "rows": rows}, markdown):
            print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
