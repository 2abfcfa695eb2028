"""The check a `tee` call passes before it is settled: the proof in the enclave's answer (the JSON
body, or the final frame of a stream) against the request the gateway forwarded and the content
it received (gateway/tee/proof.py `check`)."""

from __future__ import annotations

import time

import orjson

from gateway.settings import TeeSettings
from gateway.sse_lines import SseData
from gateway.tee.pool import Enclave
from gateway.tee.proof import ProofError, TeeProof, check, completion_output, output_text, proof_of


def _json(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProofError("malformed", "the enclave's answer is not JSON") from None


def verify_body(enclave: Enclave, settings: TeeSettings, forwarded: bytes, content: bytes) -> TeeProof:
    """A complete answer: a JSON chat completion, or a whole SSE stream (buffered)."""
    if content.lstrip().startswith(b"data:") or b"\ndata:" in content[:4096]:
        reader = StreamProofReader()
        reader.feed(content)
        return reader.verify(enclave, settings, forwarded)
    doc = _json(content)
    if not isinstance(doc, dict):
        raise ProofError("malformed", "the enclave's answer is not a JSON object")
    return _check(proof_of(doc), enclave, settings, forwarded, completion_output(doc))


def _check(proof: TeeProof, enclave: Enclave, settings: TeeSettings, forwarded: bytes, output: str) -> TeeProof:
    body = _json(forwarded)
    check(proof, enclave.key, body, output, now=time.time(), max_age_s=settings.signature_max_age_s,
          max_skew_s=settings.clock_skew_s)
    return proof


class StreamProofReader:
    """Reads an OpenAI chat stream as it passes: the content deltas (or tool-call deltas) and the
    frame that carries the proof (the last one with `tee_signature`)."""

    def __init__(self) -> None:
        self._lines = SseData()
        self._text: list[str] = []
        self._tools: dict[int, dict[str, object]] = {}
        self._finish: object = None
        self.final: dict[str, object] | None = None

    def feed(self, chunk: bytes) -> None:
        for data in self._lines.feed(chunk):
            self._data(data)

    def _data(self, data: bytes) -> None:
        if data == b"[DONE]":
            return
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        if "tee_signature" in doc:
            self.final = doc
        for choice in doc.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                self._text.append(delta["content"])
            for call in delta.get("tool_calls") or []:
                self._tool_delta(call)

    def _tool_delta(self, call: dict[str, object]) -> None:
        index = call.get("index", 0)
        slot = self._tools.setdefault(index if isinstance(index, int) else 0,
                                      {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        for key in ("id", "type"):
            if isinstance(call.get(key), str):
                slot[key] = call[key]
        fn, into = call.get("function"), slot["function"]
        if isinstance(fn, dict) and isinstance(into, dict):
            for key in ("name", "arguments"):
                if isinstance(fn.get(key), str):
                    into[key] = str(into[key]) + fn[key]

    def output(self) -> str:
        message: dict[str, object] = {"content": "".join(self._text)}
        if self._tools:
            message["tool_calls"] = [self._tools[i] for i in sorted(self._tools)]
        return output_text(message, self._finish)

    def verify(self, enclave: Enclave, settings: TeeSettings, forwarded: bytes) -> TeeProof:
        if self.final is None:
            raise ProofError("missing", "the enclave's stream ended without a proof frame")
        return _check(proof_of(self.final), enclave, settings, forwarded, self.output())
