"""OpenGradient's TEE response proofs: how a request and an output are hashed, what the enclave
signs, and the check the gateway makes before it settles (x402-protocol.md §7.5).

    request_hash = keccak256(json.dumps(canonical_request, sort_keys=True))
    output_hash  = keccak256(content)   # or json.dumps(tool_calls, sort_keys=True)
    msg_hash     = keccak256(request_hash || output_hash || uint256_be(timestamp))
    signature    = RSA-PSS(SHA-256, MGF1-SHA-256, salt 32) over msg_hash
    tee_id       = keccak256(DER SubjectPublicKeyInfo)

The canonical request mirrors `opengradient.client.tee_verify.build_inner_request` byte for byte
(the e2e test checks our proofs with their `verify_response`).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from eth_utils import keccak

PROOF_FIELDS = ("tee_signature", "tee_request_hash", "tee_output_hash", "tee_timestamp", "tee_id")
# The headers OpenGradient's gateway copies the proof into (og-x402 flask middleware).
PROOF_HEADERS = {"tee_signature": "X-TEE-Signature", "tee_id": "X-TEE-ID", "tee_timestamp": "X-TEE-Timestamp",
                 "tee_request_hash": "X-TEE-Request-Hash", "tee_output_hash": "X-TEE-Output-Hash"}
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


class ProofError(Exception):
    """A response whose proof does not hold; `reason` is a short, bounded label (the metric's)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class UnsupportedRequestError(ValueError):
    """The request cannot be expressed as a canonical TEE request (no model, no messages, ...)."""


@dataclass(frozen=True, slots=True)
class TeeProof:
    signature: str  # base64
    request_hash: str  # hex, as the enclave wrote it
    output_hash: str
    timestamp: int
    tee_id: str  # 0x-hex

    def fields(self) -> dict[str, str | int]:
        return {"tee_signature": self.signature, "tee_request_hash": self.request_hash,
                "tee_output_hash": self.output_hash, "tee_timestamp": self.timestamp, "tee_id": self.tee_id}

    def headers(self) -> dict[str, str]:
        return {PROOF_HEADERS[k]: str(v) for k, v in self.fields().items()}


# -- hashing ---------------------------------------------------------------------------------


def _strip0x(value: str) -> str:
    return value[2:] if value.startswith(("0x", "0X")) else value


def tee_id_of(public_key_der: bytes) -> str:
    return "0x" + keccak(public_key_der).hex()


def _user_content(content: Any) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return str(content)
    out: list[Any] = []
    for part in content:
        if not isinstance(part, dict):
            out.append({"type": "text", "text": str(part)})
        elif part.get("type") == "text":
            out.append({"type": "text", "text": part.get("text", "") or ""})
        else:
            entry: dict[str, Any] = {"type": part.get("type")}
            file_obj = part.get("file")
            filename = (file_obj.get("filename") if isinstance(file_obj, dict) else None) or part.get("filename")
            if filename:
                entry["filename"] = filename
            out.append(entry)
    return out


def _message(msg: dict[str, Any]) -> dict[str, Any]:
    role = msg.get("role")
    if role in ("system", "developer"):
        return {"role": "system", "content": msg.get("content")}
    if role == "user":
        return {"role": "user", "content": _user_content(msg.get("content"))}
    if role == "assistant":
        out: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
        if tool_calls := msg.get("tool_calls"):
            out["tool_calls"] = [{"id": tc.get("id", ""), "type": tc.get("type", "function"),
                                  "function": {"name": tc.get("function", {}).get("name", ""),
                                               "arguments": tc.get("function", {}).get("arguments", "")}}
                                 for tc in tool_calls]
        return out
    if role == "tool":
        return {"role": "tool", "content": msg.get("content"), "tool_call_id": msg.get("tool_call_id")}
    if role == "function":
        return {"role": "function", "content": msg.get("content"), "name": msg.get("name")}
    raise UnsupportedRequestError(f"unknown message role: {role!r}")


def canonical_request(body: Any) -> dict[str, Any]:
    """The fields of a chat-completions request the enclave commits to (tool_choice, n, top_p,
    stream options and the like are not hashed)."""
    if not isinstance(body, dict):
        raise UnsupportedRequestError("request body must be a JSON object")
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model:
        raise UnsupportedRequestError("request is missing a 'model'")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise UnsupportedRequestError("request is missing 'messages' (a list of objects)")
    temperature = body.get("temperature")
    canonical: dict[str, Any] = {"model": model, "messages": [_message(m) for m in messages],
                                 "temperature": float(temperature) if temperature is not None else 0.0}
    if body.get("max_tokens") is not None:
        canonical["max_tokens"] = body["max_tokens"]
    if body.get("stop"):
        canonical["stop"] = body["stop"]
    if body.get("tools"):
        if not isinstance(body["tools"], list):
            raise UnsupportedRequestError("'tools' must be a list")
        canonical["tools"] = body["tools"]
    if body.get("response_format"):
        canonical["response_format"] = body["response_format"]
    if body.get("web_search"):
        canonical["web_search"] = True
    return canonical


def request_hash(body: Any) -> bytes:
    return keccak(json.dumps(canonical_request(body), sort_keys=True).encode())


def output_text(message: dict[str, Any], finish_reason: Any) -> str:
    """What the enclave hashes as its output: the assistant's text, or its tool calls."""
    if finish_reason == "tool_calls" and isinstance(message.get("tool_calls"), list):
        return json.dumps(message["tool_calls"], sort_keys=True)
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return ""


def completion_output(doc: dict[str, Any]) -> str:
    choices = doc.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    return output_text(message, choice.get("finish_reason")) if isinstance(message, dict) else ""


def message_hash(req_hash: bytes, out_hash: bytes, timestamp: int) -> bytes:
    return keccak(req_hash + out_hash + timestamp.to_bytes(32, "big"))


# -- signing (the stand-in enclave) and checking (the gateway) --------------------------------


def sign(key: RSAPrivateKey, req_hash: bytes, out_hash: bytes, timestamp: int) -> TeeProof:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    signature = key.sign(message_hash(req_hash, out_hash, timestamp), PSS, hashes.SHA256())
    return TeeProof(base64.b64encode(signature).decode(), req_hash.hex(), out_hash.hex(), timestamp, tee_id_of(der))


def proof_of(doc: dict[str, Any]) -> TeeProof:
    """The proof fields of a response body (or a stream's final frame)."""
    missing = [f for f in PROOF_FIELDS if f not in doc]
    if missing:
        raise ProofError("missing", f"the enclave's response carries no proof ({', '.join(missing)} missing)")
    values = {f: doc[f] for f in PROOF_FIELDS}
    ts = values["tee_timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, int) or not all(
            isinstance(values[f], str) for f in PROOF_FIELDS if f != "tee_timestamp"):
        raise ProofError("malformed", "the enclave's proof fields have the wrong types")
    return TeeProof(values["tee_signature"], values["tee_request_hash"], values["tee_output_hash"], ts,
                    values["tee_id"])


@dataclass(frozen=True, slots=True)
class EnclaveKey:
    """An enclave's registered signing key (DER SubjectPublicKeyInfo) and the tee_id it keys."""

    der: bytes
    key: RSAPublicKey
    tee_id: str

    @classmethod
    def from_der(cls, der: bytes) -> EnclaveKey:
        key = serialization.load_der_public_key(der)
        if not isinstance(key, RSAPublicKey):
            raise ValueError("the registered public key is not an RSA key")
        return cls(der, key, tee_id_of(der))


def check(proof: TeeProof, enclave: EnclaveKey, forwarded_body: Any, output: str, *, now: float,
          max_age_s: float, max_skew_s: float) -> None:
    """Raises ProofError unless `proof` is the registered enclave's signature over the request the
    gateway forwarded and the output it received, made recently."""
    if _strip0x(proof.tee_id).lower() != _strip0x(enclave.tee_id).lower():
        raise ProofError("other_key", f"signed as {proof.tee_id}, but the registered enclave is {enclave.tee_id}")
    try:
        req_hash = request_hash(forwarded_body)
    except UnsupportedRequestError as exc:
        raise ProofError("request_unhashable", str(exc)) from None
    if req_hash.hex() != _strip0x(proof.request_hash).lower():
        raise ProofError("request_hash", "the enclave signed another request than the one forwarded")
    out_hash = keccak(output.encode())
    if out_hash.hex() != _strip0x(proof.output_hash).lower():
        raise ProofError("output_hash", "the enclave's signature does not cover the content received")
    if proof.timestamp < now - max_age_s or proof.timestamp > now + max_skew_s:
        raise ProofError("stale", f"the signature's timestamp {proof.timestamp} is not fresh")
    try:
        signature = base64.b64decode(proof.signature, validate=True)
        enclave.key.verify(signature, message_hash(req_hash, out_hash, proof.timestamp), PSS, hashes.SHA256())
    except (InvalidSignature, binascii.Error, ValueError):
        raise ProofError("bad_signature", "the RSA-PSS signature does not verify with the registered key") from None
