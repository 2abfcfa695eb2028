"""x402 wire models (protocol v1 and v2) and the EVM scheme payloads.

Attributes are snake_case with camelCase aliases; objects dump by alias and drop ``None``
(``model.to_wire()`` / ``model.to_json()``). Field order follows the official SDK's models
(``x402/schemas/``) so that ``model_dump_json`` produces the same bytes.

Objects the spec lets grow (requirements, payloads, responses, ...) keep unknown fields
(``extra="allow"``) and emit them again when dumped. The signed EVM scheme payloads ignore
unknown fields: the signature covers only the known ones.

Numbers that stand for uint256 values (amounts, nonces, timestamps) are decimal strings on
the wire; they are checked here (digits only, at most 78 of them, at most 2**256 - 1) and
left as strings: ``int(requirements.amount)`` is safe after validation. Every numeric field of
the EVM scheme payloads is a uint256 in Solidity (Permit2's SignatureTransfer: amount, nonce,
deadline; the x402 proxies' witness: validAfter; EIP-3009: value, validAfter, validBefore),
so each is checked against that range.

A payment's ``payload`` is checked at decode against its scheme's model when its shape names
one (``permit2Authorization`` -> Permit2, ``authorization`` -> EIP-3009; the facilitator's own
dispatch rule), and is kept as the dict it was. Free-form JSON (``payload``, ``extra``,
``extensions``, unknown fields) may hold only I-JSON numbers (RFC 7493): integers within
+-(2**53 - 1) and finite floats; larger values belong in decimal strings. Nothing that decodes
can then fail to be written as JSON again.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, NoReturn

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "Address",
    "AmountStr",
    "Bytes32Hex",
    "Caip2Network",
    "Eip3009Authorization",
    "ExactEip3009Payload",
    "ExactPermit2Payload",
    "PaymentPayload",
    "PaymentPayloadV1",
    "PaymentRequired",
    "PaymentRequiredV1",
    "PaymentRequirements",
    "PaymentRequirementsV1",
    "Permit2Authorization",
    "Permit2Permitted",
    "Permit2Witness",
    "ResourceInfo",
    "SettleRequest",
    "SettleResponse",
    "SignatureHex",
    "SupportedKind",
    "SupportedResponse",
    "Uint256Str",
    "VerifyRequest",
    "VerifyResponse",
    "WireModel",
]

UINT256_MAX = 2**256 - 1
# The largest integer every JSON reader holds exactly (an IEEE 754 double's 53-bit mantissa).
JSON_SAFE_INT = 2**53 - 1
MAX_SIGNATURE_CHARS = 8 * 1024

_DECIMAL_RE = re.compile(r"[0-9]{1,78}", re.ASCII)
_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}", re.ASCII)
_BYTES32_RE = re.compile(r"0x[0-9a-fA-F]{64}", re.ASCII)
_SIGNATURE_RE = re.compile(r"0x(?:[0-9a-fA-F]{2})+", re.ASCII)
_CAIP2_RE = re.compile(r"[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}", re.ASCII)


# -- field types --------------------------------------------------------------------------


def _check_uint256(value: str) -> str:
    # fullmatch, not match + "$": "$" would accept a trailing newline.
    if _DECIMAL_RE.fullmatch(value) is None:
        raise PydanticCustomError(
            "uint256_string",
            "must be a decimal integer string: digits 0-9 only, no sign, at most 78 digits",
        )
    if len(value) == 78 and int(value) > UINT256_MAX:
        raise PydanticCustomError("uint256_string", "exceeds the uint256 maximum")
    return value


def _check_settled_amount(value: str) -> str:
    # The SDK's batch-settlement "skip" path sends amount "" (nothing settled by this call).
    return value if value == "" else _check_uint256(value)


def is_evm_address(value: object) -> bool:
    """0x followed by exactly 40 hex digits (any case)."""
    return isinstance(value, str) and _ADDRESS_RE.fullmatch(value) is not None


def _check_address(value: str) -> str:
    if _ADDRESS_RE.fullmatch(value) is None:
        raise PydanticCustomError("evm_address", "must be an EVM address: 0x followed by 40 hex digits")
    return value


def _check_bytes32(value: str) -> str:
    if _BYTES32_RE.fullmatch(value) is None:
        raise PydanticCustomError("bytes32_hex", "must be 0x followed by 64 hex digits")
    return value


def _check_signature(value: str) -> str:
    if len(value) > MAX_SIGNATURE_CHARS:
        raise PydanticCustomError(
            "signature_hex",
            "signature too long: {length} characters (max {limit})",
            {"length": len(value), "limit": MAX_SIGNATURE_CHARS},
        )
    if _SIGNATURE_RE.fullmatch(value) is None:
        raise PydanticCustomError("signature_hex", "must be 0x followed by a non-empty, even number of hex digits")
    return value


def _check_caip2(value: str) -> str:
    if _CAIP2_RE.fullmatch(value) is None:
        raise PydanticCustomError("caip2", "must be a CAIP-2 network id such as eip155:8453")
    return value


def _check_json_value(value: Any) -> Any:
    """Free-form JSON: refuse integers beyond +-JSON_SAFE_INT and NaN/Infinity (not JSON). Every
    payment header runs this: a walk without locations first, the one that names them only for
    a value that fails (or of a type JSON does not produce)."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is int and -JSON_SAFE_INT <= item <= JSON_SAFE_INT:
            continue
        elif kind is float and math.isfinite(item):
            continue
        else:
            return _check_json_value_at(value)
    return value


