"""The `data:` payloads of a server-sent event stream, read chunk by chunk as it passes through
(shared by the usage meter and the TEE proof reader)."""

from __future__ import annotations

from collections.abc import Iterator

MAX_LINE = 1 << 20  # a line this long carries nothing we can trust: dropped


class SseData:
    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """The payload of every complete `data:` line in the stream so far (`[DONE]` included)."""
        self._buf += chunk
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            line = line.strip()
            if line.startswith(b"data:"):
                yield line[5:].strip()
        if len(self._buf) > MAX_LINE:
            self._buf = b""
