"""Worker pools behind the paid gateway, with real payments on the dev chain: an OpenAI-protocol
pool and a KServe v2 pool served end to end; an unknown model is 404 before any 402; saturation
is 503 + Retry-After before any payment work (the payment stays usable); a worker killed with
a paid call in flight: that call is not charged, the next ones are served elsewhere, and the
worker is re-admitted when it returns."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from devtools.devconfig import dev_settings
from tests.conftest import _port
from tests.gateway_client import CHAT, Balances, Processes, call, facilitator_env, get_json, sign_for

pytestmark = pytest.mark.e2e

CHAT_MINI = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello pool"}]}
COMPLETION = {"model": "gpt-4o-mini", "prompt": "hello busy pool"}
EMBED = {"model": "text-embedding-3-small", "input": "fragile vector"}
INFER = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}
AGENT = 3


def worker(procs: Processes, name: str, *extra: str, port: int | None = None) -> Any:
    port = port or _port()
    return procs._run([sys.executable, "-m", "devtools.upstream", "--port", str(port), "--name", name, *extra],
                      name=name, port=port)


def pool(urls: list[str], **opts: Any) -> dict[str, Any]:
    return {"kind": "workers", "urls": urls, "timeout_s": 60,
            "workers": {"probe_every_s": 0.3, "eject_base_s": 1.0} | opts}


@pytest.fixture(scope="module")
def stack(devchain: dict, devchain_file: str, redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    log_dir = tmp_path_factory.mktemp("gateway-workers")
    procs = Processes(devchain_file, log_dir)
    try:
        w = {name: worker(procs, name, "--models", "gpt-4o-mini,text-embedding-3-small")
             for name in ("chat1", "chat2", "busy", "frag1", "frag2")}
        w |= {name: worker(procs, name, "--models", "kserve-double") for name in ("gpu1", "gpu2")}
        settings = dev_settings(devchain, devchain_file=devchain_file, upstream_urls=["http://127.0.0.1:9"])
        config = settings.model_dump(mode="json", exclude_none=True)
        config["upstreams"] = {
            "llm": pool([w["chat1"].url, w["chat2"].url]),
            "busy": pool([w["busy"].url], max_concurrency=1, max_queue=0, retry_after_s=2),
            "fragile": pool([w["frag1"].url, w["frag2"].url]),
            "gpu": pool([w["gpu1"].url, w["gpu2"].url], protocol="kserve"),
            "anthropic": {"urls": ["http://127.0.0.1:9"]},
        }
        for route in config["routes"]:
            route["upstream"] = {"/v1/completions": "busy", "/v1/embeddings": "fragile"}.get(route["path"],
                                                                                             route["upstream"])
        path = Path(log_dir) / "gateway.json"
        path.write_text(json.dumps(config))
        prefix = f"gwworkers:{uuid.uuid4().hex[:8]}:"
        env = facilitator_env(devchain, 0, prefix) | {"GATEWAY_STORE_PREFIX": prefix + "gw:"}
        gw = procs.gateway("", redis_server.url, env=env, config=str(path))
        yield gw, w, procs
    finally:
        procs.stop_all()


def worker_gauge(gateway: Any, name: str, upstream: str, url: str) -> float | None:
    text = gateway_metrics(gateway)
    m = re.search(rf'^{name}\{{upstream="{upstream}",worker="{re.escape(url)}"\}} ([0-9.e+-]+)$', text, re.M)
    return float(m.group(1)) if m else None


def gateway_metrics(gateway: Any) -> str:
    import urllib.request

    with urllib.request.urlopen(gateway.url + "/metrics", timeout=5) as r:
        return r.read().decode()


async def until(check: Any, what: str, deadline_s: float = 20.0) -> None:
    end = time.monotonic() + deadline_s
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def served_by(upstream: Any, path: str) -> int:
    return get_json(upstream.url + "/_stats")["by_path"].get(path, 0)


async def test_openai_pool_paid_end_to_end(stack: Any, devchain: dict) -> None:
    gw, w, _ = stack
    url = gw.url + CHAT
    unknown = await call(url, {"model": "llama-3-70b", "messages": [{"role": "user", "content": "hi"}]})
    assert unknown.status == 404 and unknown.required is None, unknown  # before any 402
    before = served_by(w["chat1"], CHAT) + served_by(w["chat2"], CHAT)
    balances = Balances(devchain, "OPG", AGENT)
    payment = await sign_for(devchain, url, CHAT_MINI, agent=AGENT)
    reply = await call(url, CHAT_MINI, payment=payment)
    assert reply.status == 200 and reply.settle is not None and reply.settle.success, reply
    assert reply.json()["choices"][0]["message"]["content"] == "Echo: hello pool"
    assert served_by(w["chat1"], CHAT) + served_by(w["chat2"], CHAT) == before + 1
    assert balances.moved() == (int(payment["accepted"]["amount"]),) * 2


async def test_kserve_pool_paid_end_to_end(stack: Any, devchain: dict) -> None:
    gw, w, _ = stack
    unknown = await call(gw.url + "/v2/models/no-such-model/infer", INFER)
    assert unknown.status == 404 and unknown.required is None, unknown
    url = gw.url + "/v2/models/kserve-double/infer"
    balances = Balances(devchain, "OPG", AGENT)
    payment = await sign_for(devchain, url, INFER, agent=AGENT)
    reply = await call(url, INFER, payment=payment)
    assert reply.status == 200 and reply.settle is not None and reply.settle.success, reply
    assert reply.json()["outputs"][0]["data"] == [2.0, 4.0]
    assert balances.moved() == (int(payment["accepted"]["amount"]),) * 2


async def test_saturation_is_503_before_payment_then_recovers(stack: Any, devchain: dict) -> None:
    gw, w, _ = stack
    url = gw.url + "/v1/completions"
    held_payment = await sign_for(devchain, url, COMPLETION, agent=AGENT)
    waiting_payment = await sign_for(devchain, url, COMPLETION, agent=AGENT)
    price = int(held_payment["accepted"]["amount"])
    balances = Balances(devchain, "OPG", AGENT)
    held = asyncio.create_task(call(url, COMPLETION, payment=held_payment,
                                    headers={"X-Devupstream-Fault": "slow:3000"}))
    await until(lambda: worker_gauge(gw, "x402_gateway_worker_in_flight", "busy", w["busy"].url) == 1.0,
                "the busy worker's only slot taken")
    for payment in (waiting_payment, None):
        refused = await call(url, COMPLETION, payment=payment)
        assert refused.status == 503 and refused.headers.get("Retry-After") == "2", refused
        assert refused.settle is None and refused.required is None, refused
    assert (await held).status == 200
    assert balances.moved() == (price, price)  # only the held call was charged
    # Nothing was verified, claimed or reserved for the refused payment: it still pays once.
    reply = await call(url, COMPLETION, payment=waiting_payment)
    assert reply.status == 200 and reply.settle is not None and reply.settle.success, reply
    assert balances.moved() == (2 * price, 2 * price)


async def test_worker_killed_mid_call_is_not_charged_then_readmitted(stack: Any, devchain: dict) -> None:
    gw, w, procs = stack
    url = gw.url + "/v1/embeddings"
    balances = Balances(devchain, "OPG", AGENT)
    payment = await sign_for(devchain, url, EMBED, agent=AGENT)
    before = {n: served_by(w[n], "/v1/embeddings") for n in ("frag1", "frag2")}
    in_flight = asyncio.create_task(call(url, EMBED, payment=payment, headers={"X-Devupstream-Fault": "hang"}))
    await until(lambda: any(served_by(w[n], "/v1/embeddings") > before[n] for n in before), "the call on a worker")
    victim = next(n for n in before if served_by(w[n], "/v1/embeddings") > before[n])
    other = "frag2" if victim == "frag1" else "frag1"
    port = w[victim].port
    w[victim].kill()
    reply = await in_flight
    assert reply.status == 502 and reply.settle is None, reply
    assert reply.json()["error"] == "upstream_error" or "not charged" in reply.body.decode(), reply
    assert balances.moved() == (0, 0)
    # The next paid calls are served by the other worker.
    for _ in range(3):
        p = await sign_for(devchain, url, EMBED, agent=AGENT)
        ok = await call(url, EMBED, payment=p)
        assert ok.status == 200 and ok.settle is not None and ok.settle.success, ok
    price = int(payment["accepted"]["amount"])
    assert balances.moved() == (3 * price, 3 * price)
    victim_url = w[victim].url
    assert worker_gauge(gw, "x402_gateway_worker_ready", "fragile", victim_url) == 0.0
    # It comes back on the same address: probed ready, admitted, and it gets calls again.
    w[victim] = worker(procs, victim, "--models", "gpt-4o-mini,text-embedding-3-small", port=port)
    await until(lambda: worker_gauge(gw, "x402_gateway_worker_ready", "fragile", victim_url) == 1.0, "re-admitted")
    for _ in range(16):
        p = await sign_for(devchain, url, EMBED, agent=AGENT)
        assert (await call(url, EMBED, payment=p)).status == 200
        if served_by(w[victim], "/v1/embeddings") > 0:
            break
    assert served_by(w[victim], "/v1/embeddings") > 0 and served_by(w[other], "/v1/embeddings") > 0
