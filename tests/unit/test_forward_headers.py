"""What reaches the upstream of an agent's headers."""

from __future__ import annotations

from pydantic import SecretStr

from gateway.proxy import forward_headers
from gateway.settings import Upstream


def test_payment_auth_and_hop_headers_stay_behind_and_the_providers_key_goes() -> None:
    upstream = Upstream(urls=["http://up"], auth_header="Authorization", auth_value=SecretStr("Bearer sk-provider"))
    sent = [(b"Host", b"gw"), (b"Content-Type", b"application/json"), (b"PAYMENT-SIGNATURE", b"x"), (b"X-Payment", b"y"),
            (b"Authorization", b"Bearer agent"), (b"Cookie", b"c"), (b"Connection", b"keep-alive"),
            (b"Expect", b"100-continue"), (b"Accept-Encoding", b"gzip"), (b"X-Trace", b"\xe9")]
    out = forward_headers(sent, upstream)
    assert out == {"content-type": "application/json", "x-trace": "\xe9", "accept-encoding": "identity",
                   "user-agent": "x402-agent-gateway", "accept": "*/*", "authorization": "Bearer sk-provider"}


def test_the_agents_user_agent_and_accept_are_kept() -> None:
    out = forward_headers([(b"User-Agent", b"openai-python/2"), (b"Accept", b"text/event-stream")], Upstream(urls=["http://up"]))
    assert out["user-agent"] == "openai-python/2" and out["accept"] == "text/event-stream"
