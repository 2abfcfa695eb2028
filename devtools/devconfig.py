"""A ready gateway configuration for local use: the dev chain's tokens as payment options, its
payee as payTo, the facilitator in-process, and the routes of every protocol the gateway fronts
pointing at a local stand-in upstream (devtools.upstream)."""

from __future__ import annotations

from typing import Any

from gateway.settings import GatewaySettings


def dev_settings(devchain: dict[str, Any], *, devchain_file: str | None, upstream_urls: list[str],
                 store_url: str = "memory://", port: int = 8402, upstream_auth: str | None = None,
                 facilitator_url: str | None = None, metered: bool = False,
                 sessions: dict[str, Any] | None = None) -> GatewaySettings:
    """`metered`: chat, completions and messages are paid for what they use (upto, and exact at
    the per-call maximum), priced per token in USD at fixed rates (OPG $0.10, USDC $1)."""
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
    routes: list[dict[str, Any]] = [
        {"method": "POST", "path": "/v1/chat/completions", "upstream": "llm", "price": "0.01",
         "models": {"gpt-4o": "0.02", "gpt-4o-mini": "0.005"}, "description": "OpenAI chat completions"},
        {"method": "POST", "path": "/v1/completions", "upstream": "llm", "price": "0.005"},
        {"method": "POST", "path": "/v1/embeddings", "upstream": "llm", "price": "0.001"},
        {"method": "POST", "path": "/v1/messages", "upstream": "anthropic", "price": "0.015",
         "description": "Anthropic messages", "api": "anthropic"},
        {"method": "POST", "path": "/v2/models/{name}/infer", "upstream": "gpu", "price": "0.002",
         "description": "KServe v2 inference on a GPU worker", "api": "other"},
    ]
    if metered:
        per_token = {
            "gpt-4o": {"input": "0.0000025", "output": "0.00001"},
            "gpt-4o-mini": {"input": "0.00000015", "output": "0.0000006"},
            "claude-haiku-4-5": {"input": "0.000001", "output": "0.000005"},
            "free-model": {"input": "0", "output": "0"},
            "*": {"input": "0.000001", "output": "0.000002", "per_call": "0.0001"},
        }
        for r in routes[:2] + routes[3:4]:
            r.pop("price")
            r.pop("models", None)
            r |= {"token_prices": per_token, "max_per_call": "0.05", "max_tokens_cap": 4096, "schemes": ["upto", "exact"]}
        if sessions:  # chat: one permit (1 USD) covers many calls, settled once
            routes[0]["sessions"] = {"cap": "1", "idle_s": sessions.get("idle_s", 100.0),
                                     "settle_margin_s": sessions.get("settle_margin_s", 120.0),
                                     "serve_margin_s": sessions.get("serve_margin_s", 420.0),
                                     "max_timeout_s": sessions.get("max_timeout_s", 3600)}
            routes[0]["sessions"] |= {k: v for k, v in sessions.items() if k in ("max_exposure", "watch_funds")}
    return GatewaySettings.model_validate({
        "port": port,
        "pay_to": devchain["accounts"]["payee"]["address"],
        "store_url": store_url,
        "facilitator": facilitator,
        "accepts": accepts,
        "upstreams": {"llm": upstream, "anthropic": anthropic, "gpu": dict(upstream)},
        "routes": routes,
        "quote": {"currency": "USD", "rates": {"OPG": "0.10", "USDC": "1"}},
    })
