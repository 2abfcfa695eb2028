"""The stand-in provider's `tee` mode: an enclave as OpenGradient's clients see one.

- An identity (`EnclaveIdentity`): an RSA-2048 signing key and a self-signed TLS certificate,
  kept in a directory (created on first use), registered in the dev chain's TEE registry by the
  owner (devtools/tee_registry.py).
- Chat completions signed exactly as OpenGradient's tee-gateway signs them (gateway/tee/proof.py):
  the proof fields in the JSON body, or on the final SSE frame, and X-TEE-* headers on JSON answers.
- Heartbeats to the registry on an interval (the operator's key), when asked.
- Fault modes, for every call (`--tee-fault`) or per request (`X-Devupstream-Tee-Fault`):
  `bad-signature` (signature bytes flipped), `other-key` (signed with another key, claiming the
  registered tee_id), `unregistered` (signed with a key the registry does not know, honestly
  named), `stale-timestamp` (signed an hour ago), `no-proof` (no proof fields), and, for the whole
  process only, `wrong-certificate` (TLS presents a certificate other than the registered one).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.x509.oid import NameOID
from eth_account import Account
from eth_utils import keccak
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from devtools.devchain import calldata
from facilitator.evm.rpc import JsonRpcClient
from gateway.tee import proof as tee_proof

log = logging.getLogger(__name__)

TEE_FAULT_HEADER = "x-devupstream-tee-fault"
REQUEST_FAULTS = frozenset({"bad-signature", "other-key", "unregistered", "stale-timestamp", "no-proof"})
PROCESS_FAULTS = REQUEST_FAULTS | {"wrong-certificate"}
STALE_S = 3600


def new_key() -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def self_signed(key: RSAPrivateKey, name: str = "devtools-tee") -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


def _pem_key(key: RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _rsa(path: Path) -> RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    if not isinstance(key, RSAPrivateKey):
        raise ValueError(f"{path} is not an RSA key")
    return key


@dataclass(frozen=True)
class EnclaveIdentity:
    """Signing key (also the TLS key) and certificate of one stand-in enclave, in `directory`:
    key.pem, cert.pem, plus other.pem (the `other-key` / `unregistered` faults' key) and
    wrong-cert.pem + wrong-key.pem (the `wrong-certificate` fault's TLS identity)."""

    directory: Path
    key: RSAPrivateKey
    certificate: x509.Certificate
    other_key: RSAPrivateKey

    @classmethod
    def load_or_create(cls, directory: str | Path) -> EnclaveIdentity:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        files = {n: d / n for n in ("key.pem", "cert.pem", "other.pem", "wrong-key.pem", "wrong-cert.pem")}
        if not all(p.is_file() for p in files.values()):
            key, other, wrong = new_key(), new_key(), new_key()
            files["key.pem"].write_bytes(_pem_key(key))
            files["cert.pem"].write_bytes(self_signed(key).public_bytes(serialization.Encoding.PEM))
            files["other.pem"].write_bytes(_pem_key(other))
            files["wrong-key.pem"].write_bytes(_pem_key(wrong))
            files["wrong-cert.pem"].write_bytes(self_signed(wrong).public_bytes(serialization.Encoding.PEM))
        return cls(d, _rsa(files["key.pem"]), x509.load_pem_x509_certificate(files["cert.pem"].read_bytes()),
                   _rsa(files["other.pem"]))

    @property
    def public_key_der(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def tee_id(self) -> str:
        return tee_proof.tee_id_of(self.public_key_der)

    def tls_files(self, *, wrong: bool = False) -> tuple[str, str]:
        """(certfile, keyfile) for the HTTPS server."""
        if wrong:
            return str(self.directory / "wrong-cert.pem"), str(self.directory / "wrong-key.pem")
        return str(self.directory / "cert.pem"), str(self.directory / "key.pem")


# -- signing -----------------------------------------------------------------------------------


def _fault_of(request: Request, default: str | None) -> str | None:
    fault = request.headers.get(TEE_FAULT_HEADER) or default
    if fault is not None and fault not in PROCESS_FAULTS:
        raise ValueError(f"unknown {TEE_FAULT_HEADER} value {fault!r}")
    return fault


def make_proof(identity: EnclaveIdentity, request_body: dict[str, Any], output: str,
               fault: str | None) -> tee_proof.TeeProof | None:
    if fault == "no-proof":
        return None
    timestamp = int(time.time()) - (STALE_S if fault == "stale-timestamp" else 0)
    key = identity.other_key if fault in ("other-key", "unregistered") else identity.key
    proof = tee_proof.sign(key, tee_proof.request_hash(request_body), keccak(output.encode()), timestamp)
    if fault == "other-key":  # a forger claiming the registered enclave's id
        proof = tee_proof.TeeProof(proof.signature, proof.request_hash, proof.output_hash, proof.timestamp,
                                   identity.tee_id)
    if fault == "bad-signature":
        raw = bytearray(base64.b64decode(proof.signature))
        raw[len(raw) // 2] ^= 0xFF
        proof = tee_proof.TeeProof(base64.b64encode(bytes(raw)).decode(), proof.request_hash,
                                   proof.output_hash, proof.timestamp, proof.tee_id)
    return proof


def sign_json(identity: EnclaveIdentity, request_body: dict[str, Any], response: Response,
              fault: str | None) -> Response:
    doc = orjson.loads(response.body)
    proof = make_proof(identity, request_body, tee_proof.completion_output(doc), fault)
    if proof is None:
        return response
    headers = proof.headers()
    return Response(orjson.dumps(doc | proof.fields()), status_code=response.status_code,
                    media_type="application/json", headers=headers)


async def sign_stream(identity: EnclaveIdentity, request_body: dict[str, Any], events: AsyncIterable[Any],
                      fault: str | None) -> AsyncIterator[bytes]:
    """The stream's events as they come, one held back: the last data frame before [DONE] gets the
    proof over the concatenated content deltas."""
    held: bytes | None = None
    parts: list[str] = []
    async for raw in events:
        event = raw if isinstance(raw, bytes) else raw.encode()
        if event.startswith(b"data: [DONE]"):
            if held is not None:
                doc = orjson.loads(held[len(b"data: "):])
                proof = make_proof(identity, request_body, "".join(parts), fault)
                yield b"data: " + orjson.dumps(doc | (proof.fields() if proof else {})) + b"\n\n"
                held = None
            yield event
            continue
        if held is not None:
            yield held
        held = event
        if event.startswith(b"data: "):
            doc = orjson.loads(event[len(b"data: "):])
            for choice in doc.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if isinstance(piece, str):
                    parts.append(piece)
    if held is not None:
        yield held


def signed(request: Request, request_body: dict[str, Any], response: Response) -> Response:
    """The provider's answer to a chat completion, signed as the enclave (errors are not signed)."""
    identity: EnclaveIdentity = request.app.state.tee
    fault = _fault_of(request, request.app.state.tee_fault)
    if response.status_code != 200:
        return response
    if isinstance(response, StreamingResponse):
        response.body_iterator = sign_stream(identity, request_body, response.body_iterator, fault)
        return response
    return sign_json(identity, request_body, response, fault)


# -- heartbeats --------------------------------------------------------------------------------


async def heartbeats(identity: EnclaveIdentity, rpc_url: str, registry: str, operator_key: str,
                     chain_id: int, every_s: float) -> None:
    """Send heartbeat(teeId) to the registry every `every_s` seconds, as the enclave's operator."""
    account = Account.from_key(operator_key)
    rpc = JsonRpcClient(rpc_url)
    data = calldata("heartbeat(bytes32)", ["bytes32"], [bytes.fromhex(identity.tee_id[2:])])
    try:
        while True:
            try:
                nonce = int(await rpc.call("eth_getTransactionCount", [account.address, "pending"]), 16)
                tx = {"to": registry, "data": data, "gas": 100_000, "chainId": chain_id, "nonce": nonce, "type": 2,
                      "maxFeePerGas": 100 * 10**9, "maxPriorityFeePerGas": 10**9, "value": 0}
                raw = account.sign_transaction(tx).raw_transaction
                await rpc.call("eth_sendRawTransaction", ["0x" + bytes(raw).hex()])
            except Exception as exc:  # noqa: BLE001 - the next beat tries again
                log.warning("tee heartbeat failed: %s", exc)
            await asyncio.sleep(every_s)
    finally:
        await rpc.close()
