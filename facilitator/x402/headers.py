"""Codecs for the x402 HTTP headers and the facilitator's JSON bodies.

Headers carry standard base64 (with ``=`` padding) of UTF-8 JSON, exactly as the official
SDK writes them (``x402/http/utils.py``):

* ``PAYMENT-REQUIRED`` and ``PAYMENT-SIGNATURE`` / ``X-PAYMENT``: compact JSON from
  ``model_dump_json(by_alias=True, exclude_none=True)``, non-ASCII left as UTF-8.
* ``PAYMENT-RESPONSE`` / ``X-PAYMENT-RESPONSE``: the SDK uses ``json.dumps(model_dump(...))``,
  i.e. ``", "`` / ``": "`` separators and ``\\uXXXX`` escapes. ``encode_settle_response``
  reproduces that byte for byte. Decoders accept any JSON layout.

Decoding is strict and bounded: a header value over 16 KiB is refused before base64
decoding, decoded JSON over 12 KiB or nested deeper than 16 levels is refused before
parsing, base64 must be canonical (``validate=True``), and the JSON is parsed and validated
in one pass by pydantic's Rust parser. Every failure is one ``PaymentHeaderError`` (or
``WireFormatError`` for bodies) with reason ``invalid_payload`` or ``invalid_x402_version``.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

from pydantic import BaseModel, TypeAdapter, ValidationError

from facilitator.x402.errors import FieldError, PaymentHeaderError, WireFormatError
from facilitator.x402.reasons import ErrorReason
from facilitator.x402.types import (
    V1_TAG,
    V2_TAG,
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequired,
    PaymentRequiredV1,
    SettleResponse,
)

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "PAYMENT_REQUIRED_HEADER",
    "PAYMENT_RESPONSE_HEADER",
    "PAYMENT_SIGNATURE_HEADER",
    "X_PAYMENT_HEADER",
    "X_PAYMENT_RESPONSE_HEADER",
    "decode_payment_header",
    "decode_payment_required",
    "decode_payment_response",
    "decode_payment_signature",
    "decode_x_payment",
    "encode_payment_payload",
    "encode_payment_required",
    "encode_settle_response",
    "parse_json_body",
]

PAYMENT_REQUIRED_HEADER = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE_HEADER = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE_HEADER = "PAYMENT-RESPONSE"
X_PAYMENT_HEADER = "X-PAYMENT"  # v1
X_PAYMENT_RESPONSE_HEADER = "X-PAYMENT-RESPONSE"  # v1

MAX_HEADER_BYTES = 16 * 1024
MAX_JSON_BYTES = 12 * 1024
MAX_JSON_DEPTH = 16
DEFAULT_MAX_BODY_BYTES = 64 * 1024
# A /verify body wraps the payment payload one level deeper than the header does.
DEFAULT_MAX_BODY_DEPTH = MAX_JSON_DEPTH + 4
MAX_FIELD_ERRORS = 20
_MESSAGE_FIELD_ERRORS = 3

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


# -- encoders -----------------------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def encode_payment_required(payment_required: PaymentRequired | PaymentRequiredV1) -> str:
    """Value of the ``PAYMENT-REQUIRED`` header."""
    return _b64(payment_required.model_dump_json(by_alias=True, exclude_none=True))


def encode_payment_payload(payload: PaymentPayload | PaymentPayloadV1) -> str:
    """Value of ``PAYMENT-SIGNATURE`` (v2) or ``X-PAYMENT`` (v1)."""
    return _b64(payload.model_dump_json(by_alias=True, exclude_none=True))


def encode_settle_response(settle_response: SettleResponse | dict[str, Any]) -> str:
    """Value of ``PAYMENT-RESPONSE`` / ``X-PAYMENT-RESPONSE``, byte-identical to the SDK's. A dict
    is taken as the response's wire form already (``model_dump(mode="json", by_alias=True,
    exclude_none=True)``): a hot path that built it directly skips the model."""
    if isinstance(settle_response, dict):
        return _b64(json.dumps(settle_response))
    return _b64(json.dumps(settle_response.model_dump(mode="json", by_alias=True, exclude_none=True)))


# -- decoders -----------------------------------------------------------------------------


def decode_payment_signature(value: str) -> PaymentPayload:
    """Decode a v2 ``PAYMENT-SIGNATURE`` header value."""
    return _decode_header(value, PaymentPayload, PAYMENT_SIGNATURE_HEADER)


def decode_x_payment(value: str) -> PaymentPayloadV1:
    """Decode a v1 ``X-PAYMENT`` header value."""
    return _decode_header(value, PaymentPayloadV1, X_PAYMENT_HEADER)


def decode_payment_required(value: str) -> PaymentRequired:
    """Decode a ``PAYMENT-REQUIRED`` header value (v2; v1 servers send a JSON body instead)."""
    return _decode_header(value, PaymentRequired, PAYMENT_REQUIRED_HEADER)


def decode_payment_response(value: str) -> SettleResponse:
    """Decode a ``PAYMENT-RESPONSE`` (or v1 ``X-PAYMENT-RESPONSE``) header value."""
    return _decode_header(value, SettleResponse, PAYMENT_RESPONSE_HEADER)


def decode_payment_header(headers: Mapping[str, str]) -> PaymentPayload | PaymentPayloadV1 | None:
    """The payment a request carries: ``PAYMENT-SIGNATURE`` (v2), else ``X-PAYMENT`` (v1).

    Header names match case-insensitively. ``None`` when neither header is present; a header
    that is present but malformed (including empty) raises ``PaymentHeaderError`` and is
    never skipped in favour of the other one.
    """
    value = _header(headers, PAYMENT_SIGNATURE_HEADER)
    if value is not None:
        return decode_payment_signature(value)
    value = _header(headers, X_PAYMENT_HEADER)
    if value is not None:
        return decode_x_payment(value)
    return None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)  # already case-insensitive for Starlette/aiohttp/httpx headers
    if value is None:
        lower = name.lower()
        value = headers.get(lower)
        if value is None:
            for key, candidate in headers.items():
                if key.lower() == lower:
                    return candidate
    return value


def _decode_header(value: object, model: type[M], header: str) -> M:
    if not isinstance(value, str | bytes):
        raise PaymentHeaderError(ErrorReason.INVALID_PAYLOAD, f"{header}: not a string")
    if len(value) > MAX_HEADER_BYTES:
        size = len(value.encode("utf-8", "replace")) if isinstance(value, str) else len(value)
        raise PaymentHeaderError(
            ErrorReason.INVALID_PAYLOAD,
            f"{header}: header too large: {size} bytes (max {MAX_HEADER_BYTES})",
        )
    value = value.strip()  # optional whitespace around a field value is not part of it
    if not value:
        raise PaymentHeaderError(ErrorReason.INVALID_PAYLOAD, f"{header}: empty header value")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII text
        raise PaymentHeaderError(ErrorReason.INVALID_PAYLOAD, f"{header}: not base64 ({exc})") from None
    return _validate_json(raw, model.model_validate_json, MAX_JSON_BYTES, MAX_JSON_DEPTH, header, PaymentHeaderError,
                          "decoded JSON")


# -- request bodies -----------------------------------------------------------------------


@overload
def parse_json_body(
    raw: bytes | bytearray | memoryview | str,
    model: type[M],
    max_bytes: int = ...,
    *,
    max_depth: int = ...,
) -> M: ...
@overload
def parse_json_body(
    raw: bytes | bytearray | memoryview | str,
    model: TypeAdapter[T],
    max_bytes: int = ...,
    *,
    max_depth: int = ...,
) -> T: ...
def parse_json_body(
    raw: bytes | bytearray | memoryview | str,
    model: type[BaseModel] | TypeAdapter[Any],
    max_bytes: int = DEFAULT_MAX_BODY_BYTES,
    *,
    max_depth: int = DEFAULT_MAX_BODY_DEPTH,
) -> Any:
    """Parse and validate an HTTP JSON body (e.g. ``VerifyRequest`` for ``POST /verify``).

    Raises ``WireFormatError``; its ``errors`` holds ``[{"loc": "paymentPayload.accepted.amount",
    "msg": "..."}]`` and ``to_dict()`` is a ready 400 body.
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    elif not isinstance(raw, bytes):
        raw = bytes(raw)
    if not raw.strip():
        raise WireFormatError(ErrorReason.INVALID_PAYLOAD, "body: empty")
    validate = model.validate_json if isinstance(model, TypeAdapter) else model.model_validate_json
    return _validate_json(raw, validate, max_bytes, max_depth, "body", WireFormatError, "body")


