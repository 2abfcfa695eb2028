"""Wire models, reason codes and network names of facilitator.x402.

The official SDK (x402 2.25.0) is used only as an independent oracle: its client signs
real payloads and its models parse/produce the reference JSON.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from eth_account import Account
from pydantic import ValidationError
from x402 import x402ClientSync
from x402.mechanisms.evm import constants as sdk_evm_constants
from x402.mechanisms.evm.exact.register import register_exact_evm_client
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS
from x402.schemas import PaymentRequired as SdkPaymentRequired
from x402.schemas import PaymentRequirements as SdkPaymentRequirements
from x402.schemas import ResourceInfo as SdkResourceInfo
from x402.schemas import SupportedKind as SdkSupportedKind
from x402.schemas import SupportedResponse as SdkSupportedResponse
from x402.schemas import VerifyResponse as SdkVerifyResponse
from x402.schemas.v1 import PaymentRequiredV1 as SdkPaymentRequiredV1
from x402.schemas.v1 import PaymentRequirementsV1 as SdkPaymentRequirementsV1

from facilitator.x402 import (
    Eip3009Authorization,
    ErrorReason,
    ExactEip3009Payload,
    ExactPermit2Payload,
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequired,
    PaymentRequirements,
    PaymentRequirementsV1,
    Permit2Authorization,
    SettleRequest,
    SettleResponse,
    SupportedResponse,
    UnknownNetworkError,
    VerifyRequest,
    VerifyResponse,
    WireFormatError,
    chain_id_of,
    is_caip2,
    parse_json_body,
    to_caip2,
    to_v1_name,
)
from facilitator.x402.networks import CAIP2_TO_V1_NETWORK, V1_NETWORK_TO_CAIP2

USDC_BASE_SEPOLIA = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAY_TO = "0x" + "ab" * 20
TEST_KEY = "0x" + "11" * 32
UINT256_MAX = 2**256 - 1


def sdk_requirements(method: str = "permit2", amount: str = "10000") -> SdkPaymentRequirements:
    return SdkPaymentRequirements(
        scheme="exact",
        network="eip155:84532",
        asset=USDC_BASE_SEPOLIA,
        amount=amount,
        pay_to=PAY_TO,
        max_timeout_seconds=300,
        extra={"name": "USDC", "version": "2", "assetTransferMethod": method},
    )


@pytest.fixture(scope="module")
def sdk_client() -> x402ClientSync:
    client = x402ClientSync()
    register_exact_evm_client(client, Account.from_key(TEST_KEY))
    client.set_spend_controls(False)
    return client


@pytest.fixture(scope="module", params=["permit2", "eip3009"])
def sdk_payload_json(request: pytest.FixtureRequest, sdk_client: x402ClientSync) -> str:
    """A PaymentPayload signed by the official client, as the SDK serialises it."""
    required = SdkPaymentRequired(
        resource=SdkResourceInfo(url="https://api.example.com/v1/chat", description="Chat"),
        accepts=[sdk_requirements(request.param)],
    )
    payload = sdk_client.create_payment_payload(required)
    return payload.model_dump_json(by_alias=True, exclude_none=True)


# -- reason codes -------------------------------------------------------------------------


def test_reason_member_names_are_upper_snake_of_the_value() -> None:
    for member in ErrorReason:
        assert member.name == member.value.upper()
        assert member == member.value  # StrEnum: compares and serialises as the plain string


def test_reason_values_are_unique() -> None:
    values = [m.value for m in ErrorReason]
    assert len(values) == len(set(values))


def test_reasons_cover_the_sdk_evm_constants() -> None:
    sdk_codes = {
        value
        for name, value in vars(sdk_evm_constants).items()
        if name.startswith("ERR_") and isinstance(value, str)
    }
    assert sdk_codes, "SDK constants moved?"
    assert sdk_codes <= {m.value for m in ErrorReason}


@pytest.mark.parametrize(
    "code",
    [
        "insufficient_funds",
        "invalid_payload",
        "invalid_x402_version",
        "invalid_network",
        "invalid_payment_requirements",
        "invalid_transaction_state",
        "unexpected_verify_error",
        "unexpected_settle_error",
        "permit2_2612_amount_mismatch",
        "invalid_permit2_amount",
        "permit2_invalid_amount",
        "permit2_payment_too_early",
        "permit2_invalid_nonce",
        "invalid_permit2_payload_format",
        "balance_check_failed",
        "unsupported_payload_type",
        "settlement_pending",
        "transaction_failed",
        "extension_echo_mismatch",
    ],
)
def test_reason_codes_from_spec_and_sdk_are_present(code: str) -> None:
    assert ErrorReason(code).value == code


# -- v2 models against the SDK ---------------------------------------------------------------


def test_sdk_signed_payload_parses_and_dumps_identically(sdk_payload_json: str) -> None:
    ours = PaymentPayload.model_validate_json(sdk_payload_json)
    assert ours.to_json() == sdk_payload_json
    assert ours.x402_version == 2
    assert ours.accepted.pay_to == PAY_TO


def test_sdk_signed_payload_fits_the_evm_scheme_models(sdk_payload_json: str) -> None:
    payload = PaymentPayload.model_validate_json(sdk_payload_json).payload
    if "permit2Authorization" in payload:
        parsed: Any = ExactPermit2Payload.model_validate(payload)
        auth = parsed.permit2_authorization
        assert auth.permitted.amount == "10000"
        assert auth.witness.facilitator is None
        assert int(auth.nonce) <= UINT256_MAX
    else:
        parsed = ExactEip3009Payload.model_validate(payload)
        assert parsed.authorization.value == "10000"
        assert parsed.authorization.nonce.startswith("0x")
    # same keys, same order as the SDK's to_dict()
    assert json.dumps(parsed.to_wire()) == json.dumps(payload)


def test_payment_required_dump_matches_sdk_bytes() -> None:
    sdk = SdkPaymentRequired(
        error="Payment required",
        resource=SdkResourceInfo(url="https://api.example.com/x", mime_type="application/json"),
        accepts=[sdk_requirements("permit2"), sdk_requirements("eip3009", "5")],
        extensions={"payment-identifier": {"info": {"required": False}, "schema": {"type": "object"}}},
    )
    sdk_json = sdk.model_dump_json(by_alias=True, exclude_none=True)
    ours = PaymentRequired.model_validate_json(sdk_json)
    assert ours.to_json() == sdk_json
    assert SdkPaymentRequired.model_validate_json(ours.to_json()) == sdk


def test_requirements_extra_defaults_to_empty_object_like_the_sdk() -> None:
    req = PaymentRequirements(
        scheme="exact", network="eip155:8453", asset=USDC_BASE_SEPOLIA, amount="1", pay_to=PAY_TO,
        max_timeout_seconds=60,
    )
    sdk = SdkPaymentRequirements(
        scheme="exact", network="eip155:8453", asset=USDC_BASE_SEPOLIA, amount="1", pay_to=PAY_TO,
        max_timeout_seconds=60,
    )
    assert req.to_json() == sdk.model_dump_json(by_alias=True, exclude_none=True)
    assert '"extra":{}' in req.to_json()


def test_constructs_by_python_name_and_dumps_camel_case() -> None:
    response = VerifyResponse(is_valid=False, invalid_reason=ErrorReason.PERMIT2_DEADLINE_EXPIRED, payer=PAY_TO)
    assert response.to_wire() == {"isValid": False, "invalidReason": "permit2_deadline_expired", "payer": PAY_TO}
    sdk = SdkVerifyResponse(is_valid=False, invalid_reason="permit2_deadline_expired", payer=PAY_TO)
    assert response.to_json() == sdk.model_dump_json(by_alias=True, exclude_none=True)


def test_settle_response_defaults_transaction_to_empty_string() -> None:
    failed = SettleResponse(success=False, error_reason=ErrorReason.TRANSACTION_FAILED, network="eip155:8453")
    assert failed.to_wire() == {
        "success": False, "errorReason": "transaction_failed", "transaction": "", "network": "eip155:8453",
    }


def test_settle_response_accepts_the_sdk_empty_amount() -> None:
    # x402 batch-settlement's "skip" path answers amount="".
    assert SettleResponse(success=True, network="eip155:1", amount="").amount == ""


def test_supported_response_matches_sdk() -> None:
    sdk = SdkSupportedResponse(
        kinds=[
            SdkSupportedKind(x402_version=2, scheme="exact", network="eip155:84532"),
            SdkSupportedKind(
                x402_version=2, scheme="upto", network="eip155:84532", extra={"facilitatorAddress": PAY_TO}
            ),
            SdkSupportedKind(x402_version=1, scheme="exact", network="base-sepolia"),
        ],
        extensions=["eip2612GasSponsoring"],
        signers={"eip155:*": [PAY_TO]},
    )
    sdk_json = sdk.model_dump_json(by_alias=True, exclude_none=True)
    ours = SupportedResponse.model_validate_json(sdk_json)
    assert ours.to_json() == sdk_json
    assert SupportedResponse(kinds=[]).to_wire() == {"kinds": [], "extensions": [], "signers": {}}


def test_unknown_fields_are_kept_on_forward_compatible_objects() -> None:
    raw = sdk_requirements().model_dump(by_alias=True) | {"futureField": {"a": 1}}
    req = PaymentRequirements.model_validate(raw)
    assert req.to_wire()["futureField"] == {"a": 1}


# -- v1 models ----------------------------------------------------------------------------


def test_v1_required_and_payload_match_sdk(sdk_client: x402ClientSync) -> None:
    sdk_required = SdkPaymentRequiredV1(
        error="X-PAYMENT header is required",
        accepts=[
            SdkPaymentRequirementsV1(
                scheme="exact", network="base-sepolia", max_amount_required="1000",
                resource="https://api.example.com/x", description="thing", mime_type="application/json",
                pay_to=PAY_TO, max_timeout_seconds=300, asset=USDC_BASE_SEPOLIA,
                extra={"name": "USDC", "version": "2"},
            )
        ],
    )
    required_json = sdk_required.model_dump_json(by_alias=True, exclude_none=True)
    from facilitator.x402 import PaymentRequiredV1

    assert PaymentRequiredV1.model_validate_json(required_json).to_json() == required_json
    payload = sdk_client.create_payment_payload(sdk_required)
    payload_json = payload.model_dump_json(by_alias=True, exclude_none=True)
    ours = PaymentPayloadV1.model_validate_json(payload_json)
    assert ours.to_json() == payload_json
    assert (ours.x402_version, ours.scheme, ours.network) == (1, "exact", "base-sepolia")
    assert ExactEip3009Payload.model_validate(ours.payload).authorization.value == "1000"


def test_v1_requirements_validate_max_amount_required() -> None:
    with pytest.raises(ValidationError):
        PaymentRequirementsV1(
            scheme="exact", network="base", max_amount_required="-1", resource="https://x",
            pay_to=PAY_TO, max_timeout_seconds=1, asset=USDC_BASE_SEPOLIA,
        )


# -- field validation ---------------------------------------------------------------------


def _requirements(**overrides: Any) -> dict[str, Any]:
    return sdk_requirements().model_dump(by_alias=True) | overrides


@pytest.mark.parametrize("amount", ["0", "1", "10000", "007", str(UINT256_MAX)])
def test_amount_accepts_decimal_uint256(amount: str) -> None:
    assert PaymentRequirements.model_validate(_requirements(amount=amount)).amount == amount


@pytest.mark.parametrize(
    "amount",
    [
        "", "-1", "+1", "1.0", "1e6", "0x10", " 1", "1 ", "1\n", "١٢", "1_000", "９",
        "1" * 79, str(UINT256_MAX + 1), 10000, 1.5, None, True,
    ],
)
def test_amount_rejects_non_decimal_strings(amount: Any) -> None:
    with pytest.raises(ValidationError) as info:
        PaymentRequirements.model_validate(_requirements(amount=amount))
    assert info.value.errors()[0]["loc"] == ("amount",)


@pytest.mark.parametrize("value", [300.0, "300", True, -1])
def test_max_timeout_seconds_is_a_strict_non_negative_int(value: Any) -> None:
    with pytest.raises(ValidationError):
        PaymentRequirements.model_validate(_requirements(maxTimeoutSeconds=value))


@pytest.mark.parametrize("network", ["base", "eip155", "eip155:", "eip155:*", "EIP155:1", ":1"])
def test_v2_requirements_need_a_caip2_network(network: str) -> None:
    with pytest.raises(ValidationError):
        PaymentRequirements.model_validate(_requirements(network=network))


@pytest.mark.parametrize("version", [1, 3, "2", 2.0, True, None])
def test_payment_payload_version_must_be_exactly_2(version: Any) -> None:
    raw = {"x402Version": version, "payload": {}, "accepted": _requirements()}
    with pytest.raises(ValidationError) as info:
        PaymentPayload.model_validate(raw)
    assert info.value.errors()[0]["loc"] == ("x402Version",)


def _permit2_dict(**auth_overrides: Any) -> dict[str, Any]:
    auth = {
        "from": "0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A",
        "permitted": {"token": USDC_BASE_SEPOLIA, "amount": "1000"},
        "spender": "0x402085c248EeA27D92E8b30b2C58ed07f9E20001",
        "nonce": str(UINT256_MAX),
        "deadline": "1900000000",
        "witness": {"to": PAY_TO, "validAfter": "0"},
    } | auth_overrides
    return {"permit2Authorization": auth, "signature": "0x" + "ab" * 65}


def test_permit2_payload_keeps_addresses_as_given() -> None:
    parsed = ExactPermit2Payload.model_validate(_permit2_dict())
    auth: Permit2Authorization = parsed.permit2_authorization
    assert auth.from_ == "0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A"
    assert parsed.to_wire()["permit2Authorization"]["from"] == auth.from_


def test_upto_witness_carries_the_facilitator_in_sdk_key_order() -> None:
    raw = _permit2_dict(witness={"to": PAY_TO, "facilitator": USDC_BASE_SEPOLIA, "validAfter": "5"})
    parsed = ExactPermit2Payload.model_validate(raw)
    assert parsed.permit2_authorization.witness.facilitator == USDC_BASE_SEPOLIA
    assert list(parsed.to_wire()["permit2Authorization"]["witness"]) == ["to", "facilitator", "validAfter"]


@pytest.mark.parametrize(
    ("override", "loc"),
    [
        ({"from": "0x1234"}, ("permit2Authorization", "from")),
        ({"from": "19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A00"}, ("permit2Authorization", "from")),
        ({"spender": "0x" + "g" * 40}, ("permit2Authorization", "spender")),
        ({"nonce": "0x01"}, ("permit2Authorization", "nonce")),
        ({"deadline": 1900000000}, ("permit2Authorization", "deadline")),
        ({"permitted": {"token": USDC_BASE_SEPOLIA, "amount": "1.5"}}, ("permit2Authorization", "permitted", "amount")),
        ({"witness": {"to": PAY_TO}}, ("permit2Authorization", "witness", "validAfter")),
    ],
)
def test_permit2_payload_rejects_bad_fields(override: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        ExactPermit2Payload.model_validate(_permit2_dict(**override))
    assert info.value.errors()[0]["loc"] == loc


@pytest.mark.parametrize("signature", ["", "0x", "0xabc", "ab" * 65, "0x" + "zz" * 65, "0x" + "ab" * 4097])
def test_signature_must_be_even_length_hex_up_to_8k(signature: str) -> None:
    with pytest.raises(ValidationError):
        ExactPermit2Payload.model_validate(_permit2_dict() | {"signature": signature})


def test_eip3009_nonce_is_bytes32_hex() -> None:
    auth = {
        "from": PAY_TO, "to": PAY_TO, "value": "1", "validAfter": "0", "validBefore": "10",
        "nonce": "0x" + "Ab" * 32,
    }
    assert Eip3009Authorization.model_validate(auth).nonce == "0x" + "Ab" * 32
    for bad in ["0x" + "ab" * 31, "0x" + "ab" * 33, "12345", "ab" * 32]:
        with pytest.raises(ValidationError):
            Eip3009Authorization.model_validate(auth | {"nonce": bad})


# -- facilitator request bodies -------------------------------------------------------------


def test_verify_request_v2_from_sdk_shaped_body(sdk_payload_json: str) -> None:
    payload = json.loads(sdk_payload_json)
    body = json.dumps(
        {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": payload["accepted"]}
    ).encode()
    request = parse_json_body(body, VerifyRequest)
    assert isinstance(request.payment_payload, PaymentPayload)
    assert isinstance(request.payment_requirements, PaymentRequirements)
    assert parse_json_body(body, SettleRequest).to_wire() == json.loads(body)


def test_verify_request_v1(sdk_client: x402ClientSync) -> None:
    requirements = SdkPaymentRequirementsV1(
        scheme="exact", network="base-sepolia", max_amount_required="1000", resource="https://x",
        pay_to=PAY_TO, max_timeout_seconds=300, asset=USDC_BASE_SEPOLIA, extra={"name": "USDC", "version": "2"},
    )
    payload = sdk_client.create_payment_payload(SdkPaymentRequiredV1(accepts=[requirements]))
    body = json.dumps(
        {
            "x402Version": 1,
            "paymentPayload": payload.model_dump(by_alias=True, exclude_none=True),
            "paymentRequirements": requirements.model_dump(by_alias=True, exclude_none=True),
        }
    )
    request = parse_json_body(body.encode(), VerifyRequest)
    assert isinstance(request.payment_payload, PaymentPayloadV1)
    assert isinstance(request.payment_requirements, PaymentRequirementsV1)


def test_verify_request_versions_must_agree(sdk_payload_json: str) -> None:
    payload = json.loads(sdk_payload_json)
    body = json.dumps({"x402Version": 1, "paymentPayload": payload, "paymentRequirements": payload["accepted"]})
    with pytest.raises(WireFormatError) as info:
        parse_json_body(body.encode(), VerifyRequest)
    assert info.value.reason is ErrorReason.INVALID_X402_VERSION
    assert "does not match" in info.value.message


def test_verify_request_field_errors_use_wire_paths(sdk_payload_json: str) -> None:
    payload = json.loads(sdk_payload_json)
    payload["accepted"]["amount"] = 10000
    body = json.dumps({"x402Version": 2, "paymentPayload": payload, "paymentRequirements": {}})
    with pytest.raises(WireFormatError) as info:
        parse_json_body(body.encode(), VerifyRequest)
    err = info.value
    assert err.reason is ErrorReason.INVALID_PAYLOAD
    locs = [e["loc"] for e in err.errors]
    assert "paymentPayload.accepted.amount" in locs  # union tags are not part of the path
    assert "paymentRequirements.scheme" in locs
    assert all("(v" not in loc for loc in locs)
    body_json = err.to_dict()
    assert body_json["error"] == "invalid_payload"
    assert {"loc": "paymentPayload.accepted.amount", "msg": "Input should be a valid string"} in body_json["errors"]
    json.dumps(body_json)  # serialisable as is


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"{not json", "not JSON"),
        (b"[]", "not a JSON object (got array)"),
        (b"null", "not a JSON object (got null)"),
        (b"\xff\xfe{}", "not JSON"),
    ],
)
def test_parse_json_body_rejects_non_objects(raw: bytes, needle: str) -> None:
    with pytest.raises(WireFormatError) as info:
        parse_json_body(raw, VerifyRequest)
    assert info.value.reason is ErrorReason.INVALID_PAYLOAD
    assert needle in info.value.message
    assert info.value.errors == []


def test_parse_json_body_limits() -> None:
    with pytest.raises(WireFormatError, match=r"body too large: 101 bytes \(max 100\)"):
        parse_json_body(b"{" + b" " * 99 + b"}", VerifyRequest, max_bytes=100)
    deep = b'{"x402Version":2,"paymentPayload":' + b"[" * 30 + b"]" * 30 + b"}"
    with pytest.raises(WireFormatError, match="nested deeper than"):
        parse_json_body(deep, VerifyRequest)


def test_parse_json_body_accepts_str_and_memoryview(sdk_payload_json: str) -> None:
    payload = json.loads(sdk_payload_json)
    body = json.dumps({"x402Version": 2, "paymentPayload": payload, "paymentRequirements": payload["accepted"]})
    assert parse_json_body(body, VerifyRequest) == parse_json_body(memoryview(body.encode()), VerifyRequest)


# -- networks -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "chain_id"), sorted(V1_NETWORK_CHAIN_IDS.items()))
def test_v1_evm_names_match_the_sdk_table(name: str, chain_id: int) -> None:
    assert to_caip2(name) == f"eip155:{chain_id}"
    assert to_v1_name(f"eip155:{chain_id}") == name
    assert chain_id_of(to_caip2(name)) == chain_id


def test_solana_names() -> None:
    assert to_caip2("solana") == "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"
    assert to_caip2("solana-devnet") == "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"
    assert to_v1_name("solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1") == "solana-devnet"
    with pytest.raises(UnknownNetworkError):
        chain_id_of("solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp")


def test_tables_are_inverse_and_read_only() -> None:
    assert {v: k for k, v in V1_NETWORK_TO_CAIP2.items()} == dict(CAIP2_TO_V1_NETWORK)
    with pytest.raises(TypeError):
        V1_NETWORK_TO_CAIP2["x"] = "y"  # type: ignore[index]


def test_caip2_passes_through_and_unknowns_raise() -> None:
    assert to_caip2("eip155:84532") == "eip155:84532"
    assert to_caip2("eip155:31337") == "eip155:31337"  # well-formed, not in the v1 table
    assert to_v1_name("base") == "base"
    assert is_caip2("eip155:1") and not is_caip2("eip155:*") and not is_caip2("base")
    for bad in ["", "nope", "eip155:*", "Base"]:
        with pytest.raises(UnknownNetworkError, match="unknown network"):
            to_caip2(bad)
    with pytest.raises(UnknownNetworkError, match="no v1 network name"):
        to_v1_name("eip155:31337")


@pytest.mark.parametrize(
    "bad",
    ["eip155:", "eip155:0", "eip155:01", "eip155:-1", "eip155:1.5", "eip155:0x1", "8453", "base", " eip155:1",
     "eip155:1\n"],
)
def test_chain_id_of_rejects_malformed(bad: str) -> None:
    with pytest.raises(UnknownNetworkError):
        chain_id_of(bad)


def test_unknown_network_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        to_v1_name("eip155:999999999")
