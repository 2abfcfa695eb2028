"""Helpers for the gateway's end-to-end tests: an agent that pays by hand (so tests can pick the
asset, replay, tamper and race), upstream/facilitator counters, and processes for module-wide fixtures."""

from __future__ import annotations

import base64
import copy
import json
import os
import sys
import urllib.request
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from devtools.rpc import BlockingRpc
from facilitator.x402.headers import decode_payment_required, decode_payment_response, encode_payment_payload
from facilitator.x402.types import PaymentPayload, PaymentRequired, SettleResponse
from tests.conftest import ServiceProcess, _port
from tests.payments import balance_of, sign_async

CHAT = "/v1/chat/completions"
CHAT_BODY: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello paid world"}]}
CHAT_PRICE = {"OPG": 5 * 10**15, "USDC": 5_000}  # gpt-4o-mini: 0.005


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def settle(self) -> SettleResponse | None:
        value = self.headers.get("PAYMENT-RESPONSE")
        return decode_payment_response(value) if value else None

    @property
    def required(self) -> PaymentRequired | None:
        value = self.headers.get("PAYMENT-REQUIRED")
        return decode_payment_required(value) if value else None

    def __repr__(self) -> str:  # what a failed assert shows
        return f"Reply({self.status}, {self.body[:600]!r})"


async def call(url: str, body: Any = None, *, method: str = "POST", payment: dict[str, Any] | str | None = None,
               headers: dict[str, str] | None = None, raw: bytes | None = None, timeout_s: float = 30) -> Reply:
    """One HTTP request; `payment` is a PaymentPayload wire dict (encoded here) or a raw header value."""
    h = {"Content-Type": "application/json", **(headers or {})}
    if payment is not None:
        h["PAYMENT-SIGNATURE"] = payment if isinstance(payment, str) else encode_payment(payment)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        async with http.request(method, url, data=data, headers=h) as r:
            return Reply(r.status, r.headers, await r.read())


def encode_payment(payload: dict[str, Any]) -> str:
    """PAYMENT-SIGNATURE value of a PaymentPayload wire dict, exactly as a v2 client sends it."""
    return encode_payment_payload(PaymentPayload.model_validate(payload))


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


async def offered(url: str, body: Any, symbol: str, devchain: dict[str, Any]) -> dict[str, Any]:
    """The requirement (wire dict) the gateway's 402 offers for `symbol`."""
    reply = await call(url, body)
    assert reply.status == 402, reply
    required = reply.required
    assert required is not None
    asset = devchain["tokens"][symbol]["address"].lower()
    for accept in required.accepts:
        if accept.asset.lower() == asset:
            return accept.model_dump(by_alias=True, exclude_none=True)
    raise AssertionError(f"no {symbol} offer in {required}")


async def sign_for(devchain: dict[str, Any], url: str, body: Any, *, symbol: str = "OPG", agent: int = 0,
                   payment_id: str | None = None) -> dict[str, Any]:
    """Ask the gateway what `body` at `url` costs, and sign exactly that with the official client."""
    requirement = await offered(url, body, symbol, devchain)
    payload = await sign_async(devchain, requirement, agent=agent, url=url)
    if payment_id is not None:
        payload = copy.deepcopy(payload)
        payload["extensions"] = {"payment-identifier": {"info": {"id": payment_id}}}
    return payload


