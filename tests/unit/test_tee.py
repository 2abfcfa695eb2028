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
from gateway.tee import merkle
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


# Roots and a proof computed by OpenZeppelin's own `@openzeppelin/merkle-tree` 1.0.8
# (StandardMerkleTree.of(values, ["bytes32","bytes32","bytes32"])) for the values of `_values`.
OZ_ROOTS = {
    1: "0x3305f256623a85e86ae3f95ee91309ec335927b227f7086fee09e6fd4141445f",
    2: "0xb93db78e507bde19d67ba6ab3cd2e383c5c49ca29c6a31f71fa55664bf5c926d",
    3: "0x0b77fab9f959db49fde68d7a12135ee71dbd63aba8080d34e30fd953b4950228",
    5: "0x77685e88fffe2993e5353d9ac659050ec7f9a05aec1c3a60b43529072a1d8df8",
    8: "0x71ed06cefbc5be8b544fa558c192f0b02394ffe6ae1b89e8170a9faae52278be",
}
OZ_PROOF_5_2 = [
    "0x5ea52d3045463c37a59db82bd634330190fe8b97a288513f2035705ae0189dd8",
    "0xc4b0a95cdada4d3cb42fd14871beb58891380cc1b9b33dd179279b904dd4b2c1",
    "0x0e313b3a3cb4a18c101945534054f0b5486dffc321fe5765d89858da0eaa1011",
]


def _values(n: int) -> list[list[bytes]]:
    return [[keccak(f"{k}{n}-{i}".encode()) for k in ("in", "out", "sig")] for i in range(n)]


def test_merkle_tree_matches_openzeppelins() -> None:
    for n, root in OZ_ROOTS.items():
        tree = merkle.StandardMerkleTree.of(_values(n))
        assert "0x" + tree.root.hex() == root
        for i, value in enumerate(_values(n)):
            assert merkle.verify(tree.proof(i), tree.root, merkle.leaf_hash(value))
    assert ["0x" + p.hex() for p in merkle.StandardMerkleTree.of(_values(5)).proof(2)] == OZ_PROOF_5_2


def test_no_enclave_in_rotation_is_a_503_before_payment() -> None:
    from starlette.requests import Request

    from gateway.errors import GatewayError
    from gateway.proxy import Upstreams

    pool = TeePool("og", Upstream.model_validate({"kind": "tee", "tee": {
        "registry": "0x" + "11" * 20, "rpc_url": "http://127.0.0.1:9", "refresh_s": 5}}))
    upstreams = Upstreams({"og": pool}, session=None)  # type: ignore[arg-type]
    request = Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []})
    with pytest.raises(GatewayError) as err:
        upstreams.admit(request, "og", b"{}", None)
    assert (err.value.status, err.value.reason, err.value.headers) == (503, "upstream_unavailable", {"Retry-After": "5"})
