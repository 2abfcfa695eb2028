"""Gateway benchmark: paid calls per second and the gateway's added latency, compared in the same
run with a direct call to the upstream and with a bare aiohttp reverse proxy.

Processes (all on 127.0.0.1, each its own process, every one stopped by pid at the end):

- `python -m devtools.upstream` — the fast local stand-in upstream (uvloop + httptools);
- a bare reverse proxy (this file, `_serve-proxy`): Starlette + uvicorn (uvloop, httptools) with
  one aiohttp ClientSession, forwarding the POST body and returning the upstream's bytes — the
  gateway's own server and client stack without any payment logic;
- an instant facilitator stand-in (this file, `_serve-facilitator`): a raw ASGI app answering
  /verify `{"isValid": true, "payer": …}` and /settle `{"success": true, "transaction": "0xab…"}`
  without any work, so settlement costs (almost) nothing;
- `x402-gateway serve --facilitator-url <stand-in>` — the gateway's own ceiling ("instant");
- `x402-gateway serve --devchain FILE` — the gateway with its in-process facilitator verifying
  against and settling on anvil ("anvil"). Each repetition gets a fresh anvil (DevChain, started
  in this process) and a fresh gateway: anvil slows down as its chain grows.

Every paid call carries its own payment (a payment is served once): Permit2 payloads are signed
before timing with the facilitator's own EIP-712 digest and libsecp256k1 (one payload of the
official x402 client is checked against that digest first), round-robin over the dev chain's agents.

Added latency (concurrency 1) comes from the gateway's `Server-Timing` header
(`verify;dur=…, upstream;dur=…, settle;dur=…`): per call, added = total − upstream − settle
(verify counted as the gateway's own cost), and separately (median total − median settle) −
median direct-call latency, which also counts the gateway's client-side hop to the upstream.

Nothing here asserts a timing. Run: `.venv/bin/python loadtests/bench_gateway.py` (~2 min).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    HOST,
    ROOT,
    CpuMeter,
    event_loop_runner,
    fmt,
    install_sigterm_handler,
    machine_info,
    md_machine,
    md_table,
    median,
    now_iso,
    percentile,
    run_load,
    write_results,
)

CHAT = "/v1/chat/completions"
CHAT_BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello paid world"}]}).encode()
FAKE_TX = "0x" + "ab" * 32


# =============================================================================================
# Inline servers (run as subprocesses of this file)


def serve_proxy(port: int, upstream: str) -> None:
    """Bare reverse proxy: Starlette + uvicorn (uvloop, httptools) + one aiohttp ClientSession."""
    import aiohttp
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    state: dict[str, aiohttp.ClientSession] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        state["s"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=256, keepalive_timeout=30), auto_decompress=False)
        yield
        await state["s"].close()

    async def forward(request: Request) -> Response:
        body = await request.body()
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        async with state["s"].request(request.method, upstream + request.url.path, data=body, headers=headers) as r:
            content = await r.read()
            return Response(content, status_code=r.status, media_type=r.headers.get("content-type"))

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    app = Starlette(routes=[Route("/healthz", healthz), Route("/{path:path}", forward, methods=["POST"])],
                    lifespan=lifespan)
    uvicorn.run(app, host=HOST, port=port, loop="uvloop", http="httptools", access_log=False, log_level="warning")


def serve_facilitator(port: int) -> None:
    """Instant facilitator stand-in: raw ASGI, answers without checking or settling anything."""
    import orjson
    import uvicorn

    json_headers = [(b"content-type", b"application/json")]
    supported = orjson.dumps({"kinds": [], "extensions": [], "signers": {}})

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        path = scope["path"]
        if path in ("/verify", "/settle"):
            doc = orjson.loads(body)
            inner = doc.get("paymentPayload", {}).get("payload", {})
            payer = (inner.get("permit2Authorization") or inner.get("authorization") or {}).get("from")
            if path == "/verify":
                out = orjson.dumps({"isValid": True, "payer": payer})
            else:
                req = doc.get("paymentRequirements", {})
                out = orjson.dumps({"success": True, "transaction": FAKE_TX, "network": req.get("network"),
                                    "amount": req.get("amount"), "payer": payer})
        elif path == "/supported":
            out = supported
        else:
            out = b'{"status":"ok"}'
        await send({"type": "http.response.start", "status": 200, "headers": json_headers})
        await send({"type": "http.response.body", "body": out})

    uvicorn.run(app, host=HOST, port=port, loop="uvloop", http="httptools", lifespan="off", access_log=False,
                log_level="warning")


def serve_gateway_inproc(port: int, devchain_file: str, upstream: str, log_level: str, store: str = "memory://") -> None:
    """The gateway app exactly as `x402-gateway serve` runs it (same settings, uvicorn options),
    but with a FacilitatorClient stand-in passed to create_app that answers verify and settle at
    once, in-process: the gateway's own ceiling without any facilitator hop."""
    import uvicorn

    from devtools.devchain import load_description
    from devtools.devconfig import dev_settings
    from facilitator.logs import configure_logging
    from facilitator.x402.types import SettleResponse, VerifyResponse
    from gateway.app import create_app

    def payer_of(payload: Any) -> str | None:
        inner = payload.payload
        return (inner.get("permit2Authorization") or inner.get("authorization") or {}).get("from")

    class InstantFacilitator:
        async def verify(self, payload: Any, requirements: Any) -> VerifyResponse:
            return VerifyResponse(is_valid=True, payer=payer_of(payload))

        async def settle(self, payload: Any, requirements: Any) -> SettleResponse:
            return SettleResponse(success=True, transaction=FAKE_TX, network=requirements.network,
                                  amount=requirements.amount, payer=payer_of(payload))

        async def ready(self) -> bool:
            return True

        async def upto_signers(self) -> dict[str, str]:
            return {}

        async def close(self) -> None:
            return None

    settings = dev_settings(load_description(devchain_file), devchain_file=devchain_file, upstream_urls=[upstream],
                            store_url=store, port=port, facilitator_url="http://127.0.0.1:9/unused")
    settings = settings.model_copy(update={"log_level": log_level, "host": HOST})
    configure_logging(settings.log_level)
    uvicorn.run(create_app(settings, facilitator=InstantFacilitator()), host=HOST, port=port, loop="uvloop",
                http="httptools", log_level=log_level, access_log=False, timeout_graceful_shutdown=60)


