"""Hide from an OpenAI stream the usage the gateway asked for on the client's behalf.

On metered routes the gateway forwards streamed OpenAI calls with `stream_options.include_usage`
(gateway/metering.py `cap_request`), so that it can meter them. The upstream then adds
`"usage": null` to every chunk and one usage-only chunk (`"choices": []`) before `[DONE]`. A
client that did not ask for usage must get the stream OpenAI sends it when it did not ask: no
`usage` field at all and no usage-only chunk (OpenGradient's SDK fails on `"usage": null`, then
pays again). The meter reads the stream before this filter, so it still sees the usage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from starlette.requests import Request

MAX_LINE = 1 << 20  # a longer line is passed through untouched (it is no usage chunk we can read)


def usage_added(body: bytes, *, anthropic: bool) -> bool:
    """Whether `cap_request` asks the upstream for stream usage that this client did not ask for
    (a streamed OpenAI call without `stream_options.include_usage: true`)."""
    if anthropic:
        return False
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(doc, dict) or doc.get("stream") is not True:
        return False
    opts = doc.get("stream_options")
    return not (isinstance(opts, dict) and opts.get("include_usage") is True)


class AddedUsageFilter:
    """Rewrites an SSE byte stream line by line: `data:` lines carrying a `usage` key lose it, and
    a chunk that only carried usage (no choices) is dropped with the blank line that ends it.
    Every other byte passes through unchanged; only an incomplete last line is held back."""

    def __init__(self) -> None:
        self._buf = b""
        self._drop_blank = False
        self._fresh = True  # the next line starts an event
        self._passthrough = False  # inside an over-long line: forward it as it comes

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        self._buf += chunk
        while True:
            if self._passthrough:
                end = self._buf.find(b"\n")
                if end < 0:
                    out.append(self._buf)
                    self._buf = b""
                    break
                out.append(self._buf[: end + 1])
                self._buf = self._buf[end + 1 :]
                self._passthrough = False
                continue
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_LINE:
                    out.append(self._buf)
                    self._buf, self._passthrough, self._drop_blank, self._fresh = b"", True, False, False
                break
            line, self._buf = self._buf[: end + 1], self._buf[end + 1 :]
            out.append(self._line(line))
        return b"".join(out)

    def flush(self) -> bytes:
        """What is left at the end of the stream (an unterminated last line)."""
        rest, self._buf = self._buf, b""
        return rest if self._passthrough or not rest else self._line(rest)

    def _line(self, line: bytes) -> bytes:
        body = line.rstrip(b"\r\n")
        fresh, self._fresh = self._fresh, not body
        if not body:
            if self._drop_blank:
                self._drop_blank = False
                return b""
            return line
        self._drop_blank = False
        if not body.startswith(b"data:") or b'"usage"' not in body:
            return line
        try:
            doc = orjson.loads(body[5:])
        except orjson.JSONDecodeError:
            return line
        if not isinstance(doc, dict) or "usage" not in doc:
            return line
        del doc["usage"]
        if not doc.get("choices") and "tee_signature" not in doc:  # the usage-only chunk: gone (with the
            # blank line ending its event), unless it is an enclave's final frame carrying the proof
            self._drop_blank = fresh
            return b""
        return b"data: " + orjson.dumps(doc) + line[len(body) :]


async def without_added_usage(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`chunks` through an AddedUsageFilter. Closing this generator closes `chunks` (a metered
    stream settles in its own `finally`)."""
    f = AddedUsageFilter()
    try:
        async for chunk in chunks:
            out = f.feed(chunk)
            if out:
                yield out
        tail = f.flush()
        if tail:
            yield tail
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def forwarded_stream(request: Request, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The stream as the client gets it: filtered when the paywall marked the request
    (`added_usage` in its state: the gateway asked the upstream for usage the client did not)."""
    return without_added_usage(chunks) if request.scope.get("state", {}).get("added_usage") else chunks
