"""A ready gateway configuration for local use: the dev chain's tokens as payment options, its
payee as payTo, the facilitator in-process, and the routes of every protocol the gateway fronts
pointing at a local stand-in upstream (gateway.devupstream)."""

from __future__ import annotations

from typing import Any

from gateway.settings import GatewaySettings


def dev_settings(devchain: dict[str, Any], *, devchain_file: str | None, upstream_urls: list[str],
                 store_url: str = "memory://", port: int = 8402, upstream_auth: str | None = None,
                 facilitator_url: str | None = None) -> GatewaySettings:
    accepts = [
        {
            "network": devchain["network"],
            "asset": t["address"],
            "symbol": symbol,
            "decimals": t["decimals"],
            "transfer_method": t["transfer_method"],
            "eip712_name": t["eip712_name"],
            "eip712_version": t["eip712_version"],
        }
        for symbol, t in devchain["tokens"].items()
    ]
    upstream: dict[str, Any] = {"urls": upstream_urls, "timeout_s": 120}
    if upstream_auth:
        upstream |= {"auth_header": "Authorization", "auth_value": f"Bearer {upstream_auth}"}
    anthropic = dict(upstream)
    if upstream_auth:
        anthropic |= {"auth_header": "x-api-key", "auth_value": upstream_auth}
    facilitator = ({"mode": "remote", "url": facilitator_url} if facilitator_url
                   else {"mode": "local", "devchain_file": devchain_file})
    return GatewaySettings.model_validate({
        "port": port,
        "pay_to": devchain["accounts"]["payee"]["address"],
        "store_url": store_url,
        "facilitator": facilitator,
        "accepts": accepts,
        "upstreams": {"llm": upstream, "anthropic": anthropic, "gpu": dict(upstream)},
        "routes": [
            {"method": "POST", "path": "/v1/chat/completions", "upstream": "llm", "price": "0.01",
             "models": {"gpt-4o": "0.02", "gpt-4o-mini": "0.005"}, "description": "OpenAI chat completions"},
            {"method": "POST", "path": "/v1/completions", "upstream": "llm", "price": "0.005"},
            {"method": "POST", "path": "/v1/embeddings", "upstream": "llm", "price": "0.001"},
            {"method": "POST", "path": "/v1/messages", "upstream": "anthropic", "price": "0.015",
             "description": "Anthropic messages"},
            {"method": "POST", "path": "/v2/models/{name}/infer", "upstream": "gpu", "price": "0.002",
             "description": "KServe v2 inference on a GPU worker"},
        ],
    })