# =============================================================================================
# Processes


def free_port() -> int:
    from devtools.devchain import free_port as _fp

    return _fp(HOST)


class Proc:
    """A subprocess answering GET `ready` on 127.0.0.1:`port`; stopped by pid (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], port: int, log_dir: Path, env: dict[str, str] | None = None,
                 ready: str = "/healthz") -> None:
        self.name, self.argv, self.port, self.ready = name, argv, port, ready
        self.env = dict(os.environ) | (env or {})
        self.log = log_dir / f"{name}-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout_s: float = 30.0) -> Proc:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=str(ROOT))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready, timeout=1.0) as r:
                    if r.status < 500:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer {self.ready} within {timeout_s} s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def upstream_proc(log_dir: Path) -> Proc:
    port = free_port()
    return Proc("devupstream", [sys.executable, "-m", "devtools.upstream", "--host", HOST, "--port", str(port),
                                "--log-level", "warning"], port, log_dir)


def proxy_proc(log_dir: Path, upstream_url: str) -> Proc:
    port = free_port()
    return Proc("bare-proxy", [sys.executable, str(Path(__file__).resolve()), "_serve-proxy", "--port", str(port),
                               "--upstream", upstream_url], port, log_dir)


def standin_proc(log_dir: Path) -> Proc:
    port = free_port()
    return Proc("instant-facilitator", [sys.executable, str(Path(__file__).resolve()), "_serve-facilitator",
                                        "--port", str(port)], port, log_dir)


def inproc_gateway_proc(log_dir: Path, devchain_file: str, upstream_url: str, log_level: str,
                        store: str = "memory://") -> Proc:
    port = free_port()
    name = "gateway-inproc-instant" + ("-redis" if store.startswith("redis") else "")
    return Proc(name, [sys.executable, str(Path(__file__).resolve()), "_serve-gateway-inproc",
                       "--port", str(port), "--devchain", devchain_file, "--upstream", upstream_url,
                       "--log-level", log_level, "--store", store], port, log_dir)


def gateway_proc(log_dir: Path, name: str, devchain_file: str, *, upstream_url: str | None = None,
                 facilitator_url: str | None = None, config: str | None = None, log_level: str = "info",
                 env: dict[str, str] | None = None) -> Proc:
    port = free_port()
    exe = str(Path(sys.executable).with_name("x402-gateway"))
    argv = [exe, "serve", "--devchain", devchain_file, "--host", HOST, "--port", str(port), "--store", "memory://"]
    argv += ["--config", config] if config else ["--upstream", upstream_url or ""]
    if facilitator_url:
        argv += ["--facilitator-url", facilitator_url]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FACILITATOR_", "GATEWAY_"))}
    base |= {"FACILITATOR_STORE_URL": "memory://", "GATEWAY_LOG_LEVEL": log_level}
    p = Proc(name, argv, port, log_dir, ready="/healthz")
    p.env = base | (env or {})
    return p


# =============================================================================================
# Payments: Permit2 payloads signed before timing


class PaymentSigner:
    """PAYMENT-SIGNATURE header values for one offered requirement (wire dict), each with its own
    random Permit2 nonce, round-robin over `keys`. Digest: facilitator.evm.eip712 (the verify path's
    own code); signature: coincurve (libsecp256k1, low-s)."""

    def __init__(self, devchain: dict[str, Any], accepted: dict[str, Any], resource_url: str, keys: list[str]) -> None:
        import coincurve

        from facilitator.evm.eip712 import address_bytes

        self.devchain, self.accepted, self.resource_url = devchain, accepted, resource_url
        self.keys = [coincurve.PrivateKey(bytes.fromhex(k.removeprefix("0x"))) for k in keys]
        self.addresses = [a["address"] for a in devchain["accounts"]["agents"]][: len(keys)]
        self.spender = devchain["contracts"]["exact_proxy"]
        self._ab = address_bytes
        self.n = 0

    def sign(self, count: int, *, deadline_s: int = 900) -> list[str]:
        from facilitator.evm.eip712 import permit2_witness_digest
        from facilitator.x402.headers import encode_payment_payload
        from facilitator.x402.types import PaymentPayload

        ab = self._ab
        acc = self.accepted
        deadline = int(time.time()) + deadline_s
        amount = int(acc["amount"])
        token_b, to_b, spender_b = ab(acc["asset"]), ab(acc["payTo"]), ab(self.spender)
        permit2_b = ab(self.devchain["contracts"]["permit2"])
        out = []
        for _ in range(count):
            i = self.n % len(self.keys)
            self.n += 1
            nonce = int.from_bytes(secrets.token_bytes(32), "big")
            digest = permit2_witness_digest(chain_id=self.devchain["chain_id"], permit2=permit2_b, token=token_b,
                                            amount=amount, spender=spender_b, nonce=nonce, deadline=deadline,
                                            to=to_b, valid_after=0)
            sig = self.keys[i].sign_recoverable(digest, hasher=None)
            wire = {
                "x402Version": 2,
                "payload": {
                    "permit2Authorization": {
                        "from": self.addresses[i],
                        "permitted": {"token": acc["asset"], "amount": str(amount)},
                        "spender": self.spender,
                        "nonce": str(nonce),
                        "deadline": str(deadline),
                        "witness": {"to": acc["payTo"], "validAfter": "0"},
                    },
                    "signature": "0x" + (sig[:64] + bytes((sig[64] + 27,))).hex(),
                },
                "accepted": acc,
                "resource": {"url": self.resource_url},
            }
            out.append(encode_payment_payload(PaymentPayload.model_validate(wire)))
        return out


async def check_signing_against_official_client(devchain: dict[str, Any], accepted: dict[str, Any]) -> str:
    """Sign one payload with the official x402 client and recover its signer through the digest
    PaymentSigner uses: they must agree, or our payloads would not be what a real agent sends."""
    from payments import sign_async

    from facilitator.evm.eip712 import address_bytes, permit2_witness_digest, recover_signer

    wire = await sign_async(devchain, accepted, agent=0)
    auth = wire["payload"]["permit2Authorization"]
    digest = permit2_witness_digest(
        chain_id=devchain["chain_id"], permit2=address_bytes(devchain["contracts"]["permit2"]),
        token=address_bytes(auth["permitted"]["token"]), amount=int(auth["permitted"]["amount"]),
        spender=address_bytes(auth["spender"]), nonce=int(auth["nonce"]), deadline=int(auth["deadline"]),
        to=address_bytes(auth["witness"]["to"]), valid_after=int(auth["witness"]["validAfter"]))
    signer = "0x" + recover_signer(digest, bytes.fromhex(wire["payload"]["signature"][2:])).hex()
    agent = devchain["accounts"]["agents"][0]["address"]
    if signer.lower() != agent.lower() or auth["spender"].lower() != devchain["contracts"]["exact_proxy"].lower():
        raise RuntimeError(f"official client payload does not match our digest: {signer} vs {agent}")
    return "the official x402 client's Permit2 payload recovers to the agent through our digest: yes"


def offered_requirement(gateway_url: str, symbol_asset: str) -> tuple[dict[str, Any], str]:
    """(the requirement the gateway's 402 offers for `symbol_asset`, the resource URL)."""
    from facilitator.x402.headers import decode_payment_required

    req = urllib.request.Request(gateway_url + CHAT, data=CHAT_BODY, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=10)
        raise RuntimeError("the gateway served an unpaid call")
    except urllib.error.HTTPError as exc:
        if exc.code != 402:
            raise
        required = decode_payment_required(exc.headers["PAYMENT-REQUIRED"])
    for a in required.accepts:
        if a.asset.lower() == symbol_asset.lower():
            return a.model_dump(by_alias=True, exclude_none=True), required.resource.url if required.resource else ""
    raise RuntimeError("no offer in the asset")


class PaymentPool:
    """Pre-signed payments, consumed once each. `ensure(n)` signs (untimed) until n are ready."""

    def __init__(self, signer: PaymentSigner) -> None:
        self.signer = signer
        self.ready: list[str] = []
        self.used = 0

    def ensure(self, n: int) -> None:
        if len(self.ready) < n:
            self.ready.extend(self.signer.sign(n - len(self.ready)))

    def take(self, n: int) -> Iterator[str]:
        """Up to n payments, handed out lazily: what a run does not consume stays in the pool."""
        self.ensure(n)

        def gen() -> Iterator[str]:
            for _ in range(n):
                if not self.ready:
                    return
                self.used += 1
                yield self.ready.pop()

        return gen()


# =============================================================================================
# Load


def parse_server_timing(value: str | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in (value or "").split(","):
        name, _, rest = part.strip().partition(";dur=")
        if rest:
            with contextlib.suppress(ValueError):
                out[name] = float(rest)
    return out


@dataclass
class Target:
    name: str
    url: str
    paid: bool
    pool: PaymentPool | None = None
    pids: dict[str, int | None] = field(default_factory=dict)


@dataclass
class RunOutcome:
    summary: dict[str, Any]
    samples: list[tuple[float, dict[str, float]]]  # (client latency ms, Server-Timing ms) of ok paid calls
    first_errors: dict[str, str]


async def measure(target: Target, concurrency: int, *, max_ops: int, max_seconds: float, warmup: int,
                  pause_s: float = 0.0) -> RunOutcome:
    """`pause_s` > 0: each worker waits that long after every call (an agent calling now and then:
    the processes go idle between calls); latencies then exclude the pause."""
    import aiohttp

    base_headers = {"Content-Type": "application/json"}
    samples: list[tuple[float, dict[str, float]]] = []
    lat_ms: list[float] = []
    first_errors: dict[str, str] = {}
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def op(header: str | None, record: bool = True) -> tuple[bool, str]:
            headers = base_headers if header is None else {**base_headers, "PAYMENT-SIGNATURE": header}
            t0 = time.perf_counter()
            async with http.post(target.url, data=CHAT_BODY, headers=headers) as r:
                body = await r.read()
                status, st = r.status, r.headers.get("Server-Timing")
            dt_ms = (time.perf_counter() - t0) * 1e3
            if record:
                lat_ms.append(dt_ms)
            if pause_s and record:
                await asyncio.sleep(pause_s)
            if status != 200:
                reason = f"http_{status}"
                first_errors.setdefault(reason, body[:300].decode(errors="replace"))
                return False, reason
            if target.paid and record:
                samples.append((dt_ms, parse_server_timing(st)))
            return True, ""

        def items(n: int) -> Iterator[str | None]:
            if target.pool is not None:
                return target.pool.take(n)
            return iter([None] * n)

        if warmup:
            await asyncio.gather(*(op(h, False) for h in items(warmup)))
            first_errors.clear()
        res = await run_load(op, items(max_ops), concurrency=concurrency, max_ops=max_ops, max_seconds=max_seconds,
                             cpu=CpuMeter(target.pids))
    summary = res.summary()
    if pause_s:  # latency without the pauses; a rate means nothing here
        summary |= {"p50_ms": round(percentile(lat_ms, 50), 4), "p99_ms": round(percentile(lat_ms, 99), 4),
                    "ops_per_s": float("nan"), "pause_ms": pause_s * 1e3}
    return RunOutcome(summary, samples, first_errors)


def added_latency(samples: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Per call: added = total − upstream − settle (verify counted); p50/p99 and the parts' p50s."""
    if not samples:
        return {}
    tot = [s[0] for s in samples]
    add = [s[0] - s[1].get("upstream", 0.0) - s[1].get("settle", 0.0) for s in samples]
    add_nv = [a - s[1].get("verify", 0.0) for a, s in zip(add, samples, strict=True)]
    no_settle = [s[0] - s[1].get("settle", 0.0) for s in samples]
    part = lambda k: percentile([s[1].get(k, float("nan")) for s in samples], 50)  # noqa: E731
    return {
        "n": len(samples),
        "total_p50_ms": percentile(tot, 50), "total_p99_ms": percentile(tot, 99),
        "added_p50_ms": percentile(add, 50), "added_p99_ms": percentile(add, 99),
        "added_excl_verify_p50_ms": percentile(add_nv, 50), "added_excl_verify_p99_ms": percentile(add_nv, 99),
        "total_minus_settle_p50_ms": percentile(no_settle, 50), "total_minus_settle_p99_ms": percentile(no_settle, 99),
        "verify_p50_ms": part("verify"), "upstream_p50_ms": part("upstream"), "settle_p50_ms": part("settle"),
    }


# =============================================================================================
# The benchmark


def pyspy_path() -> str | None:
    import shutil

    return shutil.which(os.environ.get("PY_SPY", "py-spy"))


def start_chain(agents: int) -> Any:
    from devtools.devchain import DevChain

    chain = DevChain(agents=agents)
    chain.start()
    return chain


def same_deployment(a: dict[str, Any], b: dict[str, Any]) -> bool:
    strip = lambda d: {k: v for k, v in d.items() if k != "rpc_url"}  # noqa: E731
    return strip(a) == strip(b)


async def run_benchmark(args: argparse.Namespace, log_dir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    concs = [int(c) for c in args.conc.split(",")]
    t_start = time.monotonic()
    chain = start_chain(args.agents)
    stack.callback(lambda: chain.stop())
    devchain = chain.description
    dc_file = str(log_dir / "devchain-0.json")
    Path(dc_file).write_text(json.dumps(devchain))
    keys = [a["private_key"] for a in devchain["accounts"]["agents"]]

    up = upstream_proc(log_dir).start()
    stack.callback(up.stop)
    proxy = proxy_proc(log_dir, up.url).start()
    stack.callback(proxy.stop)
    fac = standin_proc(log_dir).start()
    stack.callback(fac.stop)
    gw_i = gateway_proc(log_dir, "gateway-instant", dc_file, upstream_url=up.url, facilitator_url=fac.url,
                        log_level=args.log_level).start()
    stack.callback(gw_i.stop)
    gw_p = inproc_gateway_proc(log_dir, dc_file, up.url, args.log_level).start()
    stack.callback(gw_p.stop)
    # The same with its records, intents and refusals on a private Redis: what a replicated
    # deployment runs (each of them a script on one multiplexed connection, storage/resp.py).
    from bench_budgets import RedisProc

    redis = RedisProc(log_dir).start()
    stack.callback(redis.stop)
    gw_r = inproc_gateway_proc(log_dir, dc_file, up.url, args.log_level, store=redis.url).start()
    stack.callback(gw_r.stop)

    opg = devchain["tokens"]["OPG"]["address"]
    accepted, resource = offered_requirement(gw_i.url, opg)
    sign_check = await check_signing_against_official_client(devchain, accepted)
    pool_i = PaymentPool(PaymentSigner(devchain, accepted, resource, keys))
    pool_a = PaymentPool(PaymentSigner(devchain, accepted, resource, keys))
    pool_p = PaymentPool(PaymentSigner(devchain, accepted, resource, keys))
    pool_r = PaymentPool(PaymentSigner(devchain, accepted, resource, keys))
    t0 = time.perf_counter()
    pool_i.ensure(1000)
    sign_us = (time.perf_counter() - t0) / 1000 * 1e6

    runs: list[dict[str, Any]] = []
    paced: list[dict[str, Any]] = []
    lat: dict[str, list[dict[str, float]]] = {}
    chain_used = chain
    for rep in range(args.reps):
        if rep > 0:  # fresh anvil (and gateway) per repetition: anvil slows down as its chain grows
            chain_used = start_chain(args.agents)
            stack.callback(chain_used.stop)
            if not same_deployment(chain_used.description, devchain):
                raise RuntimeError("a fresh dev chain has another deployment; payments would not be valid")
        dc_rep = str(log_dir / f"devchain-{rep}.json")
        Path(dc_rep).write_text(json.dumps(chain_used.description))
        gw_a = gateway_proc(log_dir, f"gateway-anvil-{rep}", dc_rep, upstream_url=up.url, log_level=args.log_level)
        gw_a.start()
        stack.callback(gw_a.stop)
        common = {"client": None, "upstream": up.pid}
        targets = [
            Target("direct", up.url + CHAT, False, None, dict(common)),
            Target("bare_proxy", proxy.url + CHAT, False, None, common | {"proxy": proxy.pid}),
            Target("gateway_inproc", gw_p.url + CHAT, True, pool_p, common | {"gateway": gw_p.pid}),
            Target("gateway_redis", gw_r.url + CHAT, True, pool_r, common | {"gateway": gw_r.pid, "redis": redis.pid}),
            Target("gateway_instant", gw_i.url + CHAT, True, pool_i,
                   common | {"gateway": gw_i.pid, "facilitator_standin": fac.pid}),
            Target("gateway_anvil", gw_a.url + CHAT, True, pool_a,
                   common | {"gateway": gw_a.pid, "anvil": chain_used.pid}),
        ]
        targets = [t for t in targets if args.targets is None or t.name in args.targets.split(",")]
        order = targets[rep % len(targets):] + targets[: rep % len(targets)]
        for conc in concs:
            for t in order:
                anvil = t.name == "gateway_anvil"
                if conc == 1:
                    n = args.lat_n_anvil if anvil else args.lat_n
                    seconds = args.seconds * 3
                else:
                    n = args.tp_max_anvil if anvil else args.tp_max
                    seconds = args.seconds
                warm = 10 if conc == 1 else 2 * conc
                if t.pool is not None:
                    t.pool.ensure(n + warm)
                out = await measure(t, conc, max_ops=n, max_seconds=seconds, warmup=warm)
                row = {"rep": rep, "target": t.name, "concurrency": conc, **out.summary}
                if out.first_errors:
                    row["first_errors"] = out.first_errors
                if conc == 1 and t.paid:
                    row["added"] = added_latency(out.samples)
                    lat.setdefault(t.name, []).append(row["added"])
                runs.append(row)
                print(f"rep {rep} c={conc:<3} {t.name:<16} {row['ops_per_s']:>9,.1f}/s p50 {row['p50_ms']:.2f} ms "
                      f"p99 {row['p99_ms']:.2f} ms ok {row['ok']}/{row['ops']}"
                      + (f" failures {row['failures']}" if row["failures"] else ""), flush=True)
        if args.paced_n:
            for t in order:
                n = min(args.paced_n, args.lat_n_anvil) if t.name == "gateway_anvil" else args.paced_n
                if t.pool is not None:
                    t.pool.ensure(n + 5)
                out = await measure(t, 1, max_ops=n, max_seconds=args.seconds * 4, warmup=5,
                                    pause_s=args.paced_ms / 1e3)
                row = {"rep": rep, "target": t.name, "concurrency": 1, **out.summary}
                if out.first_errors:
                    row["first_errors"] = out.first_errors
                if t.paid:
                    row["added"] = added_latency(out.samples)
                paced.append(row)
                print(f"rep {rep} paced {args.paced_ms:g} ms {t.name:<16} p50 {row['p50_ms']:.2f} ms "
                      f"p99 {row['p99_ms']:.2f} ms ok {row['ok']}/{row['ops']}", flush=True)
        gw_a.stop()
        if rep > 0:
            chain_used.stop()

    profiles = None
    if args.profile:
        profiles = await profile_gateways(args, log_dir, stack, {"gateway_inproc": (gw_p, pool_p),
                                                                  "gateway_redis": (gw_r, pool_r),
                                                                  "gateway_instant": (gw_i, pool_i)}, accepted, resource,
                                          devchain, keys, up)

    return {
        "runs": runs, "paced_runs": paced, "sign_us_per_payment": sign_us, "signing_check": sign_check, "accepted": accepted,
        "payments_used": {"gateway_inproc": pool_p.used,
                          "gateway_redis": pool_r.used, "gateway_instant": pool_i.used, "gateway_anvil": pool_a.used},
        "profiles": profiles, "elapsed_s": time.monotonic() - t_start,
    }


async def _spy(spy: str, pid: int, out: Path, seconds: int, load: Any) -> None:
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "500", "--duration", str(seconds),
                             "--format", "raw", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await asyncio.sleep(0.5)
        await load
        proc.wait(timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)


async def profile_gateways(args: argparse.Namespace, log_dir: Path, stack: contextlib.ExitStack,
                           gateways: dict[str, tuple[Proc, PaymentPool]], accepted: dict[str, Any], resource: str,
                           devchain: dict[str, Any], keys: list[str], up: Proc) -> dict[str, str] | None:
    """py-spy (sampling, 500 Hz, collapsed stacks) of each gateway during one extra, unreported run at
    concurrency 16: the instant ones, then an anvil one on a fresh chain."""
    spy = pyspy_path()
    if spy is None:
        print("py-spy not found; no profile", file=sys.stderr)
        return None
    out = Path(args.profile).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seconds = max(3, int(args.seconds * 2))
    files: dict[str, str] = {}
    for name, (gw, pool) in gateways.items():
        pool.ensure(args.tp_max)
        path = out / f"profile-{name}-c16.txt"
        await _spy(spy, gw.pid, path, seconds, measure(Target(name, gw.url + CHAT, True, pool, {}), 16,
                                                        max_ops=args.tp_max, max_seconds=seconds, warmup=0))
        files[name] = str(path)
    chain = start_chain(args.agents)
    stack.callback(chain.stop)
    dc = str(log_dir / "devchain-profile.json")
    Path(dc).write_text(json.dumps(chain.description))
    gw = gateway_proc(log_dir, "gateway-anvil-profile", dc, upstream_url=up.url, log_level=args.log_level).start()
    stack.callback(gw.stop)
    pool = PaymentPool(PaymentSigner(devchain, accepted, resource, keys))
    pool.ensure(1000)
    path = out / "profile-gateway_anvil-c16.txt"
    await _spy(spy, gw.pid, path, seconds, measure(Target("gateway_anvil", gw.url + CHAT, True, pool, {}), 16,
                                                    max_ops=1000, max_seconds=seconds, warmup=0))
    files["gateway_anvil"] = str(path)
    gw.stop()
    chain.stop()
    return files


# =============================================================================================
# Report

TARGETS = ["direct", "bare_proxy", "gateway_inproc", "gateway_redis", "gateway_instant", "gateway_anvil"]
GATEWAYS = ["gateway_inproc", "gateway_redis", "gateway_instant", "gateway_anvil"]
LABEL = {"direct": "direct to upstream", "bare_proxy": "bare aiohttp proxy",
         "gateway_inproc": "gateway, instant facilitator in-process",
         "gateway_redis": "gateway, instant facilitator in-process, records on Redis",
         "gateway_instant": "gateway, instant facilitator over HTTP (`--facilitator-url`)",
         "gateway_anvil": "gateway, in-process facilitator on anvil (real verify + settlement)"}


def _agg(runs: list[dict[str, Any]], target: str, conc: int, key: str) -> float:
    return median(r[key] for r in runs if r["target"] == target and r["concurrency"] == conc)


def _cpu(runs: list[dict[str, Any]], target: str, conc: int, proc: str) -> float:
    vals = [r["cpu_us_per_op"].get(proc) for r in runs if r["target"] == target and r["concurrency"] == conc]
    return median(float("nan") if v is None else v for v in vals)


def _ratio_per_rep(runs: list[dict[str, Any]], a: str, b: str, conc: int, key: str = "ops_per_s") -> list[float]:
    out = []
    for rep in sorted({r["rep"] for r in runs}):
        ra = [r[key] for r in runs if r["rep"] == rep and r["target"] == a and r["concurrency"] == conc]
        rb = [r[key] for r in runs if r["rep"] == rep and r["target"] == b and r["concurrency"] == conc]
        if ra and rb and rb[0]:
            out.append(ra[0] / rb[0])
    return out


def summarize(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    runs = result["runs"]
    concs = [int(c) for c in args.conc.split(",")]
    table = []
    for conc in concs:
        for t in TARGETS:
            sel = [r for r in runs if r["target"] == t and r["concurrency"] == conc]
            if not sel:
                continue
            table.append({
                "target": t, "concurrency": conc, "reps": len(sel),
                "ops_per_s": _agg(runs, t, conc, "ops_per_s"), "p50_ms": _agg(runs, t, conc, "p50_ms"),
                "p99_ms": _agg(runs, t, conc, "p99_ms"),
                "ok": sum(r["ok"] for r in sel), "ops": sum(r["ops"] for r in sel),
                "cpu_us_per_call": {p: _cpu(runs, t, conc, p) for p in
                                    ("client", "upstream", "proxy", "gateway", "redis", "facilitator_standin", "anvil")
                                    if any(p in r["cpu_us_per_op"] for r in sel)},
            })
    added: dict[str, dict[str, Any]] = {}
    direct_p50 = _agg(runs, "direct", 1, "p50_ms")
    proxy_p50 = _agg(runs, "bare_proxy", 1, "p50_ms")
    for t in GATEWAYS:
        reps = [r for r in runs if r["target"] == t and r["concurrency"] == 1 and r.get("added")]
        if not reps:
            continue
        med: dict[str, Any] = {k: median(x["added"][k] for x in reps) for k in reps[0]["added"]}
        per = []
        for r in reps:
            d = [x["p50_ms"] for x in runs if x["target"] == "direct" and x["concurrency"] == 1 and x["rep"] == r["rep"]]
            if d:
                per.append(r["added"]["total_minus_settle_p50_ms"] - d[0])
        med["minus_direct_p50_ms"] = median(per)
        med["minus_direct_per_rep"] = per
        med["added_p50_per_rep"] = [r["added"]["added_p50_ms"] for r in reps]
        added[t] = med
    paced_added: dict[str, dict[str, Any]] = {}
    pr = result.get("paced_runs") or []
    for t in GATEWAYS:
        reps = [r for r in pr if r["target"] == t and r.get("added")]
        if not reps:
            continue
        med = {k: median(x["added"][k] for x in reps) for k in reps[0]["added"]}
        per = []
        for r in reps:
            d = [x["p50_ms"] for x in pr if x["target"] == "direct" and x["rep"] == r["rep"]]
            if d:
                per.append(r["added"]["total_minus_settle_p50_ms"] - d[0])
        med["minus_direct_p50_ms"] = median(per)
        med["minus_direct_per_rep"] = per
        paced_added[t] = med
    paced_table = [{"target": t, "p50_ms": median(r["p50_ms"] for r in pr if r["target"] == t),
                    "p99_ms": median(r["p99_ms"] for r in pr if r["target"] == t)}
                   for t in TARGETS if any(r["target"] == t for r in pr)]
    ratios: dict[str, dict[str, Any]] = {}
    for conc in concs:
        if conc == 1:
            continue
        for t in GATEWAYS:
            per = _ratio_per_rep(runs, t, "bare_proxy", conc)
            ratios[f"{t} / bare_proxy, concurrency {conc}"] = {"per_rep": per, "median": median(per)}
        per = _ratio_per_rep(runs, "bare_proxy", "direct", conc)
        ratios[f"bare_proxy / direct, concurrency {conc}"] = {"per_rep": per, "median": median(per)}
    cpu: dict[str, dict[str, float]] = {}
    for conc in concs:
        if conc == 1:
            continue
        px = _cpu(runs, "bare_proxy", conc, "proxy")
        for t in ("gateway_inproc", "gateway_redis", "gateway_instant"):
            gw = _cpu(runs, t, conc, "gateway")
            cpu[f"{t}, concurrency {conc}"] = {"gateway_us": gw, "proxy_us": px,
                                               "proxy_over_gateway": px / gw if gw == gw and gw else float("nan")}
    return {"table": table, "added": added, "paced_added": paced_added, "paced_table": paced_table,
            "ratios": ratios, "cpu": cpu, "direct_p50_ms": direct_p50,
            "bare_proxy_added_p50_ms": proxy_p50 - direct_p50}


def render(data: dict[str, Any], args: argparse.Namespace) -> str:
    s, m, res = data["summary"], data["machine"], data["result"]
    runs = res["runs"]
    concs = [int(c) for c in args.conc.split(",") if int(c) != 1]
    rows = []
    for r in s["table"]:
        cpu = ", ".join(f"{k.replace('facilitator_standin', 'stand-in')} {fmt(v)}" for k, v in r["cpu_us_per_call"].items()
                        if v == v)
        rows.append([LABEL[r["target"]], r["concurrency"], fmt(r["ops_per_s"]), fmt(r["p50_ms"], 2), fmt(r["p99_ms"], 2),
                     f"{r['ok']}/{r['ops']}", cpu])
    lines = [
        f"### Gateway benchmark — {data['finished']}", "",
        f"`loadtests/bench_gateway.py {' '.join(sys.argv[1:])}` — {data['elapsed_s']:.0f} s. "
        f"{args.reps} repetitions, medians shown (each repetition runs every target back to back, the order rotated "
        f"between repetitions). {args.agents} agents; one uvicorn worker (uvloop + httptools) per server; gateway log "
        f"level `{args.log_level}`; gateway records `memory://` (SQLite in memory), except \"records on Redis\": "
        "records, intents and refusals on a private redis-server (`--save \"\" --appendonly no`), whose CPU is "
        "counted. Load: an aiohttp client in the "
        "benchmark process.",
        "",
        "#### Machine", "", md_machine(m), "",
        "#### Throughput and latency", "",
        "Latency is measured by the client (request sent → whole response read). Concurrency-1 runs make "
        f"{args.lat_n} calls ({args.lat_n_anvil} with anvil); the others are bounded by {args.seconds:g} s and "
        f"{args.tp_max} calls ({args.tp_max_anvil} with anvil). CPU is µs of CPU per call of each process during "
        "the run (from /proc).", "",
        md_table(["target", "concurrency", "calls/s", "p50 ms", "p99 ms", "ok", "CPU µs/call"], rows), "",
        "#### Added latency at concurrency 1, settlement excluded", "",
        "Per paid call, from its `Server-Timing`: added = client-measured total − upstream − settle; verify and all "
        "the gateway's other work count as added. \"total − settle − direct\" is the median of (total − settle) "
        "minus the median direct-call latency of the same repetition (it also counts the gateway's client hop to "
        "the upstream). Medians over repetitions.", "",
    ]
    arow = []
    for t, a in s["added"].items():
        arow.append([LABEL[t], fmt(a["added_p50_ms"], 3), fmt(a["added_p99_ms"], 3),
                     fmt(a["added_excl_verify_p50_ms"], 3), fmt(a["verify_p50_ms"], 3),
                     fmt(a["minus_direct_p50_ms"], 3), fmt(a["upstream_p50_ms"], 3), fmt(a["settle_p50_ms"], 3),
                     fmt(a["total_p50_ms"], 3)])
    lines += [md_table(["gateway", "added p50 ms", "added p99 ms", "added excl. verify p50 ms", "verify p50 ms",
                        "total − settle − direct p50 ms", "upstream p50 ms", "settle p50 ms", "total p50 ms"], arow), "",
              f"For reference: direct call p50 {fmt(s['direct_p50_ms'], 3)} ms; the bare proxy adds "
              f"{fmt(s['bare_proxy_added_p50_ms'], 3)} ms (its p50 − the direct p50).", ""]
    if s.get("paced_added"):
        prow = [[LABEL[t], fmt(a["added_p50_ms"], 3), fmt(a["added_p99_ms"], 3), fmt(a["verify_p50_ms"], 3),
                 fmt(a["minus_direct_p50_ms"], 3), fmt(a["total_p50_ms"], 3)] for t, a in s["paced_added"].items()]
        ref = ", ".join(f"{LABEL[r['target']]} p50 {fmt(r['p50_ms'], 3)} ms" for r in s["paced_table"]
                        if r["target"] in ("direct", "bare_proxy"))
        lines += [f"Paced: the same at concurrency 1 with a {args.paced_ms:g} ms pause after every call "
                  f"({args.paced_n} calls; {min(args.paced_n, args.lat_n_anvil)} with anvil), as an agent calling now "
                  "and then would see it: between calls every process goes idle, and on this VM waking up costs "
                  f"time at every hop. For reference: {ref}.", "",
                  md_table(["gateway (paced)", "added p50 ms", "added p99 ms", "verify p50 ms",
                            "total − settle − direct p50 ms", "total p50 ms"], prow), ""]
    lines += [
              "#### Throughput relative to the bare proxy (same run)", "",
              "Median of the per-repetition ratios of calls/s.", ""]
    rrows = [[k, f"{v['median']:.2f}", ", ".join(f"{x:.2f}" for x in v["per_rep"])] for k, v in s["ratios"].items()]
    lines += [md_table(["ratio", "median", "per repetition"], rrows), "",
              "CPU per call of the server process alone (what each would sustain on a core of its own; on this "
              "2-core machine the client, the upstream and the stand-ins take CPU from whichever server is measured):",
              ""]
    crow = [[k, fmt(v["gateway_us"]), fmt(v["proxy_us"]), f"{v['proxy_over_gateway']:.2f}",
             fmt(1e6 / v["gateway_us"]) if v["gateway_us"] == v["gateway_us"] and v["gateway_us"] else "n/a"]
            for k, v in s["cpu"].items()]
    lines += [md_table(["gateway", "gateway CPU µs/call", "bare proxy CPU µs/call", "proxy ÷ gateway",
                        "gateway calls/s per core (1e6 ÷ CPU µs)"], crow), ""]

    trows = []
    for t, what in (("gateway_anvil", "in-process facilitator on anvil, verify counted"),
                    ("gateway_instant", "instant facilitator over HTTP, its verify hop counted"),
                    ("gateway_inproc", "instant facilitator in-process")):
        for mode, src in (("back to back", s["added"]), (f"paced {args.paced_ms:g} ms", s.get("paced_added") or {})):
            a = src.get(t)
            if a:
                met = a["added_p50_ms"] < 2 and a["minus_direct_p50_ms"] < 2
                trows.append([f"p50 added < 2 ms, settlement excluded ({what}; {mode})",
                              f"{fmt(a['added_p50_ms'], 2)} ms (total − settle − direct: "
                              f"{fmt(a['minus_direct_p50_ms'], 2)} ms)", "yes" if met else "**no**"])
    for t, what in (("gateway_instant", "settlement negligible: instant facilitator over HTTP, as the issue asks"),
                    ("gateway_inproc", "instant facilitator in-process, no facilitator hop")):
        for conc in concs:
            r = s["ratios"].get(f"{t} / bare_proxy, concurrency {conc}")
            if r:
                trows.append([f"≥ 50 % of the bare proxy's throughput ({what}; concurrency {conc})",
                              f"{r['median'] * 100:.0f} % ({fmt(_agg(runs, t, conc, 'ops_per_s'))} vs "
                              f"{fmt(_agg(runs, 'bare_proxy', conc, 'ops_per_s'))} calls/s)",
                              "yes" if r["median"] >= 0.5 else "**no**"])
    for conc in concs:
        r = s["ratios"].get(f"gateway_anvil / bare_proxy, concurrency {conc}")
        if r:
            trows.append([f"(information) end to end with real settlement on anvil, concurrency {conc}",
                          f"{r['median'] * 100:.0f} % of the bare proxy ({fmt(_agg(runs, 'gateway_anvil', conc, 'ops_per_s'))}"
                          " calls/s)", "—"])
    pu = res["payments_used"]
    lines += ["#### Targets", "", md_table(["target", "measured", "met"], trows), "",
              "#### Notes", "",
              f"- Payments: {pu['gateway_inproc']:,} + {pu['gateway_instant']:,} + {pu['gateway_anvil']:,} distinct "
              f"Permit2 payloads (in-process instant, instant over HTTP, anvil), signed before timing "
              f"({res['sign_us_per_payment']:.0f} µs each including the header encoding); {res['signing_check']}.",
              "- The anvil gateway verifies each payment against anvil (one JSON-RPC batch) and settles it there "
              "(automine) with the dev chain's 3 signer keys; every repetition has a fresh anvil and gateway.",
              "- \"Instant facilitator over HTTP\" is `x402-gateway serve --facilitator-url` pointed at a raw ASGI "
              "stand-in that answers /verify and /settle without work; \"in-process\" is the same gateway app "
              "(create_app with the dev settings, same uvicorn options) given a FacilitatorClient stand-in that "
              "returns at once. Neither adds code to the project.",
              "- `settle` in Server-Timing spans the facilitator's settle call, the record save and (with budgets) the "
              "budget commit; all of it is excluded from \"added\".", ""]
    if res.get("profiles"):
        lines += ["- py-spy collapsed stacks (concurrency 16, extra unreported runs): "
                  + ", ".join(f"`{v}`" for v in res["profiles"].values()), ""]
    return "\n".join(lines)


# =============================================================================================


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_serve-proxy", "_serve-facilitator", "_serve-gateway-inproc"):
        p = argparse.ArgumentParser()
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--upstream")
        p.add_argument("--devchain")
        p.add_argument("--log-level", default="info")
        p.add_argument("--store", default="memory://")
        a = p.parse_args(argv[1:])
        if argv[0] == "_serve-proxy":
            serve_proxy(a.port, a.upstream)
        elif argv[0] == "_serve-facilitator":
            serve_facilitator(a.port)
        else:
            serve_gateway_inproc(a.port, a.devchain, a.upstream, a.log_level, a.store)
        return 0

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--conc", default="1,16,32", help="concurrency levels (1 = unloaded latency)")
    p.add_argument("--seconds", type=float, default=3.0, help="time bound of each throughput run")
    p.add_argument("--lat-n", type=int, default=300, help="calls per concurrency-1 run")
    p.add_argument("--lat-n-anvil", type=int, default=100, help="calls per concurrency-1 run with anvil settlement")
    p.add_argument("--tp-max", type=int, default=8000, help="count bound of each throughput run")
    p.add_argument("--tp-max-anvil", type=int, default=400, help="count bound of each throughput run with anvil")
    p.add_argument("--paced-n", type=int, default=100, help="calls per paced concurrency-1 run (0: none)")
    p.add_argument("--paced-ms", type=float, default=10.0, help="pause after each call in paced runs")
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--log-level", default="info", help="gateway log level (info is the default of `serve`)")
    p.add_argument("--targets", help=f"only these targets (comma-separated: {','.join(TARGETS)}); a quick look, "
                   "not a recorded result")
    p.add_argument("--profile", metavar="DIR", help="also py-spy the instant gateway at concurrency 16 into DIR")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    install_sigterm_handler()
    machine = machine_info()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="x402-bench-gw-") as tmp, contextlib.ExitStack() as stack:
        log_dir = Path(tmp)
        with event_loop_runner() as runner:
            result = runner.run(run_benchmark(args, log_dir, stack))
        stack.close()
    machine["loadavg_end"] = list(os.getloadavg())
    data = {"kind": "gateway", "finished": now_iso(), "elapsed_s": time.monotonic() - started, "args": vars(args),
            "machine": machine, "result": result}
    data["summary"] = summarize(result, args)
    md = render(data, args)
    print(md)
    if not args.no_write:
        for path in write_results("gateway", data, md + "\n"):
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
