"""The stream filter that hides the usage the gateway asked for on the client's behalf."""

from __future__ import annotations

import orjson
import pytest

from gateway.metering import StreamMeter, Usage, cap_request
from gateway.sse_usage import MAX_LINE, AddedUsageFilter, usage_added, without_added_usage

# What an OpenAI-compatible upstream streams when asked for usage: `usage: null` on every chunk,
# then a usage-only chunk (no choices), then [DONE]; the gateway's own event comes last.
ASKED = (
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}],"usage":null}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hello"}}],"usage":null}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13}}\n\n'
    b"data: [DONE]\n\n"
    b'event: x402.payment\ndata: {"success":true,"input_tokens":11,"output_tokens":2}\n\n'
)
# ... and what it streams when not asked: what the client must get.
NOT_ASKED = (
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
    b'event: x402.payment\ndata: {"success":true,"input_tokens":11,"output_tokens":2}\n\n'
)


def filtered(stream: bytes, sizes: int | None = None) -> bytes:
    f = AddedUsageFilter()
    step = sizes or len(stream) or 1
    out = b"".join(f.feed(stream[i:i + step]) for i in range(0, len(stream), step))
    return out + f.flush()


def test_usage_added_only_when_the_gateway_asks_for_a_client_that_did_not() -> None:
    def body(**doc: object) -> bytes:
        return orjson.dumps({"model": "m", "messages": [], **doc})

    assert usage_added(body(stream=True), anthropic=False)
    assert usage_added(body(stream=True, stream_options={}), anthropic=False)
    assert usage_added(body(stream=True, stream_options={"include_usage": False}), anthropic=False)
    assert not usage_added(body(stream=True, stream_options={"include_usage": True}), anthropic=False)
    assert not usage_added(body(), anthropic=False)
    assert not usage_added(body(stream=False), anthropic=False)
    assert not usage_added(body(stream=True), anthropic=True)  # cap_request adds nothing for Anthropic
    assert not usage_added(b"not json", anthropic=False) and not usage_added(b"[1]", anthropic=False)
    # It agrees with cap_request: whatever it says was added, cap_request added.
    forwarded = orjson.loads(cap_request(body(stream=True, stream_options={"include_usage": False}), 100, anthropic=False))
    assert forwarded["stream_options"] == {"include_usage": True}


def test_the_client_gets_the_stream_it_would_have_got_without_asking() -> None:
    assert filtered(ASKED) == NOT_ASKED
    for size in (1, 2, 7, 64):  # however the upstream's bytes are cut
        assert filtered(ASKED, size) == NOT_ASKED


def test_the_meter_still_sees_the_usage() -> None:
    meter, f, out = StreamMeter(), AddedUsageFilter(), b""
    for i in range(0, len(ASKED), 5):
        meter.feed(ASKED[i:i + 5])  # as the paywall does: meter first, then filter what is forwarded
        out += f.feed(ASKED[i:i + 5])
    assert meter.usage == Usage(11, 2) and meter.complete
    assert b"usage" not in out.replace(b'"input_tokens"', b"")


def test_other_lines_pass_unchanged() -> None:
    stream = (b": keep-alive\r\n\r\n"
              b'data: {"choices":[{"delta":{"content":"a \\"usage\\" word"}}]}\r\n\r\n'  # the word, not the key
              b"data: not json \"usage\"\n\n"
              b'data: ["usage"]\n\n'
              b"event: message_delta\ndata: {\"type\":\"message_delta\",\"x\":1}\n\n"
              b"data: [DONE]\r\n\r\n")
    assert filtered(stream) == stream
    assert filtered(stream, 3) == stream


def test_crlf_streams_and_usage_on_a_content_chunk() -> None:
    stream = (b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\r\n\r\n'
              b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}\r\n\r\n'
              b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\r\n\r\n'
              b"data: [DONE]\r\n\r\n")
    assert filtered(stream) == (b'data: {"choices":[{"delta":{"content":"x"}}]}\r\n\r\n'
                                b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\r\n\r\n'
                                b"data: [DONE]\r\n\r\n")


def test_a_usage_chunk_inside_a_named_event_keeps_the_event_terminated() -> None:
    stream = b'event: chunk\ndata: {"choices":[],"usage":{"prompt_tokens":1}}\n\ndata: [DONE]\n\n'
    assert filtered(stream) == b"event: chunk\n\ndata: [DONE]\n\n"


def test_an_unterminated_last_line_and_an_over_long_line() -> None:
    assert filtered(b'data: {"choices":[{"delta":{}}],"usage":null}') == b'data: {"choices":[{"delta":{}}]}'
    long = (b'data: {"choices":[{"delta":{"content":"' + b"x" * (2 * MAX_LINE) + b'"}}],"usage":null}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\ndata: [DONE]\n\n')
    # too long to read: passed through as it came; the lines after it are read again
    assert filtered(long, 4096) == long[:long.index(b"\n\n") + 2] + b"data: [DONE]\n\n"


@pytest.mark.asyncio
async def test_without_added_usage_closes_the_stream_it_wraps() -> None:
    closed: list[bool] = []

    async def chunks():
        try:
            yield ASKED[:100]
            yield ASKED[100:]
        finally:
            closed.append(True)

    out = [c async for c in without_added_usage(chunks())]
    assert b"".join(out) == NOT_ASKED and closed == [True]

    closed.clear()
    gen = without_added_usage(chunks())
    await gen.__anext__()
    await gen.aclose()  # the client went away
    assert closed == [True]


def test_an_enclaves_usage_chunk_keeps_its_proof() -> None:
    """An enclave signs on its last frame, which may be the usage-only chunk: the frame stays,
    without `usage` (not signed), with the proof fields."""
    frame = b'data: {"choices":[],"usage":{"total_tokens":3},"tee_signature":"c2ln","tee_id":"0x01"}\n\n'
    out = filtered(frame + b"data: [DONE]\n\n")
    assert out == b'data: {"choices":[],"tee_signature":"c2ln","tee_id":"0x01"}\n\ndata: [DONE]\n\n'
