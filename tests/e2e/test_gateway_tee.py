"""TEE-hosted providers (issue 13): a `tee` upstream whose enclaves come from the dev chain's
registry, reached over TLS pinned to each registered certificate, each answer's proof verified
before it is settled.

Stand-in enclaves (devtools/tee_enclave.py, HTTPS): "good" and "spare" heartbeat every second;
"stale" never heartbeats (the gateway's heartbeat_max_age_s is short); "wrongcert" presents a
certificate other than its registered one. Ejection after repeated faults is off here (the
fault-mode calls make honest enclaves misbehave on purpose): tests/integration/test_tee_pool.py shows it.

Shown here: a paid JSON call and a paid (buffered) stream whose proofs OpenGradient's own
`verify_response` accepts (their SDK, .venv-og, as a subprocess); every fault mode not served and
not charged (balances unchanged), the same payment then still good, the enclave counted faulty;
the wrong certificate refused in the handshake (the enclave never sees a request); a stale
heartbeat and a disabled enclave out of rotation within one refresh interval, the others carrying on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from devtools import tee_registry
from devtools.devchain import calldata
from devtools.devconfig import dev_settings
from devtools.rpc import BlockingRpc
from devtools.tee_enclave import EnclaveIdentity
from gateway.tee import merkle
from tests.budget_helpers import ADMIN_TOKEN, Admin
from tests.conftest import ROOT, _port
from tests.gateway_client import CHAT, Balances, Processes, call, facilitator_env, sign_for
from tests.payments import sign_async
from tests.tee_helpers import Enclave, stats
from tests.upto_helpers import payment_event, sign_upto, upto_accept, upto_client

pytestmark = pytest.mark.e2e

AGENT = 2
REFRESH_S = 1.0
HEARTBEAT_MAX_AGE_S = 6.0
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "prove it"}], "max_tokens": 20}
STREAM = BODY | {"stream": True}


def chat_calls(enclave: Any) -> int:
    return stats(enclave)["by_path"].get(CHAT, 0)


def metrics(gw: Any) -> str:
    with urllib.request.urlopen(gw.url + "/metrics", timeout=5) as r:
        return r.read().decode()


def metric(gw: Any, name: str, **labels: str) -> float:
    total = 0.0
    for line in metrics(gw).splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def stack(devchain: dict, devchain_file: str, redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("gateway-tee")
    procs = Processes(devchain_file, tmp)
    enclaves: dict[str, Any] = {}
    ids: dict[str, str] = {}
    try:
        for i, name in enumerate(("good", "spare", "stale", "wrongcert")):
            identity = EnclaveIdentity.load_or_create(tmp / name)
            port = _port()
            argv = [sys.executable, "-m", "devtools.upstream", "--port", str(port), "--name", name,
                    "--tee-dir", str(tmp / name)]
            if name != "stale":
                argv += ["--tee-heartbeat-s", "1", "--tee-rpc", devchain["rpc_url"], "--tee-registry",
                         devchain["contracts"]["tee_registry"], "--tee-chain-id", str(devchain["chain_id"]),
                         "--tee-operator-key", devchain["accounts"]["tee_operators"][i % 3]["private_key"]]
            if name == "wrongcert":
                argv += ["--tee-fault", "wrong-certificate"]
            ids[name] = tee_registry.register(devchain, identity, f"https://127.0.0.1:{port}", operator_index=i % 3)
            proc = Enclave(argv, port, dict(os.environ), Path(tmp) / f"{name}.log")
            procs.started.append(proc)
            enclaves[name] = proc.start()
        gateways = []
        for metered in (False, True):
            settings = dev_settings(devchain, devchain_file=devchain_file, upstream_urls=["http://127.0.0.1:9"],
                                    metered=metered)
            config = settings.model_dump(mode="json", exclude_none=True)
            config["upstreams"]["tee"] = {"kind": "tee", "timeout_s": 30, "tee": {
                "registry": devchain["contracts"]["tee_registry"], "rpc_url": devchain["rpc_url"],
                "refresh_s": REFRESH_S, "heartbeat_max_age_s": HEARTBEAT_MAX_AGE_S, "eject_after": 1000,
                "eject_s": 600}}
            for route in config["routes"]:
                if route["path"] == CHAT:
                    route["upstream"] = "tee"
            prefix = f"gwtee:{uuid.uuid4().hex[:8]}:"
            # A budget for the paying agent: every refused call must give its hold back.
            config["budgets"] = {"store_url": redis_server.url, "store_prefix": f"{prefix}b:", "timezone": "UTC",
                                 "default": "deny", "policies": [{
                                     "agent": devchain["accounts"]["agents"][AGENT]["address"],
                                     "network": devchain["network"], "asset": devchain["tokens"]["OPG"]["address"],
                                     "limits": [{"period": "day", "amount": str(10**24)}]}]}
            if not metered:  # proofs anchored by this one (one signer: the relay's owner)
                config["proofs"] = {"relay": devchain["contracts"]["settlement_relay"], "rpc_url": devchain["rpc_url"],
                                    "chain_id": devchain["chain_id"], "interval_s": 1.0, "blob_dir": str(tmp / "blobs"),
                                    "signer_key": devchain["accounts"]["tee_admin"]["private_key"]}
            path = Path(tmp) / f"gateway-{metered}.json"
            path.write_text(json.dumps(config))
            env = facilitator_env(devchain, int(metered), prefix) | {"GATEWAY_STORE_PREFIX": prefix + "gw:",
                                                                      "BUDGETS_ADMIN_TOKEN": ADMIN_TOKEN}
            gateways.append(procs.gateway("", redis_server.url, env=env, config=str(path)))
        yield gateways[0], enclaves, ids, gateways[1], tmp / "blobs"
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def og_python() -> str | None:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "og-venv.sh")], capture_output=True, text=True, timeout=900)
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else None


def og_verify(og_python: str | None, request: dict, response: dict, content: str, key_der: bytes) -> dict:
    """OpenGradient's `verify_response`, in their SDK's virtualenv."""
    if og_python is None:
        pytest.skip("OpenGradient's SDK virtualenv could not be built")
    script = (
        "import json, sys\n"
        "from opengradient.client.tee_verify import build_inner_request, pem_from_der, verify_response\n"
        "d = json.load(sys.stdin)\n"
        "_, canonical = build_inner_request(d['request'])\n"
        "p = verify_response(canonical_request=canonical, response_body=d['response'], response_content=d['content'],"
        " signing_key_pem=pem_from_der(bytes.fromhex(d['key'])))\n"
        "print(json.dumps({'tee_id': p.tee_id, 'request_hash': p.request_hash}))\n")
    proc = subprocess.run([og_python, "-c", script], input=json.dumps(
        {"request": request, "response": response, "content": content, "key": key_der.hex()}),
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def sse_frames(body: bytes) -> list[dict]:
    return [json.loads(line[5:]) for line in body.decode().splitlines()
            if line.startswith("data:") and line[5:].strip() != "[DONE]"]


async def paid(gw: Any, devchain: dict, body: dict, headers: dict[str, str] | None = None,
               payment: dict | None = None) -> tuple[Any, dict]:
    payment = payment or await sign_for(devchain, gw.url + CHAT, body, agent=AGENT)
    return await call(gw.url + CHAT, body, payment=payment, headers=headers), payment


async def test_paid_json_and_stream_carry_proofs_opengradient_accepts(stack: Any, devchain: dict, og_python: Any,
                                                                      tmp_path_factory: Any) -> None:
    gw, enclaves, ids, _, _ = stack
    balances = Balances(devchain, "OPG", AGENT)
    reply, payment = await paid(gw, devchain, BODY)
    assert reply.status == 200 and reply.settle is not None and reply.settle.success, reply
    doc = reply.json()
    tee_id = doc["tee_id"]
    assert tee_id in ids.values() and reply.headers["X-TEE-ID"] == tee_id
    assert reply.headers["X-TEE-Signature"] == doc["tee_signature"]
    name = next(n for n, i in ids.items() if i == tee_id)
    key = EnclaveIdentity.load_or_create(Path(enclaves[name].log).parent / name).public_key_der
    content = doc["choices"][0]["message"]["content"]
    assert og_verify(og_python, BODY, doc, content, key)["tee_id"] == tee_id

    streamed, _ = await paid(gw, devchain, STREAM)
    assert streamed.status == 200 and streamed.settle is not None and streamed.settle.success, streamed
    frames = sse_frames(streamed.body)
    final = frames[-1]
    text = "".join(c["delta"].get("content") or "" for f in frames for c in f.get("choices") or [])
    name = next(n for n, i in ids.items() if i == final["tee_id"])
    key = EnclaveIdentity.load_or_create(Path(enclaves[name].log).parent / name).public_key_der
    assert og_verify(og_python, STREAM, final, text, key)["tee_id"] == final["tee_id"]
    price = int(payment["accepted"]["amount"])
    assert balances.moved() == (2 * price, 2 * price)


@pytest.mark.parametrize("fault,reason", [("bad-signature", "bad_signature"), ("other-key", "bad_signature"),
                                          ("unregistered", "other_key"), ("stale-timestamp", "stale"),
                                          ("no-proof", "missing")])
async def test_fault_modes_are_not_served_nor_charged(stack: Any, devchain: dict, fault: str, reason: str) -> None:
    gw, enclaves, ids, _, _ = stack
    faults_before = metric(gw, "x402_gateway_tee_faults_total", reason=reason)
    balances = Balances(devchain, "OPG", AGENT)
    admin, agent = Admin(gw.url), devchain["accounts"]["agents"][AGENT]["address"]
    for body in (BODY, STREAM):
        reply, payment = await paid(gw, devchain, body, headers={"X-Devupstream-Tee-Fault": fault})
        assert reply.status == 502 and reply.settle is None, reply
        error = reply.json()
        assert error["error"] == "tee_proof_invalid" and reason in error["message"], error
        assert "Echo" not in reply.body.decode() and "choices" not in error, error
        assert balances.moved() == (0, 0)
        spent = (await admin.usage(agent))["spent"]
        assert (await admin.wait_usage(agent, reserved=0))["reserved"] == 0  # the hold was released
        # Nothing was charged nor held: the same payment pays for a good call.
        ok, _ = await paid(gw, devchain, body, payment=payment)
        assert ok.status == 200 and ok.settle is not None and ok.settle.success, ok
        usage = await admin.wait_usage(agent, spent=spent + int(payment["accepted"]["amount"]), reserved=0)
        assert (usage["spent"], usage["reserved"]) == (spent + int(payment["accepted"]["amount"]), 0), usage
        balances = Balances(devchain, "OPG", AGENT)
    assert metric(gw, "x402_gateway_tee_faults_total", reason=reason) == faults_before + 2


async def test_wrong_certificate_is_refused_before_any_request(stack: Any, devchain: dict) -> None:
    gw, enclaves, ids, _, _ = stack
    for _ in range(8):  # round robin reaches it; the call goes on to another enclave
        reply, _ = await paid(gw, devchain, BODY)
        assert reply.status == 200 and reply.json()["tee_id"] != ids["wrongcert"], reply
    assert chat_calls(enclaves["wrongcert"]) == 0  # the handshake failed: no request was ever sent
    assert metric(gw, "x402_gateway_tee_faults_total", tee_id=ids["wrongcert"], reason="tls_certificate") >= 1


async def test_stale_heartbeat_and_disabled_enclave_leave_rotation(stack: Any, devchain: dict) -> None:
    gw, enclaves, ids, _, _ = stack
    # "stale" was registered (its last heartbeat) at the fixture's start and never beat again.
    await asyncio.sleep(max(0.0, HEARTBEAT_MAX_AGE_S + REFRESH_S))
    stale_before = chat_calls(enclaves["stale"])
    tee_registry.set_enabled(devchain, ids["spare"], False)
    await asyncio.sleep(REFRESH_S * 1.5)  # one refresh interval (and the time one takes)
    spare_before, good_before = chat_calls(enclaves["spare"]), chat_calls(enclaves["good"])
    for _ in range(4):
        reply, _ = await paid(gw, devchain, BODY)
        assert reply.status == 200 and reply.json()["tee_id"] == ids["good"], reply
    assert chat_calls(enclaves["stale"]) == stale_before and chat_calls(enclaves["spare"]) == spare_before
    assert chat_calls(enclaves["good"]) == good_before + 4
    assert metric(gw, "x402_gateway_tee_in_rotation", tee_id=ids["spare"]) == 0
    tee_registry.set_enabled(devchain, ids["spare"], True)


async def test_metered_stream_is_settled_only_after_its_proof_verifies(stack: Any, devchain: dict,
                                                                        og_python: Any) -> None:
    _, enclaves, ids, metered, _ = stack
    url = metered.url + CHAT
    client = upto_client(devchain, Account.from_key(devchain["accounts"]["agents"][AGENT]["private_key"]))
    admin, agent = Admin(metered.url), devchain["accounts"]["agents"][AGENT]["address"]
    balances = Balances(devchain, "OPG", AGENT)
    offer = upto_accept(await call(url, STREAM))
    good = await call(url, STREAM, headers={"PAYMENT-SIGNATURE": await sign_upto(client, offer, url)})
    assert good.status == 200, good
    settled = payment_event(good.body.decode())
    assert settled["success"] is True and int(settled["amount"]) > 0, settled
    frames = sse_frames(good.body.split(b"event: x402.payment")[0])
    final = frames[-1]
    text = "".join(c["delta"].get("content") or "" for f in frames for c in f.get("choices") or [])
    name = next(n for n, i in ids.items() if i == final["tee_id"])
    key = EnclaveIdentity.load_or_create(Path(enclaves[name].log).parent / name).public_key_der
    assert og_verify(og_python, STREAM, final, text, key)["tee_id"] == final["tee_id"]
    assert balances.moved() == (int(settled["amount"]),) * 2
    # Paid exact on the same route: buffered, verified, settled, then sent; without the usage the
    # gateway asked the enclave for, and with the proof frame.
    exact = next(a for a in (await call(url, STREAM)).required.accepts if a.scheme == "exact")
    payload = await sign_async(devchain, exact.model_dump(by_alias=True, exclude_none=True), agent=AGENT, url=url)
    whole = await call(url, STREAM, payment=payload)
    assert whole.status == 200 and whole.settle is not None and whole.settle.success, whole
    frames = sse_frames(whole.body)
    assert not any("usage" in f for f in frames) and "tee_signature" in frames[-1], frames
    text = "".join(c["delta"].get("content") or "" for f in frames for c in f.get("choices") or [])
    name = next(n for n, i in ids.items() if i == frames[-1]["tee_id"])
    key = EnclaveIdentity.load_or_create(Path(enclaves[name].log).parent / name).public_key_der
    assert og_verify(og_python, STREAM, frames[-1], text, key)["tee_id"] == frames[-1]["tee_id"]
    # A bad proof on the final frame: the tokens went by, but nothing is settled nor held.
    balances = Balances(devchain, "OPG", AGENT)
    bad = await call(url, STREAM, headers={"PAYMENT-SIGNATURE": await sign_upto(client, offer, url),
                                           "X-Devupstream-Tee-Fault": "bad-signature"})
    refused = payment_event(bad.body.decode())
    assert refused["success"] is False and refused["errorReason"] == "tee_proof_invalid", refused
    assert balances.moved() == (0, 0)
    assert (await admin.wait_usage(agent, reserved=0))["reserved"] == 0


async def proof_of(gw: Any, request_hash: str, deadline_s: float = 20.0) -> Any:
    end = time.monotonic() + deadline_s
    while True:
        reply = await call(f"{gw.url}/v1/proofs/{request_hash}", method="GET")
        if reply.status != 202 or time.monotonic() > end:
            return reply
        await asyncio.sleep(0.2)


async def test_proofs_are_anchored_in_merkle_batches_and_individually(stack: Any, devchain: dict) -> None:
    gw, _, _, _, blob_dir = stack
    kinds = ["batch", "batch", "individual", "private"]
    replies = []
    for i, kind in enumerate(kinds):
        body = BODY | {"messages": [{"role": "user", "content": f"anchor me {i} {uuid.uuid4().hex}"}]}
        reply, _ = await paid(gw, devchain, body, headers={"X-SETTLEMENT-TYPE": kind})
        assert reply.status == 200 and reply.headers["X-Settlement-Type"] == kind, reply
        replies.append(reply)
    rpc = BlockingRpc(devchain["rpc_url"])
    relay = devchain["contracts"]["settlement_relay"]
    try:
        for reply in replies[:2]:
            found = await proof_of(gw, reply.headers["X-TEE-Request-Hash"])
            assert found.status == 200, found
            doc = found.json()
            assert found.headers["X-Settlement-Tx-Hash"] == doc["transaction"]
            leaf = [bytes.fromhex(doc["leaf"][k][2:]) for k in ("inputHash", "outputHash", "teeSignatureHash")]
            assert doc["leaf"]["inputHash"][2:] == reply.json()["tee_request_hash"]
            root, path = bytes.fromhex(doc["root"][2:]), [bytes.fromhex(p[2:]) for p in doc["path"]]
            assert merkle.verify(path, root, merkle.leaf_hash(leaf))
            # On chain, by OpenZeppelin's MerkleProof against the anchored root.
            data = calldata("verifyInclusion(bytes32[],bytes32,bytes32,bytes32,bytes32)",
                            ["bytes32[]", "bytes32", "bytes32", "bytes32", "bytes32"], [path, root, *leaf])
            assert int(rpc.call("eth_call", {"to": relay, "data": "0x" + data.hex()}, "latest"), 16) == 1
            receipt = rpc.call("eth_getTransactionReceipt", doc["transaction"])
            assert int(receipt["status"], 16) == 1 and receipt["logs"][0]["topics"][1] == doc["root"]
            blob = (blob_dir / doc["blob_id"]).read_bytes()
            assert hashlib.sha256(blob).hexdigest() == doc["blob_id"]
            assert json.loads(blob)["tree"]["tree"][0] == doc["root"]
        individual = await proof_of(gw, replies[2].headers["X-TEE-Request-Hash"])
        assert individual.status == 200 and individual.json()["settlement_type"] == "individual", individual
        receipt = rpc.call("eth_getTransactionReceipt", individual.json()["transaction"])
        assert int(receipt["status"], 16) == 1 and len(receipt["logs"]) == 1
        private = await call(f"{gw.url}/v1/proofs/{replies[3].headers['X-TEE-Request-Hash']}", method="GET")
        assert private.status == 404, private
    finally:
        rpc.close()
    assert metric(gw, "x402_gateway_tee_proof_batch_lag_seconds_count") >= 3