def malformed_answer(url: str, request: bytes) -> tuple[int, dict[str, Any]]:
    """Bytes a client library would not send, over a raw socket; the (status, JSON body) back."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), raw
    return int(head.split()[1]), json.loads(body)


MALFORMED = [  # each refused by the HTTP parser, before any app code
    b"GET / HTTP/1.1\r\nHost: x\r\nBad\x00Header: 1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def post_json(url: str, body: Any) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def upstream_stats(upstream: Any) -> dict[str, Any]:
    return get_json(upstream.url + "/_stats")


def facilitator_stats(hostile: Any) -> dict[str, int]:
    return get_json(hostile.url + "/_stats")


def set_mode(hostile: Any, **mode: Any) -> None:
    post_json(hostile.url + "/_mode", mode)


def facilitator_env(devchain: dict[str, Any], index: int, prefix: str) -> dict[str, str]:
    """Each facilitator (in-process or a service) its own signer key, as the README asks of
    replicas, and a store prefix of its own test."""
    key = devchain["accounts"]["facilitator"][index]["private_key"]
    return {"FACILITATOR_SIGNER_KEYS": key, "FACILITATOR_STORE_PREFIX": prefix}


class Balances:
    """Token balances of the payer and the payee, before and after."""

    def __init__(self, devchain: dict[str, Any], symbol: str, agent: int) -> None:
        self.devchain, self.symbol = devchain, symbol
        self.payer = devchain["accounts"]["agents"][agent]["address"]
        self.payee = devchain["accounts"]["payee"]["address"]
        self.before = self._now()

    def _now(self) -> tuple[int, int]:
        return balance_of(self.devchain, self.symbol, self.payer), balance_of(self.devchain, self.symbol, self.payee)

    def moved(self) -> tuple[int, int]:
        """(paid by the payer, received by the payee) since construction."""
        now = self._now()
        return self.before[0] - now[0], now[1] - self.before[1]


def receipt_status(devchain: dict[str, Any], tx_hash: str) -> int | None:
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        rec = rpc.call("eth_getTransactionReceipt", tx_hash)
    finally:
        rpc.close()
    return None if rec is None else int(rec["status"], 16)


# -- processes that outlive one test (module-scoped stacks) -----------------------------------------


class Processes:
    """Starts the same processes as conftest's spawn_* fixtures, for fixtures wider than one test
    (those fixtures are function-scoped). Every process is stopped by its own handle in stop_all()."""

    def __init__(self, devchain_file: str, log_dir: Any) -> None:
        self.devchain_file = devchain_file
        self.log_dir = log_dir
        self.started: list[Any] = []

    def _run(self, argv: list[str], env: dict[str, str] | None = None, *, name: str, port: int | None = None,
             crash_on_stop: bool = False) -> Any:
        port = port or _port()
        proc = ServiceProcess(argv, port, dict(os.environ) | (env or {}), self.log_dir / f"{name}-{port}.log")
        proc.crash_on_stop = crash_on_stop
        self.started.append(proc)
        return proc.start()

    def upstream(self) -> Any:
        port = _port()
        return self._run([sys.executable, "-m", "devtools.upstream", "--port", str(port), "--name", "devupstream",
                          "--require-auth", "sk-upstream"], name="upstream", port=port)

    def gateway(self, upstream_url: str, store_url: str, *, facilitator_url: str | None = None,
                env: dict[str, str] | None = None, config: str | None = None, port: int | None = None) -> Any:
        port = port or _port()
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--devchain", self.devchain_file, "--port", str(port),
                "--store", store_url]
        argv += ["--config", config] if config else ["--upstream", upstream_url]
        if facilitator_url:
            argv += ["--facilitator-url", facilitator_url]
        base_env = {"FACILITATOR_STORE_URL": store_url, "GATEWAY_DEV_UPSTREAM_KEY": "sk-upstream"}
        return self._run(argv, base_env | (env or {}), name="gateway", port=port)

    def facilitator(self, store_url: str, env: dict[str, str] | None = None) -> Any:
        port = _port()
        argv = [sys.executable, "-m", "facilitator.cli", "serve", "--devchain", self.devchain_file, "--port", str(port)]
        return self._run(argv, {"FACILITATOR_STORE_URL": store_url} | (env or {}), name="facilitator", port=port)

    def hostile(self, real_url: str) -> Any:
        port = _port()
        # killed at the end: a graceful stop would wait for its `timeout` / `proxy-then-sleep` handlers
        return self._run([sys.executable, "-m", "tests.hostile_facilitator", "--port", str(port), "--real", real_url],
                         name="hostile", port=port, crash_on_stop=True)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.crash_on_stop:
                proc.kill()
            proc.stop()
