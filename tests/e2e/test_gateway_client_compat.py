"""What clients we did not write see of the gateway's HTTP: `GET /v1/models` read with the OpenAI
SDK, and one `Date` and one `Server` header on every kind of response (counted raw)."""

from __future__ import annotations

import http.client
import json
import uuid
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from tests.gateway_client import CHAT, CHAT_BODY, Processes, encode_payment, facilitator_env, sign_for

pytestmark = pytest.mark.e2e

STREAM_BODY = CHAT_BODY | {"stream": True}




@pytest.fixture(scope="module")
def gateway(procs: Processes, upstream: Any, redis_server: Any, devchain: dict) -> Any:
    prefix = f"gwcompat:{uuid.uuid4().hex[:8]}:"
    env = facilitator_env(devchain, 2, prefix) | {"GATEWAY_STORE_PREFIX": prefix + "gw:"}
    return procs.gateway(upstream.url, redis_server.url, env=env)


def raw(url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
        ) -> tuple[int, Counter[str], bytes]:
    """Status, how many times each header name occurs (lowercase), body: as sent on the wire."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        content = resp.read()
        return resp.status, Counter(name.lower() for name, _ in resp.getheaders()), content
    finally:
        conn.close()


async def test_openai_sdk_lists_the_models_with_our_prices(gateway: Any) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="not-needed", max_retries=0)
    models = list(client.models.list())
    ids = [m.id for m in models]
    assert {"gpt-4o", "gpt-4o-mini", "*"} <= set(ids) and None not in ids
    assert all(m.object == "model" and isinstance(m.created, int) and m.owned_by for m in models)
    gpt4o = next(m for m in models if m.id == "gpt-4o")
    assert gpt4o.owned_by == "llm" and gpt4o.model_extra["route"] == "POST /v1/chat/completions"
    assert {p["display"] for p in gpt4o.model_extra["price"]} == {"0.02 OPG", "0.02 USDC"}
    status, _, body = raw(gateway.url, "GET", "/v1/models")
    doc = json.loads(body)
    assert status == 200 and doc["object"] == "list"
    assert all({"id", "object", "created", "owned_by"} <= set(item) for item in doc["data"])


async def test_every_response_has_one_date_and_one_server_header(devchain: dict, gateway: Any) -> None:
    seen: dict[str, tuple[int, Counter[str]]] = {}
    payment = encode_payment(await sign_for(devchain, gateway.url + CHAT, CHAT_BODY, agent=1))
    status, headers, body = raw(gateway.url, "POST", CHAT, CHAT_BODY, {"PAYMENT-SIGNATURE": payment})
    assert status == 200 and b"Echo:" in body, body
    seen["paid"] = status, headers
    status, headers, body = raw(gateway.url, "POST", CHAT, CHAT_BODY, {"PAYMENT-SIGNATURE": payment})
    assert status == 200 and b"Echo:" in body, body  # the same payment again: the recorded response
    seen["replayed"] = status, headers
    payment = encode_payment(await sign_for(devchain, gateway.url + CHAT, STREAM_BODY, agent=1))
    status, headers, body = raw(gateway.url, "POST", CHAT, STREAM_BODY, {"PAYMENT-SIGNATURE": payment})
    assert status == 200 and b"data: [DONE]" in body, body
    seen["streamed"] = status, headers
    payment = encode_payment(await sign_for(devchain, gateway.url + CHAT, CHAT_BODY, agent=1))
    seen["upstream error"] = raw(gateway.url, "POST", CHAT, CHAT_BODY,
                                 {"PAYMENT-SIGNATURE": payment, "X-Devupstream-Fault": "503"})[:2]
    seen["402"] = raw(gateway.url, "POST", CHAT, CHAT_BODY)[:2]
    seen["models"] = raw(gateway.url, "GET", "/v1/models")[:2]
    counts = {kind: (status, headers["date"], headers["server"]) for kind, (status, headers) in seen.items()}
    assert counts == {"paid": (200, 1, 1), "replayed": (200, 1, 1), "streamed": (200, 1, 1),
                      "upstream error": (502, 1, 1), "402": (402, 1, 1), "models": (200, 1, 1)}
