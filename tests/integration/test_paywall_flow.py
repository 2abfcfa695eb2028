"""The paywall's flow in process, through its own interfaces: the gateway app under Starlette's
test client, a real SQLite record store, the stand-in provider over real HTTP, and a stand-in
facilitator speaking the FacilitatorClient protocol (so each outcome can be chosen). Payments are
signed by the official x402 client with a throwaway key; no chain is involved."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from eth_account import Account
from starlette.testclient import TestClient
from x402 import x402Client
from x402.mechanisms.evm.exact.register import register_exact_evm_client
from x402.schemas import PaymentRequired as SdkPaymentRequired

from devtools.upstream import create_upstream_app
from facilitator.x402.headers import decode_payment_required, decode_payment_response
from facilitator.x402.identity import payment_identity, signed_payload_digest
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import SettleResponse, VerifyResponse
from gateway.app import create_app
from gateway.errors import GatewayReason
from gateway.records import SQLitePaymentRecords
from gateway.settings import GatewaySettings
from tests.gateway_client import encode_payment

OPG = "0x" + "22" * 20
PAY_TO = "0x" + "11" * 20
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"  # the route with the payment-identifier extension on
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


class StandInFacilitator:
    """Verify and settle by the FacilitatorClient protocol, with outcomes the test picks. Only
    payloads the test issued are validly signed; settlement is idempotent per signed payment, as
    our facilitator's is."""

    trusted = False

    def __init__(self) -> None:
        self.genuine: set[str] = set()  # digests of payloads with a valid signature
        self.settled: dict[str, tuple[str, SettleResponse]] = {}  # payment key -> (digest, first result)
        self.settle_mode = "success"  # success | pending | refuse
        self.calls = {"verify": 0, "settle": 0}
        self.delay_s = {"verify": 0.0, "settle": 0.0}  # a facilitator that answers late

    def _identity(self, payload: Any, requirements: Any) -> tuple[str, str, str]:
        payer, key = payment_identity(payload.payload, requirements.network, requirements.asset)
        return payer, key, signed_payload_digest(payload.payload)

    async def verify(self, payload: Any, requirements: Any) -> VerifyResponse:
        self.calls["verify"] += 1
        await asyncio.sleep(self.delay_s["verify"])
        payer, key, digest = self._identity(payload, requirements)
        if digest not in self.genuine:
            return VerifyResponse(is_valid=False, invalid_reason=R.INVALID_PERMIT2_SIGNATURE.value, payer=payer)
        if key in self.settled:
            return VerifyResponse(is_valid=False, invalid_reason=R.PERMIT2_INVALID_NONCE.value, payer=payer)
        return VerifyResponse(is_valid=True, payer=payer)

    async def settle(self, payload: Any, requirements: Any) -> SettleResponse:
        self.calls["settle"] += 1
        await asyncio.sleep(self.delay_s["settle"])
        payer, key, digest = self._identity(payload, requirements)
        if key in self.settled:
            first_digest, first = self.settled[key]
            if first_digest == digest:
                return first
            return SettleResponse(success=False, error_reason=R.PERMIT2_INVALID_NONCE.value, transaction="",
                                  network=requirements.network, payer=payer)
        if self.settle_mode == "refuse":
            return SettleResponse(success=False, error_reason=R.INSUFFICIENT_FUNDS.value, transaction="",
                                  network=requirements.network, payer=payer)
        tx = "0x" + f"{len(self.settled) + 1:064x}"
        if self.settle_mode == "pending":
            return SettleResponse(success=False, error_reason=R.SETTLEMENT_PENDING.value, transaction=tx,
                                  network=requirements.network, payer=payer)
        result = SettleResponse(success=True, transaction=tx, network=requirements.network, payer=payer,
                                amount=requirements.amount)
        self.settled[key] = (digest, result)
        return result

    async def ready(self) -> bool:
        return True

    async def upto_signers(self) -> dict[str, str]:
        return {}

    def can_sign(self, address: str) -> bool:
        return False

    async def close(self) -> None:
        return None


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    """The stand-in provider under uvicorn in a thread of its own (the test client blocks)."""
    config = uvicorn.Config(create_upstream_app(), host="127.0.0.1", port=0, lifespan="off", log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the stand-in provider did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def facilitator() -> StandInFacilitator:
    return StandInFacilitator()


@pytest.fixture
def gateway(upstream_url: str, facilitator: StandInFacilitator, tmp_path: Path) -> Iterator[TestClient]:
    settings = GatewaySettings.model_validate({
        "pay_to": PAY_TO, "verify_timeout_s": 0.5, "settle_timeout_s": 0.5,
        "store_url": f"sqlite://{tmp_path / 'records.sqlite3'}",
        "accepts": [{"network": "eip155:8453", "asset": OPG, "symbol": "OPG", "decimals": 18,
                     "transfer_method": "permit2", "eip712_name": "OpenGradient", "eip712_version": "1"}],
        "upstreams": {"llm": {"urls": [upstream_url]}},
        "routes": [{"path": CHAT, "upstream": "llm", "price": "0.005"},
                   {"path": COMPLETIONS, "upstream": "llm", "price": "0.005", "payment_identifier": True}],
        "quote": {"rates": {"OPG": "1"}},
    })  # fmt: skip
    with TestClient(create_app(settings, facilitator=facilitator)) as client:
        yield client


def pay(client: TestClient, facilitator: StandInFacilitator, body: dict[str, Any] = BODY, *, account: Any = None,
        path: str = CHAT, payment_id: str | None = None) -> dict[str, Any]:
    """The official client's payment for what the gateway asks, registered as genuine."""
    challenge = client.post(path, json=body)
    assert challenge.status_code == 402
    required = decode_payment_required(challenge.headers["PAYMENT-REQUIRED"])
    sdk = x402Client()
    register_exact_evm_client(sdk, account or Account.create())
    sdk.set_spend_controls(False)
    wire = SdkPaymentRequired.model_validate(required.model_dump(by_alias=True, exclude_none=True))
    payload = asyncio.run(sdk.create_payment_payload(wire)).model_dump(by_alias=True, exclude_none=True)
    if payment_id is not None:
        payload["extensions"] = {"payment-identifier": {"info": {"id": payment_id}}}
    facilitator.genuine.add(signed_payload_digest(payload["payload"]))
    return payload


def send(client: TestClient, payment: dict[str, Any], body: dict[str, Any] = BODY, *, path: str = CHAT) -> Any:
    return client.post(path, json=body, headers={"PAYMENT-SIGNATURE": encode_payment(payment)})


def test_no_payment_gets_a_challenge_naming_the_price(gateway: TestClient) -> None:
    r = gateway.post(CHAT, json=BODY)
    assert r.status_code == 402 and r.json()["error"] == GatewayReason.PAYMENT_REQUIRED
    offer = decode_payment_required(r.headers["PAYMENT-REQUIRED"]).accepts[0]
    assert offer.amount == str(5 * 10**15) and offer.pay_to.lower() == PAY_TO and offer.asset.lower() == OPG


def test_a_payment_is_served_once_with_its_receipt_and_replayed_after(gateway: TestClient,
                                                                       facilitator: StandInFacilitator) -> None:
    payment = pay(gateway, facilitator)
    first = send(gateway, payment)
    assert first.status_code == 200, first.text
    assert decode_payment_response(first.headers["PAYMENT-RESPONSE"]).success
    again = send(gateway, payment)
    assert again.status_code == 200 and again.content == first.content
    assert facilitator.calls["settle"] == 1


def test_a_forged_copy_of_a_served_payment_gets_nothing(gateway: TestClient, facilitator: StandInFacilitator) -> None:
    payment = pay(gateway, facilitator)
    tx = decode_payment_response(send(gateway, payment).headers["PAYMENT-RESPONSE"]).transaction
    forged = copy.deepcopy(payment)
    forged["payload"]["signature"] = "0x" + "11" * 65
    r = send(gateway, forged)
    assert r.status_code == 402 and "PAYMENT-RESPONSE" not in r.headers and b"Echo" not in r.content
    # Refused by its signature at verify (this stand-in checks it first), or by the record's
    # digest (our facilitator reports the nonce as used first): never served either way.
    assert r.json()["error"] in (R.INVALID_PERMIT2_SIGNATURE, GatewayReason.PAYMENT_ALREADY_USED)
    facilitator.genuine.add(signed_payload_digest(forged["payload"]))  # even one the facilitator would accept
    r = send(gateway, forged)
    assert r.status_code == 402 and r.json()["error"] == GatewayReason.PAYMENT_ALREADY_USED, r.text
    assert r.json()["transaction"] == tx and b"Echo" not in r.content


def test_a_payment_is_not_used_for_another_request(gateway: TestClient, facilitator: StandInFacilitator) -> None:
    payment = pay(gateway, facilitator)
    assert send(gateway, payment).status_code == 200
    other = {**BODY, "messages": [{"role": "user", "content": "something else"}]}
    r = send(gateway, payment, other)
    assert r.status_code == 402 and r.json()["error"] == GatewayReason.PAYMENT_ALREADY_USED


def test_a_refused_settlement_frees_the_payment(gateway: TestClient, facilitator: StandInFacilitator) -> None:
    payment = pay(gateway, facilitator)
    facilitator.settle_mode = "refuse"
    r = send(gateway, payment)
    assert r.status_code == 402 and r.json()["error"] == R.INSUFFICIENT_FUNDS and b"Echo" not in r.content
    facilitator.settle_mode = "success"
    assert send(gateway, payment).status_code == 200  # nothing was charged: the same payment may pay


def test_a_pending_settlement_is_never_served_until_settled(gateway: TestClient, facilitator: StandInFacilitator) -> None:
    payment = pay(gateway, facilitator)
    facilitator.settle_mode = "pending"
    r = send(gateway, payment)
    assert r.status_code == 402 and r.json()["error"] == R.SETTLEMENT_PENDING and b"Echo" not in r.content
    assert r.json()["transaction"]
    r = send(gateway, payment)  # asked again: still pending
    assert r.status_code == 402 and b"Echo" not in r.content
    facilitator.settle_mode = "success"
    served = send(gateway, payment)
    assert served.status_code == 200 and b"Echo" in served.content


def test_a_verify_answered_too_late_is_refused_and_frees_the_payment(gateway: TestClient,
                                                                     facilitator: StandInFacilitator) -> None:
    payment = pay(gateway, facilitator)
    facilitator.delay_s["verify"] = 2.0
    started = time.monotonic()
    r = send(gateway, payment)
    assert time.monotonic() - started < 1.5  # verify_timeout_s, not the facilitator's pace
    assert r.status_code == 402 and r.json()["error"] == R.UNEXPECTED_VERIFY_ERROR and b"Echo" not in r.content
    assert facilitator.calls["settle"] == 0
    facilitator.delay_s["verify"] = 0.0
    assert send(gateway, payment).status_code == 200  # nothing was claimed


def test_a_settlement_answered_too_late_is_pending_never_served_then_served_once(
        gateway: TestClient, facilitator: StandInFacilitator) -> None:
    payment = pay(gateway, facilitator)
    facilitator.delay_s["settle"] = 2.0
    started = time.monotonic()
    r = send(gateway, payment)
    assert time.monotonic() - started < 1.5  # settle_timeout_s
    # The money may have moved: not served, not free, the same payment to be resent.
    assert r.status_code == 402 and r.json()["error"] == R.UNEXPECTED_SETTLE_ERROR and b"Echo" not in r.content
    facilitator.delay_s["settle"] = 0.0
    served = send(gateway, payment)
    assert served.status_code == 200 and b"Echo" in served.content
    replayed = send(gateway, payment)
    assert replayed.status_code == 200 and replayed.headers["PAYMENT-RESPONSE"] == served.headers["PAYMENT-RESPONSE"]
    assert len(facilitator.settled) == 1


def test_an_upstream_failure_is_not_charged(gateway: TestClient, facilitator: StandInFacilitator) -> None:
    payment = pay(gateway, facilitator)
    r = gateway.post(CHAT, json=BODY, headers={"PAYMENT-SIGNATURE": encode_payment(payment),
                                               "X-Devupstream-Fault": "503"})
    assert r.status_code == 502 and r.json()["error"] == "upstream_error" and r.json()["upstream_status"] == 503
    assert "PAYMENT-RESPONSE" not in r.headers
    assert facilitator.calls["settle"] == 0
    assert send(gateway, payment).status_code == 200


@pytest.mark.parametrize("header", ["not base64!", "e30=", "eyJ4NDAyVmVyc2lvbiI6Mn0="])
def test_undecodable_headers_are_400_and_never_reach_the_facilitator(gateway: TestClient,
                                                                     facilitator: StandInFacilitator,
                                                                     header: str) -> None:
    r = gateway.post(CHAT, json=BODY, headers={"PAYMENT-SIGNATURE": header})
    assert r.status_code == 400 and "PAYMENT-REQUIRED" in r.headers
    assert facilitator.calls == {"verify": 0, "settle": 0}


def test_unoffered_paths_and_methods(gateway: TestClient) -> None:
    assert gateway.get("/nowhere").json()["error"] == GatewayReason.NOT_FOUND
    assert gateway.get(CHAT).status_code == 405


def test_a_network_without_a_v1_name_is_offered_to_v2_clients_only(upstream_url: str, tmp_path: Path) -> None:
    settings = GatewaySettings.model_validate({
        "pay_to": PAY_TO, "store_url": f"sqlite://{tmp_path / 'records.sqlite3'}",
        "accepts": [{"network": "eip155:999999", "asset": OPG, "symbol": "OPG", "decimals": 18,
                     "transfer_method": "permit2", "eip712_name": "OpenGradient", "eip712_version": "1"}],
        "upstreams": {"llm": {"urls": [upstream_url]}},
        "routes": [{"path": CHAT, "upstream": "llm", "price": "0.005"}],
        "quote": {"rates": {"OPG": "1"}},
    })  # fmt: skip
    with TestClient(create_app(settings, facilitator=StandInFacilitator())) as client:
        r = client.post(CHAT, json=BODY)
    assert r.status_code == 402 and r.json()["accepts"] == []
    assert decode_payment_required(r.headers["PAYMENT-REQUIRED"]).accepts[0].network == "eip155:999999"


PROMPT = {"model": "gpt-4o-mini", "prompt": "hello"}


def test_a_retry_under_a_payment_identifier_gets_the_earlier_result_for_its_payer_only(
        gateway: TestClient, facilitator: StandInFacilitator) -> None:
    agent, pid = Account.create(), "retry_" + "a" * 20
    first = send(gateway, pay(gateway, facilitator, PROMPT, account=agent, path=COMPLETIONS, payment_id=pid), PROMPT,
                 path=COMPLETIONS)
    assert first.status_code == 200, first.text
    retry = send(gateway, pay(gateway, facilitator, PROMPT, account=agent, path=COMPLETIONS, payment_id=pid), PROMPT,
                 path=COMPLETIONS)
    assert retry.status_code == 200 and retry.content == first.content
    assert facilitator.calls["settle"] == 1  # no new charge
    other = send(gateway, pay(gateway, facilitator, PROMPT, path=COMPLETIONS, payment_id=pid), PROMPT, path=COMPLETIONS)
    assert other.status_code == 409 and other.json()["error"] == GatewayReason.PAYMENT_IDENTIFIER_CONFLICT


def test_an_id_whose_first_payment_died_before_settling_serves_nothing_unpaid(
        gateway: TestClient, facilitator: StandInFacilitator, tmp_path: Path) -> None:
    """The first request under an id died mid-call (its record PROCESSING, the lease lapsed): a
    retry under the id is a payment of its own, charged, never the dead one's free delivery."""
    agent, pid = Account.create(), "dead_" + "b" * 20
    dead = pay(gateway, facilitator, PROMPT, account=agent, path=COMPLETIONS, payment_id=pid)
    records = SQLitePaymentRecords(str(tmp_path / "records.sqlite3"))
    _, dead_key = payment_identity(dead["payload"], "eip155:8453", OPG)
    past = int(time.time() * 1000) - 60_000
    raw = json.dumps(PROMPT).encode()
    same_request = hashlib.sha256(b"POST " + COMPLETIONS.encode() + b"?\n" + raw).hexdigest()
    assert asyncio.run(records.begin(dead_key, same_request, "d", owner="gone", now_ms=past, lease_ms=1_000)) is None
    assert asyncio.run(records.link_id(pid, dead_key, ttl_s=600)) == dead_key
    retry = pay(gateway, facilitator, PROMPT, account=agent, path=COMPLETIONS, payment_id=pid)
    r = gateway.post(COMPLETIONS, content=raw, headers={"Content-Type": "application/json",
                                                        "PAYMENT-SIGNATURE": encode_payment(retry)})
    assert r.status_code == 200, r.text
    assert facilitator.calls["settle"] == 1  # it paid for what it got


def test_a_query_that_is_not_utf8_is_priced_challenged_and_served(gateway: TestClient,
                                                                   facilitator: StandInFacilitator) -> None:
    """Raw query bytes (an HTTP client may send any): never a 500 (Starlette's request.url cannot
    decode them); the call is challenged and served like any other."""
    payment = pay(gateway, facilitator)

    async def raw_call(headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[bytes, bytes]]:
        body = json.dumps(BODY).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": CHAT, "raw_path": CHAT.encode(), "query_string": b"v=\xff\xfe&w=1", "root_path": "",
                 "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode()), *headers],
                 "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
        sent: list[dict[str, Any]] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await gateway.app(scope, receive, send)
        start = sent[0]
        return start["status"], dict(start["headers"])

    status, headers = gateway.portal.call(raw_call, [])  # type: ignore[union-attr]
    assert status == 402 and decode_payment_required(headers[b"payment-required"].decode()).resource.url.endswith(CHAT)
    status, headers = gateway.portal.call(raw_call, [(b"payment-signature", encode_payment(payment).encode())])  # type: ignore[union-attr]
    assert status == 200 and decode_payment_response(headers[b"payment-response"].decode()).success


def test_routing_refusals_are_json(gateway: TestClient) -> None:
    for method, path in (("OPTIONS", CHAT), ("TRACE", CHAT), ("OPTIONS", "/healthz"), ("TRACE", "/metrics")):
        r = gateway.request(method, path)
        assert r.status_code == 405 and r.json()["error"] == GatewayReason.METHOD_NOT_ALLOWED, (method, path, r.text)
        assert r.headers["content-type"] == "application/json" and "allow" in r.headers


def test_a_body_that_never_comes_whole_is_refused_without_a_crash(gateway: TestClient,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that leaves mid-body (nobody reads the answer, nothing raises out of the app) and
    one that trickles it in past the body timeout (408)."""
    import gateway.app as app_module

    monkeypatch.setattr(app_module, "BODY_TIMEOUT_S", 0.3)

    async def partial_call(last: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": CHAT, "raw_path": CHAT.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                             (b"content-length", b"100")],
                 "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
        messages: list[dict[str, Any]] = [{"type": "http.request", "body": b'{"model":', "more_body": True}]
        if last is not None:
            messages.append(last)
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)  # the rest never comes
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await gateway.app(scope, receive, send)
        return sent[0]["status"], json.loads(sent[1]["body"])

    status, body = gateway.portal.call(partial_call, {"type": "http.disconnect"})  # type: ignore[union-attr]
    assert (status, body["error"]) == (400, GatewayReason.REQUEST_INCOMPLETE)
    status, body = gateway.portal.call(partial_call, None)  # type: ignore[union-attr]
    assert (status, body["error"]) == (408, GatewayReason.REQUEST_INCOMPLETE)
