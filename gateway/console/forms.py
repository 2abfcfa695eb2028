"""The console's forms: reading a urlencoded body (bounded), and the policy form, whose amounts
are typed in token units ("5" OPG) and sent to the admin API in base units. Field errors (ours,
and the admin API's 422 locations) are mapped back to the form's fields, shown inline."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from starlette.requests import Request

from storage.bodies import BodyIncompleteError, BodyTooLargeError, read_body

MAX_FORM_BYTES = 64 * 1024
PERIODS = ("hour", "day", "week", "month")


async def read_form(request: Request) -> dict[str, str] | None:
    """The form's fields (last value wins), or None when the body is too large or did not arrive
    whole (nobody, or a client too slow, to answer with the form again)."""
    try:
        raw = await read_body(request, MAX_FORM_BYTES)
    except (BodyTooLargeError, BodyIncompleteError):
        return None
    return dict(urllib.parse.parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))


def token_units(amount: int, decimals: int) -> str:
    """Base units as a plain decimal in token units, without trailing zeros ("5", "0.005")."""
    text = format(Decimal(amount).scaleb(-decimals), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


@dataclass
class PolicyForm:
    """The form's fields as typed (to show again) and the errors found, by field name."""

    values: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_policy(cls, policy: dict[str, Any], decimals: int) -> PolicyForm:
        values = {f"limit_{p}": "" for p in PERIODS}
        for lim in policy.get("limits", []):
            values[f"limit_{lim['period']}"] = token_units(int(lim["amount"]), decimals)
        cap = policy.get("per_call_max")
        rate = policy.get("rate_limit") or {}
        values |= {"per_call_max": "" if cap is None else token_units(int(cap), decimals),
                   "rate_per_minute": str(rate.get("per_minute", "")), "rate_burst": str(rate.get("burst", "")),
                   "group": policy.get("group") or "",
                   "allowed_models": ", ".join(policy.get("allowed_models") or []),
                   "allowed_routes": ", ".join(policy.get("allowed_routes") or [])}
        return cls(values)

    def to_body(self, existing: dict[str, Any] | None, decimals: int) -> dict[str, Any] | None:
        """The PUT body (None when a field is invalid: see errors). Rolling flags and the
        suspension of an existing policy are kept as they are."""
        rolling = {lim["period"]: lim.get("rolling", False) for lim in (existing or {}).get("limits", [])}
        limits = []
        for period in PERIODS:
            amount = self._amount(f"limit_{period}", decimals)
            if amount is not None:
                limits.append({"period": period, "amount": str(amount), "rolling": rolling.get(period, False)})
        cap = self._amount("per_call_max", decimals)
        per_minute, burst = self._count("rate_per_minute"), self._count("rate_burst")
        if burst is not None and per_minute is None and "rate_burst" not in self.errors:
            self.errors["rate_burst"] = "a burst needs calls per minute"
        body: dict[str, Any] = {
            "limits": limits, "per_call_max": None if cap is None else str(cap),
            "rate_limit": None if per_minute is None else {"per_minute": per_minute, "burst": burst or 0},
            "group": self.values.get("group", "").strip() or None,
            "allowed_models": _listed(self.values.get("allowed_models", "")),
            "allowed_routes": _listed(self.values.get("allowed_routes", "")),
            "suspended": bool((existing or {}).get("suspended", False)),
        }
        return None if self.errors else body

    def _amount(self, name: str, decimals: int) -> int | None:
        text = self.values.get(name, "").strip().replace("_", "")
        if not text:
            return None
        try:
            value = Decimal(text)
        except InvalidOperation:
            self.errors[name] = "a number of tokens, e.g. 5 or 0.25"
            return None
        base = value.scaleb(decimals) if value.is_finite() else value
        if not value.is_finite() or value < 0:
            self.errors[name] = "must be zero or more"
        elif base != base.to_integral_value():
            self.errors[name] = f"at most {decimals} decimal places"
        else:
            return int(base)
        return None

    def _count(self, name: str) -> int | None:
        text = self.values.get(name, "").strip()
        if not text:
            return None
        if not (text.isascii() and text.isdigit()):
            self.errors[name] = "a whole number"
            return None
        return int(text)

    def admin_errors(self, errors: list[dict[str, Any]], body: dict[str, Any]) -> None:
        """The admin API's 422 field errors ("body.limits.0.amount") on the form's fields."""
        for err in errors:
            parts = str(err.get("loc", "")).split(".")[1:]
            name = "form"
            if parts[:1] == ["limits"] and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < len(body["limits"]):
                name = f"limit_{body['limits'][int(parts[1])]['period']}"
            elif parts[:2] == ["rate_limit", "burst"]:
                name = "rate_burst"
            elif parts[:1] == ["rate_limit"]:
                name = "rate_per_minute"
            elif parts[:1] and parts[0] in ("per_call_max", "group", "allowed_models", "allowed_routes"):
                name = parts[0]
            self.errors.setdefault(name, str(err.get("msg", "invalid")))


def _listed(text: str) -> list[str] | None:
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None
