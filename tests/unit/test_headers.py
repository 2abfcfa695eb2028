"""Header codecs of facilitator.x402, checked byte for byte against the official SDK."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from eth_account import Account
from x402 import x402ClientSync
from x402.http import utils as sdk_http
from x402.http.constants import (
    PAYMENT_REQUIRED_HEADER as SDK_PAYMENT_REQUIRED_HEADER,
)
from x402.http.constants import (
    PAYMENT_RESPONSE_HEADER as SDK_PAYMENT_RESPONSE_HEADER,
)
from x402.http.constants import (
    PAYMENT_SIGNATURE_HEADER as SDK_PAYMENT_SIGNATURE_HEADER,
)
from x402.http.constants import X_PAYMENT_HEADER as SDK_X_PAYMENT_HEADER
from x402.http.constants import X_PAYMENT_RESPONSE_HEADER as SDK_X_PAYMENT_RESPONSE_HEADER
from x402.mechanisms.evm.exact.register import register_exact_evm_client
from x402.schemas import PaymentPayload as SdkPaymentPayload
from x402.schemas import PaymentRequired as SdkPaymentRequired
from x402.schemas import PaymentRequirements as SdkPaymentRequirements
from x402.schemas import ResourceInfo as SdkResourceInfo
from x402.schemas import SettleResponse as SdkSettleResponse
from x402.schemas.v1 import PaymentPayloadV1 as SdkPaymentPayloadV1
from x402.schemas.v1 import PaymentRequiredV1 as SdkPaymentRequiredV1
from x402.schemas.v1 import PaymentRequirementsV1 as SdkPaymentRequirementsV1

from facilitator.x402 import (
    MAX_HEADER_BYTES,
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    X_PAYMENT_HEADER,
    X_PAYMENT_RESPONSE_HEADER,
    ErrorReason,
    ExactEip3009Payload,
    ExactPermit2Payload,
    PaymentHeaderError,
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequired,
    SettleResponse,
    WireFormatError,
    decode_payment_header,
    decode_payment_required,
    decode_payment_response,
    decode_payment_signature,
    decode_x_payment,
    encode_payment_payload,
    encode_payment_required,
    encode_settle_response,
)

USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAY_TO = "0x" + "ab" * 20
TX_HASH = "0x" + "cd" * 32


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def sdk_requirements(method: str) -> SdkPaymentRequirements:
    return SdkPaymentRequirements(
        scheme="exact", network="eip155:84532", asset=USDC, amount="10000", pay_to=PAY_TO,
        max_timeout_seconds=300, extra={"name": "USDC", "version": "2", "assetTransferMethod": method},
    )


@pytest.fixture(scope="module")
def sdk_client() -> x402ClientSync:
    client = x402ClientSync()
    register_exact_evm_client(client, Account.from_key("0x" + "22" * 32))
    client.set_spend_controls(False)
    return client


def sdk_signed(client: x402ClientSync, method: str) -> SdkPaymentPayload:
    required = SdkPaymentRequired(
        resource=SdkResourceInfo(url="https://api.example.com/v1/chat/completions", description="Chat — ünïcödé"),
        accepts=[sdk_requirements(method)],
    )
    payload = client.create_payment_payload(required)
    # what a client using the payment-identifier extension sends (set after signing: the SDK
    # client validates declared extensions with jsonschema, which the test env does not have)
    payload.extensions = {"payment-identifier": {"info": {"required": False, "id": "pay_0123456789abcdef"}}}
    return payload


@pytest.fixture(scope="module", params=["permit2", "eip3009"])
def sdk_payload(request: pytest.FixtureRequest, sdk_client: x402ClientSync) -> SdkPaymentPayload:
    return sdk_signed(sdk_client, request.param)


@pytest.fixture(scope="module")
def valid_header(sdk_client: x402ClientSync) -> str:
    return sdk_http.encode_payment_signature_header(sdk_signed(sdk_client, "permit2"))


def test_header_names_match_the_sdk() -> None:
    assert PAYMENT_REQUIRED_HEADER == SDK_PAYMENT_REQUIRED_HEADER
    assert PAYMENT_SIGNATURE_HEADER == SDK_PAYMENT_SIGNATURE_HEADER
    assert PAYMENT_RESPONSE_HEADER == SDK_PAYMENT_RESPONSE_HEADER
    assert X_PAYMENT_HEADER == SDK_X_PAYMENT_HEADER
    assert X_PAYMENT_RESPONSE_HEADER == SDK_X_PAYMENT_RESPONSE_HEADER


# -- byte compatibility with the SDK ----------------------------------------------------------


def test_payment_signature_sdk_to_ours_to_sdk(sdk_payload: SdkPaymentPayload) -> None:
    header = sdk_http.encode_payment_signature_header(sdk_payload)
    ours = decode_payment_signature(header)
    assert encode_payment_payload(ours) == header
    assert sdk_http.decode_payment_signature_header(encode_payment_payload(ours)) == sdk_payload
    scheme_model = ExactPermit2Payload if "permit2Authorization" in ours.payload else ExactEip3009Payload
    assert scheme_model.model_validate(ours.payload).signature == sdk_payload.payload["signature"]


def test_payment_signature_ours_to_sdk(sdk_payload: SdkPaymentPayload) -> None:
    ours = PaymentPayload.model_validate(sdk_payload.model_dump(by_alias=True))
    assert encode_payment_payload(ours) == sdk_http.encode_payment_signature_header(sdk_payload)


def test_header_is_padded_standard_base64_of_compact_utf8_json(sdk_payload: SdkPaymentPayload) -> None:
    header = encode_payment_payload(PaymentPayload.model_validate(sdk_payload.model_dump(by_alias=True)))
    raw = base64.b64decode(header, validate=True)
    assert len(header) % 4 == 0
    text = raw.decode("utf-8")
    assert "ünïcödé" in text  # UTF-8, not \u escapes
    assert ": " not in text and ", " not in text.replace("Chat — ", "")
    assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)


def test_payment_required_both_ways() -> None:
    sdk = SdkPaymentRequired(
        error="Payment required",
        resource=SdkResourceInfo(url="https://api.example.com/x", mime_type="application/json"),
        accepts=[sdk_requirements("permit2"), sdk_requirements("eip3009")],
        extensions={"payment-identifier": {"info": {"required": True}, "schema": {"type": "object"}}},
    )
    header = sdk_http.encode_payment_required_header(sdk)
    ours = decode_payment_required(header)
    assert isinstance(ours, PaymentRequired)
    assert encode_payment_required(ours) == header
    assert sdk_http.decode_payment_required_header(encode_payment_required(ours)) == sdk


@pytest.mark.parametrize(
    "fields",
    [
        {"success": True, "payer": PAY_TO, "transaction": TX_HASH, "network": "eip155:84532"},
        {"success": True, "payer": PAY_TO, "transaction": TX_HASH, "network": "eip155:84532", "amount": "1234"},
        {"success": False, "error_reason": "settlement_pending", "error_message": "receipt — timeout",
         "transaction": TX_HASH, "network": "eip155:8453", "extra": {"n": 1.5, "none": None}},
        {"success": False, "error_reason": "transaction_failed", "transaction": "", "network": "eip155:8453"},
    ],
)
def test_settle_response_both_ways(fields: dict[str, Any]) -> None:
    sdk_header = sdk_http.encode_payment_response_header(SdkSettleResponse(**fields))
    ours = SettleResponse(**fields)
    assert encode_settle_response(ours) == sdk_header
    assert decode_payment_response(sdk_header) == ours
    assert sdk_http.decode_payment_response_header(encode_settle_response(ours)) == SdkSettleResponse(**fields)


def test_settle_response_uses_the_sdk_json_dumps_layout() -> None:
    # The Python SDK writes PAYMENT-RESPONSE with json.dumps defaults: ", " / ": " and ASCII escapes.
    response = SettleResponse(success=True, transaction=TX_HASH, network="eip155:1", error_message="é")
    header = encode_settle_response(response)
    text = base64.b64decode(header).decode("ascii")
    assert text.startswith('{"success": true, "errorMessage": "\\u00e9", ')


def test_compact_settle_response_from_other_clients_decodes() -> None:
    compact = b64('{"success":true,"transaction":"","network":"eip155:8453","amount":"5"}')
    assert decode_payment_response(compact).amount == "5"


def test_v1_x_payment_both_ways(sdk_client: x402ClientSync) -> None:
    requirements = SdkPaymentRequirementsV1(
        scheme="exact", network="base-sepolia", max_amount_required="1000", resource="https://x",
        pay_to=PAY_TO, max_timeout_seconds=300, asset=USDC, extra={"name": "USDC", "version": "2"},
    )
    sdk_payload = sdk_client.create_payment_payload(SdkPaymentRequiredV1(accepts=[requirements]))
    assert isinstance(sdk_payload, SdkPaymentPayloadV1)
    header = sdk_http.encode_payment_signature_header(sdk_payload)  # the SDK sends this as X-PAYMENT
    ours = decode_x_payment(header)
    assert isinstance(ours, PaymentPayloadV1)
    assert encode_payment_payload(ours) == header
    assert sdk_http.decode_payment_signature_header(encode_payment_payload(ours)) == sdk_payload


def test_x_payment_rejects_v2_and_payment_signature_rejects_v1(valid_header: str, sdk_client: x402ClientSync) -> None:
    with pytest.raises(PaymentHeaderError) as info:
        decode_x_payment(valid_header)
    assert info.value.reason is ErrorReason.INVALID_X402_VERSION
    v1 = b64(json.dumps({"x402Version": 1, "scheme": "exact", "network": "base", "payload": {}}))
    assert decode_x_payment(v1).network == "base"
    with pytest.raises(PaymentHeaderError) as info:
        decode_payment_signature(v1)
    assert info.value.reason is ErrorReason.INVALID_X402_VERSION
    assert "x402Version must be 2" in info.value.message


# -- decode_payment_header ------------------------------------------------------------------


def test_decode_payment_header_prefers_payment_signature(valid_header: str) -> None:
    v1 = b64(json.dumps({"x402Version": 1, "scheme": "exact", "network": "base", "payload": {}}))
    both = {"X-PAYMENT": v1, "PAYMENT-SIGNATURE": valid_header}
    assert isinstance(decode_payment_header(both), PaymentPayload)
    assert isinstance(decode_payment_header({"x-payment": v1}), PaymentPayloadV1)
    assert decode_payment_header({"content-type": "application/json"}) is None
    assert decode_payment_header({}) is None


@pytest.mark.parametrize("name", ["PAYMENT-SIGNATURE", "payment-signature", "Payment-Signature", "pAyMeNt-SiGnAtUrE"])
def test_decode_payment_header_is_case_insensitive(name: str, valid_header: str) -> None:
    assert isinstance(decode_payment_header({"accept": "*/*", name: valid_header}), PaymentPayload)


def test_decode_payment_header_does_not_fall_back_on_a_broken_signature() -> None:
    v1 = b64(json.dumps({"x402Version": 1, "scheme": "exact", "network": "base", "payload": {}}))
    with pytest.raises(PaymentHeaderError):
        decode_payment_header({"payment-signature": "", "x-payment": v1})


def test_surrounding_whitespace_is_ignored(valid_header: str) -> None:
    assert decode_payment_signature(f"  {valid_header}\t") == decode_payment_signature(valid_header)


# -- malformed matrix -----------------------------------------------------------------------


def _payload_dict(valid_header: str) -> dict[str, Any]:
    return json.loads(base64.b64decode(valid_header))


def _with(valid_header: str, path: tuple[str, ...], value: Any) -> str:
    data = _payload_dict(valid_header)
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return b64(json.dumps(data))


_DELETE = object()


def _deep_json(depth: int) -> str:
    return '{"x402Version":2,"payload":' + '{"a":' * depth + "1" + "}" * depth + "}"


MALFORMED: list[tuple[str, Any, ErrorReason, str]] = [
    ("empty string", "", ErrorReason.INVALID_PAYLOAD, "empty header value"),
    ("only whitespace", "   ", ErrorReason.INVALID_PAYLOAD, "empty header value"),
    ("not base64", "this is not base64!", ErrorReason.INVALID_PAYLOAD, "not base64"),
    ("bad padding", "eyJhIjoxfQ", ErrorReason.INVALID_PAYLOAD, "not base64"),
    ("url-safe alphabet", "-_-_", ErrorReason.INVALID_PAYLOAD, "not base64"),
    ("embedded newline", "eyJh\nIjoxfQ==", ErrorReason.INVALID_PAYLOAD, "not base64"),
    ("unicode junk in header", "eyJ☃IjoxfQ==", ErrorReason.INVALID_PAYLOAD, "not base64"),
    ("base64 of non-JSON", b64("hello, world"), ErrorReason.INVALID_PAYLOAD, "not JSON"),
    ("base64 of invalid UTF-8", b64(b"\xff\xfe\xfd\x00"), ErrorReason.INVALID_PAYLOAD, "not JSON"),
    ("base64 of truncated JSON", b64('{"x402Version":2,'), ErrorReason.INVALID_PAYLOAD, "not JSON"),
    ("JSON array", b64("[1, 2, 3]"), ErrorReason.INVALID_PAYLOAD, "not a JSON object (got array)"),
    ("JSON string", b64('"PAYMENT"'), ErrorReason.INVALID_PAYLOAD, "not a JSON object (got string)"),
    ("JSON number", b64("402"), ErrorReason.INVALID_PAYLOAD, "not a JSON object (got number)"),
    ("JSON null", b64("null"), ErrorReason.INVALID_PAYLOAD, "not a JSON object (got null)"),
    ("empty JSON object", b64("{}"), ErrorReason.INVALID_PAYLOAD, "field payload: Field required"),
    ("oversized header", "A" * (MAX_HEADER_BYTES + 4), ErrorReason.INVALID_PAYLOAD,
     f"header too large: {MAX_HEADER_BYTES + 4} bytes (max {MAX_HEADER_BYTES})"),
    ("oversized JSON", b64('{"x":"' + "a" * 12_300 + '"}'), ErrorReason.INVALID_PAYLOAD, "header too large"),
    ("deeply nested JSON", b64(_deep_json(40)), ErrorReason.INVALID_PAYLOAD, "nested deeper than 16 levels"),
    ("pathologically nested JSON", b64("[" * 6000 + "]" * 6000), ErrorReason.INVALID_PAYLOAD, "nested deeper than 16"),
    ("unicode junk in JSON", b64('{"x402Version":2,"payload":{},"accepted":"\u2603\U0001F600\\u0000\\u202e"}'),
     ErrorReason.INVALID_PAYLOAD, "field accepted: Input should be"),
    ("raw control character in JSON", b64('{"x402Version":2,"payload":{"a":"\x00"}}'), ErrorReason.INVALID_PAYLOAD,
     "not JSON (control character"),
    ("lone surrogate escape", b64('{"x402Version":2,"payload":{"a":"\\ud800"},"accepted":{}}'),
     ErrorReason.INVALID_PAYLOAD, "not JSON"),
    ("unicode junk as a key", b64('{"\u2603":1}'), ErrorReason.INVALID_PAYLOAD, "Field required"),
    ("not a str", 12345, ErrorReason.INVALID_PAYLOAD, "not a string"),
]


@pytest.mark.parametrize(("value", "reason", "needle"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_headers(value: Any, reason: ErrorReason, needle: str) -> None:
    with pytest.raises(PaymentHeaderError) as info:
        decode_payment_signature(value)
    err = info.value
    assert err.reason is reason
    assert needle in err.message, err.message
    assert err.message.startswith("PAYMENT-SIGNATURE: ")
    # no pydantic/binascii exception chained out
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert isinstance(err, WireFormatError) and isinstance(err, ValueError)


INVALID = ErrorReason.INVALID_PAYLOAD
WRONG_TYPES: list[tuple[str, tuple[str, ...], Any, ErrorReason, str]] = [
    ("amount as number", ("accepted", "amount"), 10000, ErrorReason.INVALID_PAYLOAD,
     "field accepted.amount: Input should be a valid string"),
    ("amount negative", ("accepted", "amount"), "-1", INVALID, "field accepted.amount: must be a decimal"),
    ("amount hex", ("accepted", "amount"), "0x2710", INVALID, "field accepted.amount: must be a decimal"),
    ("amount float string", ("accepted", "amount"), "1.5", ErrorReason.INVALID_PAYLOAD, "field accepted.amount"),
    ("amount with plus", ("accepted", "amount"), "+1", ErrorReason.INVALID_PAYLOAD, "field accepted.amount"),
    ("amount too long", ("accepted", "amount"), "9" * 79, ErrorReason.INVALID_PAYLOAD, "at most 78 digits"),
    ("amount above uint256", ("accepted", "amount"), "9" * 78, ErrorReason.INVALID_PAYLOAD, "uint256 maximum"),
    ("accepted missing", ("accepted",), _DELETE, ErrorReason.INVALID_PAYLOAD, "field accepted: Field required"),
    ("accepted is a list", ("accepted",), [], ErrorReason.INVALID_PAYLOAD, "field accepted: Input should be"),
    ("payload is a string", ("payload",), "0xdead", INVALID, "field payload: Input should be an object"),
    ("maxTimeoutSeconds as string", ("accepted", "maxTimeoutSeconds"), "300", ErrorReason.INVALID_PAYLOAD,
     "field accepted.maxTimeoutSeconds"),
    ("network v1 name", ("accepted", "network"), "base-sepolia", ErrorReason.INVALID_PAYLOAD, "CAIP-2"),
    ("x402Version as string", ("x402Version",), "2", ErrorReason.INVALID_X402_VERSION,
     "field x402Version: Input should be a valid integer"),
    ("x402Version 3", ("x402Version",), 3, ErrorReason.INVALID_X402_VERSION, "x402Version must be 2"),
    ("x402Version float", ("x402Version",), 2.0, ErrorReason.INVALID_X402_VERSION, "field x402Version"),
    ("x402Version null", ("x402Version",), None, ErrorReason.INVALID_X402_VERSION, "field x402Version"),
]


@pytest.mark.parametrize(
    ("path", "value", "reason", "needle"), [w[1:] for w in WRONG_TYPES], ids=[w[0] for w in WRONG_TYPES]
)
def test_wrong_types(valid_header: str, path: tuple[str, ...], value: Any, reason: ErrorReason, needle: str) -> None:
    with pytest.raises(PaymentHeaderError) as info:
        decode_payment_signature(_with(valid_header, path, value))
    assert info.value.reason is reason
    assert needle in info.value.message, info.value.message
    assert info.value.errors, "field errors are listed"


def test_sdk_decoder_is_laxer_than_ours(valid_header: str) -> None:
    # The SDK coerces x402Version "2" and ignores base64 junk; we refuse both.
    lax = _with(valid_header, ("x402Version",), "2")
    assert sdk_http.decode_payment_signature_header(lax).x402_version == 2
    with pytest.raises(PaymentHeaderError):
        decode_payment_signature(lax)


def test_decoded_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # 16 KiB of base64 decodes to exactly 12 KiB, so this second limit only matters if the first
    # one is raised; it still holds on its own.
    import facilitator.x402.headers as headers

    monkeypatch.setattr(headers, "MAX_HEADER_BYTES", 64 * 1024)
    with pytest.raises(PaymentHeaderError, match=r"decoded JSON too large: 12311 bytes \(max 12288\)"):
        decode_payment_signature(b64('{"x":"' + "a" * 12_303 + '"}'))


def test_depth_limit_is_exact() -> None:
    # the root object + n nested objects (the first one is "payload")
    ok = b64(_deep_json(15))
    with pytest.raises(PaymentHeaderError, match="field accepted"):
        decode_payment_signature(ok)  # depth 16 passes the depth gate, then fails validation
    with pytest.raises(PaymentHeaderError, match="nested deeper than 16"):
        decode_payment_signature(b64(_deep_json(16)))


def test_brackets_inside_strings_do_not_count_as_nesting(valid_header: str) -> None:
    data = _payload_dict(valid_header)
    data["resource"]["description"] = '[{"' * 40 + '\\"]}' * 3
    decoded = decode_payment_signature(b64(json.dumps(data)))
    assert decoded.resource is not None and decoded.resource.description.startswith('[{"')


def test_many_errors_are_summarised(valid_header: str) -> None:
    data = _payload_dict(valid_header)
    data["accepted"] = {"scheme": 1, "network": 2, "asset": 3, "amount": 4, "payTo": 5, "maxTimeoutSeconds": "x"}
    with pytest.raises(PaymentHeaderError) as info:
        decode_payment_signature(b64(json.dumps(data)))
    assert "(and 3 more)" in info.value.message
    assert len(info.value.errors) == 6


def test_decode_payment_required_and_response_share_the_checks() -> None:
    with pytest.raises(PaymentHeaderError, match="PAYMENT-REQUIRED: not JSON"):
        decode_payment_required(b64("nope"))
    with pytest.raises(PaymentHeaderError, match="PAYMENT-RESPONSE: field success"):
        decode_payment_response(b64('{"success":"yes","network":"eip155:1"}'))
    with pytest.raises(PaymentHeaderError) as info:
        decode_payment_required(b64('{"x402Version":1,"accepts":[]}'))
    assert info.value.reason is ErrorReason.INVALID_X402_VERSION
