"""What a worker serves and whether it is ready, asked in its own protocol.

OpenAI protocol (vLLM, SGLang, TGI): `GET /v1/models` lists the served models (answering at all
means ready); vLLM's Prometheus `/metrics` adds `vllm:num_requests_waiting`, its own queue.
Open Inference Protocol (Triton, KServe v2): `GET /v2/health/ready`, then the repository index
(`POST /v2/repository/index`, entries with `state: READY`); without that extension each
configured model's `GET /v2/models/{name}/ready`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp
import orjson

from gateway.settings import WorkerPoolSettings

WAITING_GAUGE = "vllm:num_requests_waiting"


@dataclass(frozen=True, slots=True)
class Probe:
    reachable: bool
    ready: bool = False
    models: frozenset[str] = field(default_factory=frozenset)  # ready models
    waiting: float = 0.0  # the worker's own queue, where it reports one


DOWN = Probe(reachable=False)


def waiting_from_metrics(text: str) -> float | None:
    """Sum of `vllm:num_requests_waiting` samples (one per model) in a Prometheus text body."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(WAITING_GAUGE) and line[len(WAITING_GAUGE):len(WAITING_GAUGE) + 1] in ("{", " "):
            try:
                total += float(line.rsplit(None, 1)[-1])
                seen = True
            except ValueError:
                continue
    return total if seen else None


async def probe(session: aiohttp.ClientSession, base: str, w: WorkerPoolSettings,
                headers: dict[str, str]) -> Probe:
    limit = aiohttp.ClientTimeout(total=w.probe_timeout_s)
    # No kept-alive probe connections: a worker that dies between calls then shows as a connect
    # error (safe to retry elsewhere), not as a stale connection dropping a call.
    headers = headers | {"connection": "close"}
    try:
        if w.protocol == "openai":
            return await _probe_openai(session, base, limit, headers)
        return await _probe_kserve(session, base, w, limit, headers)
    except (TimeoutError, aiohttp.ClientConnectorError):
        return DOWN
    except (aiohttp.ClientError, OSError, ValueError):
        return Probe(reachable=True)  # it answered, but not as a ready worker does


async def _probe_openai(session: aiohttp.ClientSession, base: str, limit: aiohttp.ClientTimeout,
                        headers: dict[str, str]) -> Probe:
    async with session.get(base + "/v1/models", timeout=limit, headers=headers) as r:
        if r.status != 200:
            return Probe(reachable=True)
        doc = orjson.loads(await r.read())
    models = frozenset(m["id"] for m in doc.get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str))
    waiting = 0.0
    try:
        async with session.get(base + "/metrics", timeout=limit, headers=headers) as r:
            if r.status == 200:
                waiting = waiting_from_metrics((await r.read()).decode("utf-8", "replace")) or 0.0
    except (TimeoutError, aiohttp.ClientError):
        pass  # no gauge: the gateway's own count of outstanding calls is all there is
    return Probe(reachable=True, ready=bool(models), models=models, waiting=waiting)


async def _probe_kserve(session: aiohttp.ClientSession, base: str, w: WorkerPoolSettings,
                        limit: aiohttp.ClientTimeout, headers: dict[str, str]) -> Probe:
    async with session.get(base + "/v2/health/ready", timeout=limit, headers=headers) as r:
        await r.read()
        if r.status != 200:
            return Probe(reachable=True)
    models: set[str] = set()
    async with session.post(base + "/v2/repository/index", timeout=limit, data=b"{}",
                            headers=headers | {"content-type": "application/json"}) as r:
        index = orjson.loads(await r.read()) if r.status == 200 else None
    if isinstance(index, list):
        models = {m["name"] for m in index if isinstance(m, dict) and isinstance(m.get("name"), str)
                  and m.get("state", "READY") == "READY"}
    else:
        for name in w.models:
            async with session.get(f"{base}/v2/models/{name}/ready", timeout=limit, headers=headers) as r:
                await r.read()
                if r.status == 200:
                    models.add(name)
    return Probe(reachable=True, ready=bool(models), models=frozenset(models))