# -- shared validation --------------------------------------------------------------------

# A JSON string literal (escapes included); used to blank out strings before counting brackets.
_JSON_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS_AS_BRACES = bytes.maketrans(b"[]", b"{}")
_NON_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
                    bool: "boolean", type(None): "null"}
_UNION_TAGS = frozenset({V1_TAG, V2_TAG})


def _nesting_exceeds(raw: bytes, limit: int) -> bool:
    """True if the JSON text nests objects/arrays deeper than ``limit``.

    Cheap for real payloads (fewer opening brackets than the limit: nothing to do); else the
    strings are blanked, the text is reduced to its brackets and innermost pairs are peeled
    ``limit`` times, all in C. Malformed bracket structure returns False and is left to the
    JSON parser to report.
    """
    if raw.count(b"{") + raw.count(b"[") <= limit:
        return False
    skeleton = _JSON_STRING_RE.sub(b"", raw).translate(_BRACKETS_AS_BRACES, _NON_BRACKETS)
    for _ in range(limit):
        peeled = skeleton.replace(b"{}", b"")
        if len(peeled) == len(skeleton):
            return False  # empty, or brackets that do not pair up: not our call
        skeleton = peeled
    return b"{}" in skeleton


def _validate_json(
    raw: bytes,
    validate: Callable[[bytes], T],
    max_bytes: int,
    max_depth: int,
    where: str,
    error_cls: type[WireFormatError],
    what: str,
) -> T:
    if len(raw) > max_bytes:
        raise error_cls(
            ErrorReason.INVALID_PAYLOAD, f"{where}: {what} too large: {len(raw)} bytes (max {max_bytes})"
        )
    if _nesting_exceeds(raw, max_depth):
        raise error_cls(ErrorReason.INVALID_PAYLOAD, f"{where}: JSON nested deeper than {max_depth} levels")
    try:
        return validate(raw)
    except ValidationError as exc:
        raise _wire_error(exc, where, error_cls) from None


