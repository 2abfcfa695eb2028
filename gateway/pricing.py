"""What a request costs: the route it matches, the model it names, and the payment requirements
offered for it (one per accepted payment option).

Unpriced paths match nothing and are answered 404: the gateway is never an open proxy.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache

import orjson
from eth_account import Account

from facilitator.x402.matching import RequirementMismatchError, find_offered
from facilitator.x402.networks import CAIP2_TO_V1_NETWORK, V1_NETWORK_TO_CAIP2, to_v1_name
from facilitator.x402.types import PaymentRequirements, PaymentRequirementsV1
from gateway.errors import GatewayError
from gateway.metering import TokenPrice, to_base_units
from gateway.quotes import QuoteBook, StaleQuoteError
from gateway.settings import BatchChannels, GatewaySettings, PaymentOption, Route, parse_price

BATCH_SCHEME = "batch-settlement"


@lru_cache(maxsize=64)
def _address_of(key: str) -> str:
    return str(Account.from_key(key).address)


def batch_authorizer(batch: BatchChannels) -> str:
    """The channels' receiverAuthorizer: the address of the route's authorizer key."""
    return _address_of(batch.receiver_authorizer_key.get_secret_value())

_PARAM = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")


class PricingError(GatewayError):
    """The request cannot be priced (no offer for it; 400, or 503 when a price is stale)."""

    def __init__(self, reason: str, message: str, status: int = 400) -> None:
        super().__init__(reason, message, status)


class OfferMismatchError(Exception):
    """A payment for something this route does not offer; `field` names what differs."""

    def __init__(self, field: str) -> None:
        super().__init__(f"the payment does not match what this route offers ({field} differs)")
        self.field = field


@dataclass(frozen=True, slots=True)
class Offer:
    route: Route
    model: str | None
    price: Decimal  # display units of the asset; metered routes: the quote-currency ceiling
    requirements: tuple[PaymentRequirements, ...]
    token_price: TokenPrice | None = None  # metered routes: what usage costs
    rates: tuple[tuple[str, Decimal, int], ...] = ()  # metered: (asset lowercase, quote rate, decimals) as quoted

    @property
    def route_id(self) -> str:
        return f"{self.route.method} {self.route.path}"

    def bind(self, accepted: PaymentRequirements) -> PaymentRequirements:
        """The offered requirement a payment accepted, compared field for field (the facilitator's
        rule) before any facilitator call: a payment for a cheaper route, another payTo, asset or
        network raises OfferMismatchError naming the field."""
        try:
            return find_offered(accepted, self.requirements)
        except RequirementMismatchError as exc:
            raise OfferMismatchError(exc.field) from None


@dataclass(frozen=True, slots=True)
class _CompiledRoute:
    route: Route
    pattern: re.Pattern[str]
    model_param: str | None  # KServe: the model is in the path


def amount_of(price: Decimal, option: PaymentOption) -> int:
    return int(price * (Decimal(10) ** option.decimals))


def requirement_for(option: PaymentOption, amount: int, pay_to: str) -> PaymentRequirements:
    extra: dict = {"name": option.eip712_name, "version": option.eip712_version}
    if option.transfer_method == "permit2":
        extra["assetTransferMethod"] = "permit2"
    return PaymentRequirements(
        scheme=option.scheme,
        network=option.network,
        asset=option.asset,
        amount=str(amount),
        pay_to=option.pay_to or pay_to,
        max_timeout_seconds=option.max_timeout_seconds,
        extra=extra,
    )


def v1_offered(req: PaymentRequirements) -> bool:
    """Whether a v1 client can pay this requirement: x402 v1 has `exact` only, on networks with a
    v1 name (a CAIP-2-only network is offered to v2 clients alone)."""
    return req.scheme == "exact" and (req.network in CAIP2_TO_V1_NETWORK or req.network in V1_NETWORK_TO_CAIP2)


def to_v1(req: PaymentRequirements, resource: str, description: str, mime_type: str) -> PaymentRequirementsV1:
    return PaymentRequirementsV1(
        scheme=req.scheme,
        network=to_v1_name(req.network),
        max_amount_required=req.amount,
        resource=resource,
        description=description,
        mime_type=mime_type,
        pay_to=req.pay_to,
        max_timeout_seconds=req.max_timeout_seconds,
        asset=req.asset,
        extra=req.extra,
    )


class Pricing:
    def __init__(self, settings: GatewaySettings, quotes: QuoteBook | None = None) -> None:
        self.settings = settings
        self.quotes = quotes or QuoteBook(settings.quote)
        self.upto_signers: dict[str, str] = {}  # network -> facilitatorAddress, set at start-up
        self._routes: list[_CompiledRoute] = []
        for route in settings.routes:
            params = _PARAM.findall(route.path)
            escaped = re.escape(route.path).replace(r"\{", "{").replace(r"\}", "}")
            regex = "^" + _PARAM.sub(lambda m: f"(?P<{m.group(1)}>[^/]+)", escaped) + "$"
            model_param = "name" if "name" in params else (params[0] if params else None)
            self._routes.append(_CompiledRoute(route, re.compile(regex), model_param))
        self._offers: dict[tuple[int, str | None, int], Offer] = {}
        # by identity: list.index would compare routes field by field (pydantic __eq__) per call
        self._index = {id(c.route): n for n, c in enumerate(self._routes)}
        self.created = int(time.time())  # the catalog's "created": when this configuration was loaded

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        """The route for (method, path); HEAD matches the route's GET or POST so it can be
        challenged (never charged)."""
        for compiled in self._routes:
            m = compiled.pattern.match(path)
            if m and (compiled.route.method == method or method == "HEAD"):
                return compiled.route, m.groupdict()
        return None

    def path_known(self, path: str) -> bool:
        return any(c.pattern.match(path) for c in self._routes)

    def offer(self, route: Route, params: dict[str, str], body: bytes, *, probe: bool = False) -> Offer:
        """`probe`: a HEAD request asks what the route costs; without a body naming a model it
        gets the route's default price."""
        try:
            model = self._model_of(route, params, body)
        except PricingError:
            if not probe:
                raise
            model = None
        index = self._index[id(route)]
        key = (index, model, self.quotes.version if route.metered else 0)
        cached = self._offers.get(key)
        if cached is not None:
            return cached
        if route.metered:
            offer = self._metered_offer(route, model)
            if len(self._offers) < 10_000:
                self._offers[key] = offer
            return offer
        if model is not None and model in route.models:
            price = parse_price(route.models[model])
        elif route.models and "*" in route.models:
            price = parse_price(route.models["*"])
        elif route.price is not None:
            price = parse_price(route.price)
        elif model is None and route.models:  # a probe without a model: the cheapest offered
            price = min(parse_price(p) for p in route.models.values())
        else:
            raise PricingError("model_not_offered", f"model {model!r} is not offered on {route.path}")
        reqs = tuple(requirement_for(o, amount_of(price, o), self.settings.pay_to) for o in self.settings.accepts)
        if route.batch is not None:
            reqs += tuple(self._batch_requirement(route, o, amount_of(price, o)) for o in self.settings.accepts)
        offer = Offer(route=route, model=model, price=price, requirements=reqs)
        if len(self._offers) < 10_000:  # models come from requests: bound the cache
            self._offers[key] = offer
        return offer

    def _batch_requirement(self, route: Route, option: PaymentOption, amount: int) -> PaymentRequirements:
        """batch-settlement beside exact: the channel's terms ride in `extra` (the client builds
        its ChannelConfig from them; the gateway checks the config against them)."""
        batch = route.batch
        assert batch is not None
        req = requirement_for(option, amount, self.settings.pay_to)
        minimum = amount_of(parse_price(batch.min_deposit), option) if batch.min_deposit else 10 * amount
        extra = req.extra | {"receiverAuthorizer": batch_authorizer(batch), "withdrawDelay": batch.withdraw_delay_s,
                             "minDeposit": str(minimum), "assetTransferMethod": option.transfer_method}
        return req.model_copy(update={"scheme": BATCH_SCHEME, "extra": extra})

    def _metered_offer(self, route: Route, model: str | None) -> Offer:
        """Pay for what is used: `upto` with the ceiling as the signed maximum (Permit2 assets),
        and/or `exact` at the ceiling, per the route's schemes."""
        tp = route.token_prices.get(model or "") or route.token_prices.get("*")
        if tp is None:
            raise PricingError("model_not_offered", f"model {model!r} is not offered on {route.path}")
        token_price = TokenPrice(parse_price(tp.input), parse_price(tp.output), parse_price(tp.per_call))
        assert route.max_per_call is not None
        ceiling = parse_price(route.max_per_call)
        reqs: list[PaymentRequirements] = []
        rates: dict[str, tuple[Decimal, int]] = {}
        for scheme in route.schemes:
            for o in self.settings.accepts:
                try:
                    rate = self.quotes.rate(o.symbol)
                    amount = to_base_units(ceiling, rate, o.decimals)
                    rates[o.asset.lower()] = (rate, o.decimals)
                except StaleQuoteError as exc:
                    raise PricingError("price_unavailable", f"cannot quote this call now: {exc}", 503) from None
                req = requirement_for(o, amount, self.settings.pay_to)
                if scheme == "upto":
                    signer = self.upto_signers.get(o.network)
                    if o.transfer_method != "permit2" or signer is None:
                        continue  # upto is Permit2 only, and needs the facilitator's address
                    update: dict = {"scheme": "upto", "extra": req.extra | {"facilitatorAddress": signer}}
                    if route.sessions is not None:  # one permit covers a session: its cap, its lifetime
                        update |= {"amount": str(to_base_units(parse_price(route.sessions.cap), rate, o.decimals)),
                                   "max_timeout_seconds": route.sessions.max_timeout_s}
                    req = req.model_copy(update=update)
                reqs.append(req)
        if route.batch is not None:  # a voucher per call for at most the ceiling; charged what was used
            reqs += [self._batch_requirement(route, o, to_base_units(ceiling, rates[o.asset.lower()][0], o.decimals))
                     for o in self.settings.accepts if o.asset.lower() in rates]
        if not reqs:
            raise PricingError("no_payment_option", f"no payment option can pay {route.path}", 503)
        return Offer(route=route, model=model, price=ceiling, requirements=tuple(reqs), token_price=token_price,
                     rates=tuple((a, r, d) for a, (r, d) in rates.items()))

    def _model_of(self, route: Route, params: dict[str, str], body: bytes) -> str | None:
        compiled = self._routes[self._index[id(route)]]
        if compiled.model_param and compiled.model_param in params:
            return params[compiled.model_param]
        if not route.models and not route.metered:
            return None
        if not body:
            raise PricingError("invalid_request", "request body must be JSON naming a model")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise PricingError("invalid_request", "request body is not JSON") from None
        model = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(model, str) or not model or len(model) > 200:
            raise PricingError("invalid_request", "request body must name a model")
        return model

    def catalog(self) -> list[dict]:
        """What is offered and at what price (GET /v1/models), free: OpenAI model objects (id,
        object, created, owned_by) with the route and its prices as extra fields, one per route
        and model ("*": any other model on that route)."""
        out = []
        for route in self.settings.routes:
            if route.metered:
                for model, tp in route.token_prices.items():
                    out.append(self._model_object(route, model) | {
                        "schemes": route.schemes,
                        "per_token": {"currency": self.settings.quote.currency, "input": tp.input, "output": tp.output,
                                      "per_call": tp.per_call},
                        "max_per_call": f"{route.max_per_call} {self.settings.quote.currency}",
                    })
                continue
            prices = dict(route.models)
            if route.price is not None:
                prices.setdefault("*", route.price)
            for model, price in prices.items():
                out.append(self._model_object(route, model) | {
                    "price": [
                        {"amount": str(amount_of(parse_price(price), o)), "display": f"{price} {o.symbol}",
                         "asset": o.asset, "network": o.network, "scheme": o.scheme}
                        for o in self.settings.accepts
                    ],
                })
        return out

    def _model_object(self, route: Route, model: str) -> dict:
        return {"id": model, "object": "model", "created": self.created, "owned_by": route.upstream,
                "route": f"{route.method} {route.path}", "model": model}

