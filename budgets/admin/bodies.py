"""Reading a JSON request body without letting it hurt the process: a size cap, a nesting cap
checked before parsing, and numbers kept exact (or harmless) for the amount checks."""

from __future__ import annotations

import json
import re
from decimal import Decimal

from starlette.requests import Request

from budgets.admin.errors import AdminError, invalid
from storage.bodies import BodyIncompleteError, BodyTooLargeError, read_body

MAX_BODY_BYTES = 1 << 20
MAX_DEPTH = 32
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?')  # an unclosed string runs to the end: linear time
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))


async def read_json(request: Request, *, required: bool) -> dict | None:
    try:
        raw = await read_body(request, MAX_BODY_BYTES)
    except BodyTooLargeError:
        raise AdminError(413, "request_too_large", f"bodies are at most {MAX_BODY_BYTES} bytes") from None
    except BodyIncompleteError as exc:
        raise AdminError(exc.status, "request_incomplete", exc.message) from None
    if not raw.strip():
        if required:
            raise invalid("body", "a JSON object is required")
        return None
    if _too_deep(raw):
        raise invalid("body", f"nested deeper than {MAX_DEPTH} levels")
    try:
        doc = json.loads(raw, parse_float=_number, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise invalid("body", f"not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise invalid("body", "must be a JSON object")
    return doc


def _too_deep(raw: bytes) -> bool:
    """Brackets nested deeper than MAX_DEPTH (outside strings)? Checked before json.loads, which
    recurses in C: py_ecc (imported with web3) raises the recursion limit to 100000, so a deeply
    nested body would overflow the C stack and kill the process instead of raising RecursionError."""
    depth = 0
    for c in _STRING.sub(b"", raw).translate(None, _NOT_BRACKET):
        depth += 1 if c in b"[{" else -1
        if depth > MAX_DEPTH:
            return True
    return False


def _number(text: str) -> Decimal | float:
    """JSON numbers with a fraction or exponent: exact as Decimal; absurd exponents as a float,
    so that no one converts 1e100000000 to an int."""
    value = Decimal(text)
    return value if value.is_finite() and abs(value.adjusted()) < 100 else float(text)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
