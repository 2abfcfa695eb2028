"""Every number of a payment is range-checked at decode (issue 9 §3).

Permit2's SignatureTransfer (permitted.amount, nonce, deadline), the x402 proxies' witness
(validAfter) and EIP-3009 (value, validAfter, validBefore) are uint256 in Solidity: decimal
strings in [0, 2**256 - 1] on the wire. JSON numbers elsewhere (maxTimeoutSeconds, free-form
extra/extensions/unknown fields) are I-JSON: integers within +-(2**53 - 1), finite floats.
Out of range is a PaymentHeaderError (the gateway's 400) or, in a facilitator body, a
WireFormatError (its 400), never a value that breaks a JSON writer later on.
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import orjson
import pytest
from eth_account import Account
from x402 import x402ClientSync
from x402.mechanisms.evm.exact.register import register_exact_evm_client
from x402.schemas import PaymentRequired as SdkPaymentRequired
from x402.schemas import PaymentRequirements as SdkPaymentRequirements
from x402.schemas import ResourceInfo as SdkResourceInfo

from facilitator.x402 import (
    ErrorReason,
    PaymentHeaderError,
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequirements,
    VerifyRequest,
    WireFormatError,
    decode_payment_header,
    decode_payment_signature,
    decode_x_payment,
    parse_json_body,
)
from facilitator.x402.types import JSON_SAFE_INT, UINT256_MAX
from gateway.facilitator_client import HttpFacilitatorClient, _request_body

USDC_BASE_SEPOLIA = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAY_TO = "0x" + "ab" * 20
TEST_KEY = "0x" + "22" * 32

PERMIT2_UINTS = [
    ("permit2Authorization", "permitted", "amount"),
    ("permit2Authorization", "nonce"),
    ("permit2Authorization", "deadline"),
    ("permit2Authorization", "witness", "validAfter"),
]
EIP3009_UINTS = [("authorization", "value"), ("authorization", "validAfter"), ("authorization", "validBefore")]
# Each (field path, the shape it belongs to)
UINT_FIELDS = [(p, "permit2") for p in PERMIT2_UINTS] + [(p, "eip3009") for p in EIP3009_UINTS]
UINT_IDS = [".".join(p) for p, _ in UINT_FIELDS]


@pytest.fixture(scope="module")
def signed() -> dict[str, dict[str, Any]]:
    """{"permit2": PaymentPayload wire dict, "eip3009": ...}, signed by the official client."""
    client = x402ClientSync()
    register_exact_evm_client(client, Account.from_key(TEST_KEY))
    client.set_spend_controls(False)
    out = {}
    for method in ("permit2", "eip3009"):
        requirements = SdkPaymentRequirements(
            scheme="exact", network="eip155:84532", asset=USDC_BASE_SEPOLIA, amount="10000", pay_to=PAY_TO,
            max_timeout_seconds=300, extra={"name": "USDC", "version": "2", "assetTransferMethod": method},
        )
        required = SdkPaymentRequired(resource=SdkResourceInfo(url="https://api.example.com/x"), accepts=[requirements])
        out[method] = client.create_payment_payload(required).model_dump(by_alias=True, exclude_none=True)
    return out


def header(doc: Any) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode()


def set_at(payment: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A copy of `payment` with `value` at `path` (objects on the way created if missing)."""
    doc = copy.deepcopy(payment)
    node = doc
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return doc


