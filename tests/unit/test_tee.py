"""TEE proofs (gateway/tee/proof.py) and an enclave's way out of rotation (gateway/tee/pool.py),
without a network: the e2e cases are in tests/e2e/test_gateway_tee.py."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from eth_utils import keccak

from devtools.tee_enclave import new_key, self_signed
from gateway.settings import Upstream
from gateway.tee import proof as P
from gateway.tee.pool import Enclave, TeePool, pinned_context
from gateway.tee.verify import StreamProofReader

KEY = new_key()
OTHER = new_key()
DER = P.EnclaveKey.from_der(KEY.public_key().public_bytes(serialization.Encoding.DER,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
BODY = {"model": "m", "messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "hi"}],
        "tool_choice": "auto", "max_tokens": 5}


def signed(output: str, *, key: Any = KEY, age_s: int = 0) -> P.TeeProof:
    return P.sign(key, P.request_hash(BODY), keccak(output.encode()), int(time.time()) - age_s)


def check(proof: P.TeeProof, output: str = "Echo: hi", body: Any = BODY) -> None:
    P.check(proof, DER, body, output, now=time.time(), max_age_s=300, max_skew_s=30)


def test_canonical_request_is_what_opengradient_hashes() -> None:
    canonical = P.canonical_request(BODY)
    assert canonical == {"model": "m", "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}],
                         "temperature": 0.0, "max_tokens": 5}
    assert P.request_hash(BODY) == keccak(json.dumps(canonical, sort_keys=True).encode())


def test_a_good_proof_holds_and_every_bad_one_has_its_reason() -> None:
    check(signed("Echo: hi"))
    cases = {
        "output_hash": (signed("Echo: hi"), "Echo: bye", BODY),
        "request_hash": (signed("Echo: hi"), "Echo: hi", BODY | {"max_tokens": 6}),
        "stale": (signed("Echo: hi", age_s=3600), "Echo: hi", BODY),
        "other_key": (signed("Echo: hi", key=OTHER), "Echo: hi", BODY),
    }
    forged = signed("Echo: hi", key=OTHER)
    cases["bad_signature"] = (P.TeeProof(forged.signature, forged.request_hash, forged.output_hash, forged.timestamp,
                                         DER.tee_id), "Echo: hi", BODY)
    for reason, (proof, output, body) in cases.items():
        with pytest.raises(P.ProofError) as err:
            check(proof, output, body)
        assert err.value.reason == reason
    with pytest.raises(P.ProofError) as err:
        P.proof_of({"tee_signature": "x"})
    assert err.value.reason == "missing"


def test_stream_reader_finds_the_text_and_the_final_frame() -> None:
    proof = signed("Echo: hi")
    frames = [{"choices": [{"index": 0, "delta": {"content": "Echo:"}}]},
              {"choices": [{"index": 0, "delta": {"content": " hi"}, "finish_reason": "stop"}]},
              {"choices": [], "usage": {"total_tokens": 3}} | proof.fields()]
    reader = StreamProofReader()
    raw = b"".join(b"data: " + json.dumps(f).encode() + b"\n\n" for f in frames) + b"data: [DONE]\n\n"
    for i in range(0, len(raw), 7):  # split anywhere
        reader.feed(raw[i:i + 7])
    assert reader.output() == "Echo: hi" and reader.final is not None
    check(P.proof_of(reader.final), reader.output())


def test_repeated_faults_take_an_enclave_out_of_rotation() -> None:
    pool = TeePool("tee", Upstream.model_validate({"kind": "tee", "tee": {
        "registry": "0x" + "11" * 20, "rpc_url": "http://127.0.0.1:9", "eject_after": 3, "eject_s": 60}}))
    cert = self_signed(KEY).public_bytes(serialization.Encoding.DER)
    enclave = Enclave(DER.tee_id, "https://127.0.0.1:1", DER, cert, pinned_context(cert), "0x" + "22" * 20,
                      int(time.time()))
    pool.enclaves[enclave.tee_id] = enclave
    pool.fault(enclave, "bad_signature")
    pool.fault(enclave, "stale")
    assert pool.eligible() == [enclave]
    pool.verified(enclave)  # a good answer resets the count
    for _ in range(3):
        pool.fault(enclave, "bad_signature")
    assert pool.eligible() == []
    enclave.ejected_until = 0.0
    enclave.last_heartbeat_at = int(time.time()) - 3600  # older than heartbeat_max_age_s (1800)
    assert pool.eligible() == []
