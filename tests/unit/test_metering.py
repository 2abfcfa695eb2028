"""Usage and cost metering: parsing what upstreams report, exact money arithmetic."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest

from gateway.metering import (
    StreamMeter,
    TokenPrice,
    Usage,
    cap_request,
    cost_of,
    output_token_cap,
    to_base_units,
    usage_from_body,
)


def test_usage_from_openai_and_anthropic_bodies() -> None:
    assert usage_from_body(b'{"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}') == Usage(12, 30)
    assert usage_from_body(b'{"usage":{"input_tokens":7,"output_tokens":9}}') == Usage(7, 9)
    assert usage_from_body(b'{"usage":{"prompt_tokens":5,"total_tokens":5}}') == Usage(5, 0)  # embeddings
    for bad in (b"", b"not json", b"[]", b'{"usage":null}', b'{"usage":{"prompt_tokens":-1}}',
                b'{"usage":{"prompt_tokens":"5"}}', b'{"choices":[]}'):
        assert usage_from_body(bad) is None


OPENAI_STREAM = (
    b'data: {"choices":[{"delta":{"content":"Hello"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":" world"}}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13}}\n\n'
    b"data: [DONE]\n\n"
)
ANTHROPIC_STREAM = (
    b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":20,"output_tokens":1}}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"type":"text_delta","text":"Hi"}}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


@pytest.mark.parametrize("stream,expected", [(OPENAI_STREAM, Usage(11, 2)), (ANTHROPIC_STREAM, Usage(20, 15))])
@pytest.mark.parametrize("split", [1, 3, 7, 64, 10_000])
def test_stream_meter_reads_usage_across_any_chunking(stream: bytes, expected: Usage, split: int) -> None:
    meter = StreamMeter()
    for i in range(0, len(stream), split):
        meter.feed(stream[i : i + split])
    assert meter.usage == expected and meter.complete


def test_stream_meter_on_a_cut_stream() -> None:
    meter = StreamMeter()
    meter.feed(OPENAI_STREAM[:60])
    assert meter.usage is None and not meter.complete


def test_costs_are_exact_and_round_up_to_base_units() -> None:
    price = TokenPrice(input=Decimal("0.0000025"), output=Decimal("0.00001"))
    cost = cost_of(Usage(1000, 500), price)
    assert cost == Decimal("0.0075")
    assert to_base_units(cost, Decimal("0.10"), 18) == 75_000_000_000_000_000  # 0.075 OPG at $0.10
    assert to_base_units(cost, Decimal("1"), 6) == 7_500  # 0.0075 USDC
    assert to_base_units(Decimal("0.0000001"), Decimal("1"), 6) == 1  # rounds up, never to zero
    assert to_base_units(Decimal(0), Decimal("1"), 6) == 0


def test_output_cap_keeps_the_worst_case_under_the_ceiling() -> None:
    price = TokenPrice(input=Decimal("0.000001"), output=Decimal("0.00001"), per_call=Decimal("0.001"))
    cap = output_token_cap(2_000, price, Decimal("0.05"))
    worst = 2_000 * price.input + cap * price.output + price.per_call
    assert worst <= Decimal("0.05") < worst + price.output
    assert output_token_cap(10**6, price, Decimal("0.05")) == 0


def test_cap_request_lowers_max_tokens_and_asks_for_stream_usage() -> None:
    body = orjson.dumps({"model": "m", "messages": [], "max_tokens": 5000, "stream": True})
    capped = orjson.loads(cap_request(body, 300, anthropic=False))
    assert capped["max_tokens"] == 300 and capped["stream_options"] == {"include_usage": True}
    small = orjson.loads(cap_request(orjson.dumps({"model": "m", "max_tokens": 10}), 300, anthropic=False))
    assert small["max_tokens"] == 10
    unset = orjson.loads(cap_request(orjson.dumps({"model": "m"}), 300, anthropic=False))
    assert unset["max_tokens"] == 300
    newer = orjson.loads(cap_request(orjson.dumps({"model": "m", "max_completion_tokens": 900}), 300, anthropic=False))
    assert newer["max_completion_tokens"] == 300 and "max_tokens" not in newer
    with pytest.raises(ValueError):
        cap_request(b"[1, 2]", 300, anthropic=False)
    claude = orjson.loads(cap_request(orjson.dumps({"model": "c", "max_tokens": 4096, "stream": True}), 300, anthropic=True))
    assert claude["max_tokens"] == 300 and "stream_options" not in claude