def with_value(payment: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    return set_at(payment, ("payload", *path), value)


def refused(doc: Any) -> PaymentHeaderError:
    with pytest.raises(PaymentHeaderError) as info:
        decode_payment_signature(header(doc))
    assert info.value.reason == ErrorReason.INVALID_PAYLOAD
    return info.value


# -- uint256 fields of the scheme payloads ---------------------------------------------------


@pytest.mark.parametrize(("path", "shape"), UINT_FIELDS, ids=UINT_IDS)
@pytest.mark.parametrize("value", ["0", str(UINT256_MAX), "0" * 78])
def test_uint256_field_accepts_its_whole_range(signed: dict, path: tuple[str, ...], shape: str, value: str) -> None:
    decoded = decode_payment_signature(header(with_value(signed[shape], path, value)))
    node: Any = decoded.payload
    for key in path:
        node = node[key]
    assert node == value  # kept exactly as sent


@pytest.mark.parametrize(("path", "shape"), UINT_FIELDS, ids=UINT_IDS)
@pytest.mark.parametrize(
    "value",
    [
        str(UINT256_MAX + 1), "1" * 79, "-1", str(-(2**255)), "+1", "1.0", "1e3", "0x10", " 1", "",
        # JSON numbers, even small ones: uint256 values are decimal strings on the wire
        2**64, -(2**255), 10**30, 18446744073709551616, 1, 0, -1, 1.5, 1e300, True, None, [], {},
    ],
    ids=repr,
)
def test_uint256_field_refuses_out_of_range_and_wrong_types(
    signed: dict, path: tuple[str, ...], shape: str, value: Any
) -> None:
    err = refused(with_value(signed[shape], path, value))
    assert err.errors[0]["loc"] == ".".join(("payload", *path)), err.errors
    assert ".".join(path) in err.message


@pytest.mark.parametrize(
    "nonce", ["0x" + "00" * 31, "0x" + "00" * 33, "00" * 32, "0x" + "zz" * 32, 0, 2**256 - 1, None], ids=repr
)
def test_eip3009_nonce_is_bytes32_hex(signed: dict, nonce: Any) -> None:
    err = refused(with_value(signed["eip3009"], ("authorization", "nonce"), nonce))
    assert err.errors[0]["loc"] == "payload.authorization.nonce"


def test_eip3009_nonce_any_bytes32_is_accepted(signed: dict) -> None:
    for nonce in ("0x" + "00" * 32, "0x" + "ff" * 32, "0x" + "aB" * 32):
        decode_payment_signature(header(with_value(signed["eip3009"], ("authorization", "nonce"), nonce)))


def test_the_reported_attack_values_are_400s_not_500s(signed: dict) -> None:
    """Issue 9 §3: deadline 2**64 / -2**255, validAfter 10**30 as JSON numbers."""
    auth = ("permit2Authorization",)
    for path, value in [(auth + ("deadline",), 18446744073709551616), (auth + ("deadline",), -(2**255)),
                        (auth + ("witness", "validAfter"), 10**30)]:
        err = refused(with_value(signed["permit2"], path, value))
        assert err.to_dict()["error"] == "invalid_payload"


def test_unknown_payload_shapes_are_kept_but_their_numbers_are_bounded(signed: dict) -> None:
    # A payload of another scheme: only the I-JSON bound applies.
    doc = copy.deepcopy(signed["permit2"])
    doc["payload"] = {"transaction": "AQID", "n": JSON_SAFE_INT, "m": -JSON_SAFE_INT, "f": 0.5}
    assert decode_payment_signature(header(doc)).payload == doc["payload"]
    doc["payload"]["n"] = JSON_SAFE_INT + 1
    assert refused(doc).errors[0]["loc"] == "payload.n"


# -- the v1 header ------------------------------------------------------------------------------


def test_v1_x_payment_payload_is_checked_too(signed: dict) -> None:
    v1 = {"x402Version": 1, "scheme": "exact", "network": "base-sepolia", "payload": signed["eip3009"]["payload"]}
    assert isinstance(decode_x_payment(header(v1)), PaymentPayloadV1)
    for value in (str(UINT256_MAX + 1), -1, 10**30):
        bad = copy.deepcopy(v1)
        bad["payload"]["authorization"]["value"] = value
        with pytest.raises(PaymentHeaderError) as info:
            decode_payment_header({"X-PAYMENT": header(bad)})
        assert info.value.errors[0]["loc"] == "payload.authorization.value"


# -- requirement fields ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 300, JSON_SAFE_INT])
def test_max_timeout_seconds_range_accepted(signed: dict, value: int) -> None:
    doc = copy.deepcopy(signed["permit2"])
    doc["accepted"]["maxTimeoutSeconds"] = value
    assert decode_payment_signature(header(doc)).accepted.max_timeout_seconds == value


@pytest.mark.parametrize("value", [JSON_SAFE_INT + 1, 2**64, 10**30, -1, -(2**255), 300.0, 1e30, True, "300"], ids=repr)
def test_max_timeout_seconds_out_of_range_refused(signed: dict, value: Any) -> None:
    doc = copy.deepcopy(signed["permit2"])
    doc["accepted"]["maxTimeoutSeconds"] = value
    assert refused(doc).errors[0]["loc"] == "accepted.maxTimeoutSeconds"


@pytest.mark.parametrize("value", ["0", str(UINT256_MAX)])
def test_accepted_amount_range_accepted(signed: dict, value: str) -> None:
    doc = copy.deepcopy(signed["permit2"])
    doc["accepted"]["amount"] = value
    assert decode_payment_signature(header(doc)).accepted.amount == value


@pytest.mark.parametrize("value", [str(UINT256_MAX + 1), "-1", 10000, 2**256, -1, 1.0, False], ids=repr)
def test_accepted_amount_out_of_range_refused(signed: dict, value: Any) -> None:
    doc = copy.deepcopy(signed["permit2"])
    doc["accepted"]["amount"] = value
    assert refused(doc).errors[0]["loc"] == "accepted.amount"


# -- free-form JSON: extra, extensions, unknown fields ----------------------------------------------

FREE_FORM = [("accepted", "extra", "big"), ("extensions", "x", "big"), ("unknownTopLevel",),
             ("accepted", "unknownField"), ("resource", "unknownField"), ("payload", "permit2Authorization", "extraField")]


@pytest.mark.parametrize("path", FREE_FORM, ids=".".join)
@pytest.mark.parametrize("value", [JSON_SAFE_INT, -JSON_SAFE_INT, [1, {"a": 2.5}], "x" * 10])
def test_free_form_json_within_bounds_is_accepted(signed: dict, path: tuple[str, ...], value: Any) -> None:
    decode_payment_signature(header(set_at(signed["permit2"], path, value)))


@pytest.mark.parametrize("path", FREE_FORM, ids=".".join)
@pytest.mark.parametrize("value", [JSON_SAFE_INT + 1, -JSON_SAFE_INT - 1, 2**64, -(2**255), 10**30, [1, [2**70]]],
                         ids=repr)
def test_free_form_json_beyond_i_json_is_refused(signed: dict, path: tuple[str, ...], value: Any) -> None:
    err = refused(set_at(signed["permit2"], path, value))
    assert err.errors[0]["loc"].startswith(".".join(path)), err.errors


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_refused(signed: dict, literal: str) -> None:
    text = json.dumps(set_at(signed["permit2"], ("extensions", "x", "n"), "@@")).replace('"@@"', literal)
    with pytest.raises(PaymentHeaderError):
        decode_payment_signature(base64.b64encode(text.encode()).decode())


def test_everything_that_decodes_can_be_written_by_orjson(signed: dict) -> None:
    for shape in ("permit2", "eip3009"):
        decoded = decode_payment_signature(header(signed[shape]))
        orjson.dumps(decoded.model_dump(by_alias=True, exclude_none=True))


# -- the facilitator's /verify and /settle bodies ------------------------------------------------


def test_facilitator_body_reports_the_field(signed: dict) -> None:
    payment = with_value(signed["permit2"], ("permit2Authorization", "deadline"), 18446744073709551616)
    body = {"x402Version": 2, "paymentPayload": payment, "paymentRequirements": signed["permit2"]["accepted"]}
    with pytest.raises(WireFormatError) as info:
        parse_json_body(json.dumps(body), VerifyRequest)
    answer = info.value.to_dict()
    assert answer["error"] == "invalid_payload"
    assert answer["errors"][0]["loc"] == "paymentPayload.payload.permit2Authorization.deadline"
    assert "paymentPayload.payload.permit2Authorization.deadline" in answer["message"]


# -- the gateway's facilitator client never raises on serialisation -------------------------------


def test_request_body_writes_any_int_and_never_raises(signed: dict) -> None:
    requirements = PaymentRequirements.model_validate(signed["permit2"]["accepted"])
    # model_construct skips validation: what a caller could hand over that the decoder refuses
    big = PaymentPayload.model_construct(x402_version=2, payload={"n": 2**300, "m": -(2**255)}, accepted=requirements)
    body = _request_body(big, requirements)
    assert body is not None and json.loads(body)["paymentPayload"]["payload"]["n"] == 2**300
    weird = PaymentPayload.model_construct(x402_version=2, payload={"n": object()}, accepted=requirements)
    assert _request_body(weird, requirements) is None


async def test_http_client_refuses_an_unencodable_payment_without_sending_it(signed: dict) -> None:
    requirements = PaymentRequirements.model_validate(signed["permit2"]["accepted"])
    weird = PaymentPayload.model_construct(x402_version=2, payload={"n": object()}, accepted=requirements)
    client = HttpFacilitatorClient("http://127.0.0.1:9")  # discard port: nothing may be sent
    try:
        verify = await client.verify(weird, requirements)
        assert not verify.is_valid and verify.invalid_reason == "invalid_payload"
        settle = await client.settle(weird, requirements)
        assert not settle.success and settle.error_reason == "invalid_payload"
    finally:
        await client.close()