def _check_json_value_at(value: Any) -> Any:
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack:
        loc, item = stack.pop()
        if isinstance(item, dict):
            stack.extend(((*loc, k), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend(((*loc, i), v) for i, v in enumerate(item))
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int) and not -JSON_SAFE_INT <= item <= JSON_SAFE_INT:
            _fail_at(loc, item, "integer out of range (max magnitude 2**53 - 1): send large values as decimal strings")
        elif isinstance(item, float) and not math.isfinite(item):
            _fail_at(loc, item, "not a finite number")
    return value


def _fail_at(loc: tuple[str | int, ...], value: Any, message: str) -> NoReturn:
    # A ValidationError raised inside a validator is reported under the field's location + `loc`.
    error = PydanticCustomError("json_number", message)
    raise ValidationError.from_exception_data("JSON value", [InitErrorDetails(type=error, loc=loc, input=value)])


def _check_scheme_payload(value: dict[str, Any]) -> dict[str, Any]:
    # The scheme models raise ValidationError; pydantic reports its errors under `payload.`.
    if "permit2Authorization" in value:
        ExactPermit2Payload.model_validate(value)
    elif "authorization" in value:
        ExactEip3009Payload.model_validate(value)
    return value


def _version_check(*allowed: int) -> AfterValidator:
    expected = " or ".join(str(v) for v in allowed)

    def check(value: int) -> int:
        if value not in allowed:
            raise PydanticCustomError("x402_version", "x402Version must be {expected}", {"expected": expected})
        return value

    return AfterValidator(check)


Uint256Str = Annotated[str, AfterValidator(_check_uint256)]
"""A uint256 as a decimal string ("10000"); rejects numbers, signs, hex, floats, > 2**256-1."""
AmountStr = Uint256Str
"""An amount in atomic units, as a decimal string."""
Address = Annotated[str, AfterValidator(_check_address)]
"""``0x`` + 40 hex digits, any case, kept exactly as given."""
Bytes32Hex = Annotated[str, AfterValidator(_check_bytes32)]
SignatureHex = Annotated[str, AfterValidator(_check_signature)]
Caip2Network = Annotated[str, AfterValidator(_check_caip2)]
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
Seconds = Annotated[StrictInt, Field(ge=0, le=JSON_SAFE_INT)]
JsonValue = Annotated[Any, AfterValidator(_check_json_value)]
"""Any JSON value whose numbers are I-JSON (see the module docstring)."""
JsonObject = dict[str, JsonValue]
SchemePayload = Annotated[dict[str, Any], AfterValidator(_check_scheme_payload), AfterValidator(_check_json_value)]
"""``PaymentPayload.payload``: a dict, checked against the scheme model its shape names."""
_VersionV2 = Annotated[StrictInt, _version_check(2)]
_VersionV1 = Annotated[StrictInt, _version_check(1)]
_VersionAny = Annotated[StrictInt, _version_check(1, 2)]


# -- base ---------------------------------------------------------------------------------


class WireModel(BaseModel):
    """Base of every x402 object: camelCase on the wire, unknown fields kept."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        serialize_by_alias=True,
        extra="allow",
    )
    __pydantic_extra__: dict[str, JsonValue] = Field(init=False)  # unknown fields: I-JSON too

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict: by alias, ``None`` dropped."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_json(self) -> str:
        """Compact JSON, by alias, ``None`` dropped (the SDK's ``model_dump_json`` bytes)."""
        return self.model_dump_json(by_alias=True, exclude_none=True)


class _SignedPayloadModel(WireModel):
    # Signed scheme payloads: unknown fields are not covered by the signature -> dropped.
    model_config = ConfigDict(extra="ignore")


# -- v2 -----------------------------------------------------------------------------------


class ResourceInfo(WireModel):
    url: str
    description: str | None = None
    mime_type: str | None = None
    service_name: str | None = None
    tags: list[str] | None = None
    icon_url: str | None = None


class PaymentRequirements(WireModel):
    scheme: NonEmptyStr
    network: Caip2Network
    asset: NonEmptyStr
    amount: AmountStr
    pay_to: NonEmptyStr
    max_timeout_seconds: Seconds
    extra: JsonObject = Field(default_factory=dict)


class PaymentRequired(WireModel):
    x402_version: _VersionV2 = 2
    error: str | None = None
    resource: ResourceInfo | None = None
    accepts: list[PaymentRequirements]
    extensions: JsonObject | None = None


class PaymentPayload(WireModel):
    x402_version: _VersionV2 = 2
    payload: SchemePayload
    accepted: PaymentRequirements
    resource: ResourceInfo | None = None
    extensions: JsonObject | None = None


class VerifyResponse(WireModel):
    is_valid: StrictBool
    invalid_reason: str | None = None
    invalid_message: str | None = None
    payer: str | None = None
    extensions: JsonObject | None = None
    extra: JsonObject | None = None


class SettleResponse(WireModel):
    success: StrictBool
    error_reason: str | None = None
    error_message: str | None = None
    payer: str | None = None
    transaction: str = ""
    network: str
    amount: Annotated[str, AfterValidator(_check_settled_amount)] | None = None
    extensions: JsonObject | None = None
    extra: JsonObject | None = None


class SupportedKind(WireModel):
    x402_version: _VersionAny
    scheme: NonEmptyStr
    network: NonEmptyStr
    extra: JsonObject | None = None


class SupportedResponse(WireModel):
    kinds: list[SupportedKind]
    extensions: list[str] = Field(default_factory=list)
    signers: dict[str, list[str]] = Field(default_factory=dict)


# -- v1 (legacy) --------------------------------------------------------------------------


class PaymentRequirementsV1(WireModel):
    scheme: NonEmptyStr
    network: NonEmptyStr
    max_amount_required: AmountStr
    resource: str
    description: str | None = None
    mime_type: str | None = None
    pay_to: NonEmptyStr
    max_timeout_seconds: Seconds
    asset: NonEmptyStr
    output_schema: JsonObject | None = None
    extra: JsonObject | None = None


class PaymentRequiredV1(WireModel):
    x402_version: _VersionV1 = 1
    error: str | None = None
    accepts: list[PaymentRequirementsV1]


class PaymentPayloadV1(WireModel):
    x402_version: _VersionV1 = 1
    scheme: NonEmptyStr
    network: NonEmptyStr
    payload: SchemePayload


# -- facilitator requests (v1 or v2, chosen by paymentPayload.x402Version) ------------------

# Union members are tagged "(v1)" / "(v2)"; the codecs drop these tags from error locations.
V1_TAG = "(v1)"
V2_TAG = "(v2)"


def _payload_tag(value: Any) -> str:
    version = value.get("x402Version", value.get("x402_version")) if isinstance(value, dict) else (
        getattr(value, "x402_version", None)
    )
    return V1_TAG if type(version) is int and version == 1 else V2_TAG


def _requirements_tag(value: Any) -> str:
    if isinstance(value, dict):
        v1 = "maxAmountRequired" in value or "max_amount_required" in value
    else:
        v1 = isinstance(value, PaymentRequirementsV1)
    return V1_TAG if v1 else V2_TAG


AnyPaymentPayload = Annotated[
    Annotated[PaymentPayload, Tag(V2_TAG)] | Annotated[PaymentPayloadV1, Tag(V1_TAG)],
    Discriminator(_payload_tag),
]
AnyPaymentRequirements = Annotated[
    Annotated[PaymentRequirements, Tag(V2_TAG)] | Annotated[PaymentRequirementsV1, Tag(V1_TAG)],
    Discriminator(_requirements_tag),
]


class _FacilitatorRequest(WireModel):
    """Body of ``POST /verify`` and ``POST /settle``.

    v2: ``PaymentPayload`` + ``PaymentRequirements``; v1: ``PaymentPayloadV1`` +
    ``PaymentRequirementsV1``. The three versions (outer, payload, requirements shape)
    must agree.
    """

    x402_version: _VersionAny
    payment_payload: AnyPaymentPayload
    payment_requirements: AnyPaymentRequirements

    @model_validator(mode="after")
    def _versions_agree(self) -> _FacilitatorRequest:
        payload_version = self.payment_payload.x402_version
        requirements_version = 1 if isinstance(self.payment_requirements, PaymentRequirementsV1) else 2
        if not self.x402_version == payload_version == requirements_version:
            raise PydanticCustomError(
                "x402_version_mismatch",
                "x402Version {outer} does not match paymentPayload (v{payload}) and "
                "paymentRequirements (v{requirements})",
                {"outer": self.x402_version, "payload": payload_version, "requirements": requirements_version},
            )
        return self


class VerifyRequest(_FacilitatorRequest):
    pass


class SettleRequest(_FacilitatorRequest):
    pass


# -- EVM scheme payloads (PaymentPayload.payload) -------------------------------------------


class Permit2Permitted(_SignedPayloadModel):
    token: Address
    amount: AmountStr


class Permit2Witness(_SignedPayloadModel):
    """``exact``: {to, validAfter}; ``upto`` adds ``facilitator``."""

    to: Address
    facilitator: Address | None = None
    valid_after: Uint256Str


class Permit2Authorization(_SignedPayloadModel):
    from_: Address = Field(alias="from")
    permitted: Permit2Permitted
    spender: Address
    nonce: Uint256Str
    deadline: Uint256Str
    witness: Permit2Witness


class ExactPermit2Payload(_SignedPayloadModel):
    """``payload`` of an ``exact``/``upto`` Permit2 payment (``permit2Authorization`` key)."""

    permit2_authorization: Permit2Authorization
    signature: SignatureHex


class Eip3009Authorization(_SignedPayloadModel):
    from_: Address = Field(alias="from")
    to: Address
    value: AmountStr
    valid_after: Uint256Str
    valid_before: Uint256Str
    nonce: Bytes32Hex


class ExactEip3009Payload(_SignedPayloadModel):
    """``payload`` of an ``exact`` EIP-3009 payment (``authorization`` key)."""

    authorization: Eip3009Authorization
    signature: SignatureHex
