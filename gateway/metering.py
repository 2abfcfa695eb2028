"""What a call actually used, and what it costs.

Usage comes from the upstream: `usage` in OpenAI and Anthropic bodies, and in the stream (the
final OpenAI chunk when `stream_options.include_usage` is set, Anthropic's message_start and
message_delta events). Costs are exact decimals in the quote currency (USD by default),
converted to the asset's base units rounding up, never above the signed ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

import orjson

from gateway.sse_lines import SseData


@dataclass(frozen=True, slots=True)
class TokenPrice:
    """Quote-currency price per input token, per output token, and per call."""

    input: Decimal
    output: Decimal
    per_call: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int


def usage_from_body(body: bytes) -> Usage | None:
    """OpenAI (chat, completions, embeddings) and Anthropic response bodies."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return _usage_of(doc.get("usage") if isinstance(doc, dict) else None)


def _usage_of(u: object) -> Usage | None:
    if not isinstance(u, dict):
        return None
    if "prompt_tokens" in u or "completion_tokens" in u:  # OpenAI
        i, o = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
    elif "input_tokens" in u or "output_tokens" in u:  # Anthropic
        i, o = u.get("input_tokens", 0), u.get("output_tokens", 0)
    else:
        return None
    if not (isinstance(i, int) and isinstance(o, int)) or i < 0 or o < 0:
        return None
    return Usage(i, o)


class StreamMeter:
    """Reads an SSE stream as it passes through (without holding it back) and keeps the usage it
    reports and whether the stream ended properly."""

    def __init__(self) -> None:
        self._lines = SseData()
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.complete = False

    def feed(self, chunk: bytes) -> None:
        for data in self._lines.feed(chunk):
            self._data(data)

    def _data(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.complete = True
            return
        if b"usage" not in data and b"message_stop" not in data:
            return
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        kind = doc.get("type")
        if kind == "message_stop":
            self.complete = True
            return
        if kind == "message_start":  # Anthropic: input tokens up front
            u = (doc.get("message") or {}).get("usage") or {}
            if isinstance(u.get("input_tokens"), int):
                self.input_tokens = u["input_tokens"]
            return
        if kind == "message_delta":  # Anthropic: output tokens at the end
            u = doc.get("usage") or {}
            if isinstance(u.get("output_tokens"), int):
                self.output_tokens = u["output_tokens"]
            return
        usage = _usage_of(doc.get("usage"))
        if usage is not None:  # OpenAI: the final chunk
            self.input_tokens, self.output_tokens = usage.input_tokens, usage.output_tokens

    @property
    def usage(self) -> Usage | None:
        if self.input_tokens is None or self.output_tokens is None:
            return None
        return Usage(self.input_tokens, self.output_tokens)


def cost_of(usage: Usage, price: TokenPrice) -> Decimal:
    return usage.input_tokens * price.input + usage.output_tokens * price.output + price.per_call


def to_base_units(quote: Decimal, quote_per_token: Decimal, decimals: int) -> int:
    """Quote-currency amount -> asset base units, rounded up (the operator is never underpaid
    by rounding; the agent pays at most one base unit more)."""
    units = quote / quote_per_token * (Decimal(10) ** decimals)
    return int(units.to_integral_value(rounding=ROUND_CEILING))


def output_token_cap(body_bytes: int, price: TokenPrice, ceiling: Decimal) -> int:
    """Most output tokens a call may generate so that its worst case stays under `ceiling`. The
    prompt is bounded by its size in bytes (a token is at least one byte)."""
    budget = ceiling - price.per_call - body_bytes * price.input
    if budget <= 0:
        return 0
    if price.output <= 0:
        return 1 << 30
    return int(budget / price.output)


def cap_request(body: bytes, cap: int, *, anthropic: bool) -> bytes:
    """The request with max_tokens lowered to `cap` (OpenAI: also max_completion_tokens), and
    streamed OpenAI calls asked to report usage in their final chunk."""
    doc = orjson.loads(body)
    if not isinstance(doc, dict):
        raise ValueError("request body is not a JSON object")
    stream = doc.get("stream") is True
    if anthropic:
        doc["max_tokens"] = min(int(doc.get("max_tokens") or cap), cap)
    else:
        for field in ("max_completion_tokens", "max_tokens"):
            if field in doc and isinstance(doc[field], int):
                doc[field] = min(doc[field], cap)
        if "max_completion_tokens" not in doc:
            doc["max_tokens"] = min(int(doc.get("max_tokens") or cap), cap)
        if stream:
            opts = doc.get("stream_options")
            doc["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return orjson.dumps(doc)
