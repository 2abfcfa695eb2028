"""Metered (`upto`) calls: the request capped so its worst case fits, and what it cost."""

from __future__ import annotations

from decimal import Decimal

import orjson

from facilitator.x402.types import PaymentRequirements
from gateway.metering import Usage, cap_request, cost_of, output_token_cap, to_base_units
from gateway.pricing import Offer, PricingError


def capped_body(offer: Offer, body: bytes, *, ceiling: Decimal | None = None) -> bytes:
    """The request as forwarded on a metered route: max_tokens capped so the worst case stays
    under the ceiling (the route's max_per_call, or a lower one such as what a session can still
    pay; and under the route's cap); streamed calls asked to report usage."""
    assert offer.token_price is not None
    cap = output_token_cap(len(body), offer.token_price, offer.price if ceiling is None else ceiling)
    if offer.route.max_tokens_cap is not None:
        cap = min(cap, offer.route.max_tokens_cap)
    if cap <= 0:
        raise PricingError("prompt_too_large", "the prompt alone could cost more than the per-call maximum")
    try:
        return cap_request(body, cap, anthropic=offer.route.api == "anthropic")
    except (orjson.JSONDecodeError, TypeError, ValueError):
        raise PricingError("invalid_request", "request body must be a JSON object") from None


# What a metered charge was made of (usage, the missing-usage policy applied): the budget ledger
# entry's `extra`, and the fields of the final SSE payment event.
ChargeDetails = dict[str, str | int]


def metered_charge(offer: Offer, requirement: PaymentRequirements, usage: Usage | None, *, cut: bool = False,
                   policy: str | None = None) -> tuple[int, ChargeDetails]:
    """What an upto call costs in the asset: metered from the usage the upstream reported, or by
    the route's policy when usage is missing or the stream was cut. Never above the signed maximum."""
    assert offer.token_price is not None
    ceiling = int(requirement.amount)
    rate, decimals = next((r, d) for a, r, d in offer.rates if a == requirement.asset.lower())
    if usage is not None and not cut:
        cost = cost_of(usage, offer.token_price)
        amount = min(to_base_units(cost, rate, decimals), ceiling)
        return amount, {"usage_policy": "metered", "input_tokens": usage.input_tokens,
                        "output_tokens": usage.output_tokens, "cost": str(cost)}
    policy = policy or offer.route.missing_usage
    amount = ceiling if policy == "ceiling" else min(to_base_units(offer.token_price.per_call, rate, decimals), ceiling)
    details: ChargeDetails = {"usage_policy": policy, "reason": "stream cut" if cut else "usage missing"}
    if usage is not None:
        details |= {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}
    return amount, details