def _wire_error(exc: ValidationError, where: str, error_cls: type[WireFormatError]) -> WireFormatError:
    details = exc.errors(include_url=False, include_context=False)
    first = details[0]
    if first["type"] == "json_invalid":
        reason_text = first["msg"].removeprefix("Invalid JSON: ")
        return error_cls(ErrorReason.INVALID_PAYLOAD, f"{where}: not JSON ({reason_text})")
    first_loc = [part for part in first["loc"] if part not in _UNION_TAGS]
    if not first_loc and first["type"] in {"model_type", "model_attributes_type", "dict_type", "union_tag_invalid"}:
        got = _JSON_TYPE_NAMES.get(type(first.get("input")), "other")
        return error_cls(ErrorReason.INVALID_PAYLOAD, f"{where}: not a JSON object (got {got})")

    reason = ErrorReason.INVALID_PAYLOAD
    fields: list[FieldError] = []
    for detail in details:
        loc = tuple(part for part in detail["loc"] if part not in _UNION_TAGS)
        if detail["type"].startswith("x402_version") or (loc and loc[-1] == "x402Version"):
            reason = ErrorReason.INVALID_X402_VERSION
        if len(fields) < MAX_FIELD_ERRORS:
            fields.append({"loc": ".".join(str(part) for part in loc), "msg": detail["msg"]})

    shown = "; ".join(f"field {f['loc']}: {f['msg']}" if f["loc"] else f["msg"] for f in fields[:_MESSAGE_FIELD_ERRORS])
    if len(details) > _MESSAGE_FIELD_ERRORS:
        shown += f" (and {len(details) - _MESSAGE_FIELD_ERRORS} more)"
    return error_cls(reason, f"{where}: {shown}", fields)
