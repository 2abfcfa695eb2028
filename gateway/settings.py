"""Gateway configuration: one TOML file validated by pydantic; secrets and URLs from the
environment ("$VAR" references, and GATEWAY_* overrides).

    pay_to = "0x…"                       # who receives payments
    store_url = "redis://redis:6379/0"   # payment records shared by replicas (default: embedded SQLite)
    public_url = "https://api.example.com"   # how agents reach us (resource URLs in 402s)

    [facilitator]
    mode = "local"                       # in-process facilitator (its settings: config_file or devchain)
    # mode = "remote"; url = "http://facilitator:4020"   # our service or any x402 facilitator

    [[accepts]]                          # payment options offered on every priced route
    network = "eip155:8453"
    asset = "0xFbC2…"                    # token address
    symbol = "OPG"
    decimals = 18
    transfer_method = "permit2"          # or "eip3009"
    eip712_name = "OpenGradient"
    eip712_version = "1"

    [upstreams.openai]
    urls = ["https://tee-1.example/", "https://tee-2.example/"]   # failover order
    auth_header = "Authorization"
    auth_value = "$OPENAI_AUTH"          # "Bearer sk-…" from the environment; never sent by agents

    [[routes]]
    method = "POST"
    path = "/v1/chat/completions"
    upstream = "openai"
    price = "0.01"                       # per call, in display units of each accepted asset
    [routes.models]                      # per-model prices (the body's "model"); "*" = any other
    "gpt-4o" = "0.02"

Environment: GATEWAY_CONFIG_FILE, GATEWAY_PAY_TO, GATEWAY_STORE_URL, GATEWAY_PUBLIC_URL,
GATEWAY_FACILITATOR_URL (switches to remote mode), GATEWAY_HOST, GATEWAY_PORT,
GATEWAY_UPSTREAM_<NAME>_URLS (comma-separated), GATEWAY_UPSTREAM_<NAME>_AUTH, GATEWAY_SETTLE_TIMEOUT_S,
GATEWAY_VERIFY_TIMEOUT_S, GATEWAY_RECORD_LEASE_S, GATEWAY_STORE_PREFIX, GATEWAY_LOG_LEVEL, GATEWAY_SHUTDOWN_GRACE_S,
GATEWAY_PAYMENT_IDENTIFIER (true/false: declare the payment-identifier extension; per route: routes.payment_identifier),
GATEWAY_CONSOLE (true/false: the operator's console), GATEWAY_CONSOLE_SESSION_S, GATEWAY_EXPLORER_TX_URL.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from budgets.settings import BudgetSettings
from facilitator.settings import resolve_env
from storage import is_redis_url

ADDRESS = r"^0x[0-9a-fA-F]{40}$"


Scheme = Literal["exact", "upto"]


def _exact_only() -> list[Scheme]:
    return ["exact"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PaymentOption(_Model):
    network: str = Field(pattern=r"^eip155:[0-9]+$")
    asset: str = Field(pattern=ADDRESS)
    symbol: str
    decimals: int = Field(ge=0, le=36)
    scheme: Literal["exact"] = "exact"
    transfer_method: Literal["permit2", "eip3009"]
    eip712_name: str
    eip712_version: str
    max_timeout_seconds: int = Field(default=300, ge=10, le=86400)
    pay_to: str | None = Field(default=None, pattern=ADDRESS)


class FacilitatorRef(_Model):
    mode: Literal["local", "remote"] = "local"
    url: str | None = None
    config_file: str | None = None  # local mode: the facilitator's own TOML
    devchain_file: str | None = None  # local mode: fill it from a devchain description
    timeout_s: float = Field(default=60.0, gt=0, le=600)  # above the gateway's settle_timeout_s
    auth_header: str | None = None
    auth_value: SecretStr | None = None

    @model_validator(mode="after")
    def _remote_needs_url(self) -> FacilitatorRef:
        if self.mode == "remote" and not self.url:
            raise ValueError("facilitator.mode = 'remote' needs facilitator.url")
        return self


class WorkerPoolSettings(_Model):
    """A pool of inference servers (kind = "workers"): who is in it, how calls are spread, when
    the gateway refuses before anyone pays. gateway/workers/ runs it."""

    protocol: Literal["openai", "kserve"] = "openai"  # vLLM/SGLang/TGI, or Open Inference Protocol (Triton, KServe)
    dns: str | None = None  # a headless Service: every A record is a worker (re-resolved every resolve_every_s)
    port: int = Field(default=8000, ge=1, le=65535)  # the workers' port when found by DNS
    scheme: Literal["http", "https"] = "http"
    hosts_file: str | None = None  # answer `dns` from this hosts-format file instead of the resolver
    resolve_every_s: float = Field(default=10.0, gt=0)
    probe_every_s: float = Field(default=2.0, gt=0)  # served models, readiness, queue gauge
    probe_timeout_s: float = Field(default=2.0, gt=0)
    models: list[str] = Field(default_factory=list)  # KServe without a repository index: probe these
    balance: Literal["least_request", "round_robin"] = "least_request"
    max_concurrency: int = Field(default=32, ge=1)  # calls in flight per worker
    max_queue: int = Field(default=32, ge=0)  # calls per model waiting in the gateway for a worker
    queue_timeout_s: float = Field(default=30.0, gt=0)
    retry_after_s: int = Field(default=1, ge=1)  # the 503's Retry-After
    eject_after: int = Field(default=3, ge=1)  # consecutive failures (connect error, 5xx, timeout)
    eject_base_s: float = Field(default=5.0, gt=0)  # doubled per ejection in a row, up to eject_max_s
    eject_max_s: float = Field(default=60.0, gt=0)


class TeeSettings(_Model):
    """Enclaves found in an OpenGradient-style TEE registry (kind = "tee"): gateway/tee/ runs them.
    Every answer's signature is checked before the call is settled (x402-protocol.md §7.5)."""

    registry: str = Field(pattern=ADDRESS)  # the TEERegistry contract
    rpc_url: str  # the registry's chain ("$VAR" allowed)
    tee_type: int = Field(default=0, ge=0, le=255)  # 0: LLM proxy
    refresh_s: float = Field(default=30.0, gt=0)  # re-read getActiveTEEs this often
    heartbeat_max_age_s: float = Field(default=1800.0, gt=0)  # older: skipped, whatever the registry says
    signature_max_age_s: float = Field(default=300.0, gt=0)  # a proof's tee_timestamp no older than this
    clock_skew_s: float = Field(default=30.0, ge=0)  # nor this far in the future
    eject_after: int = Field(default=3, ge=1)  # faults in a row (bad proof, wrong certificate, connect error)
    eject_s: float = Field(default=300.0, gt=0)  # out of rotation this long
    # An `exact` stream is paid before its content is served, but its proof is on the last frame:
    # "buffer" reads it whole, verifies, settles, then sends it; "refuse" answers 400.
    exact_streams: Literal["buffer", "refuse"] = "buffer"


class ProofAnchoring(_Model):
    """Proofs of inference from `tee` routes anchored on a settlement relay (OpenGradient's
    InferenceSettlementRelay ABI): Merkle batches per interval or size, individual ones as asked
    (X-SETTLEMENT-TYPE). gateway/tee/batcher.py runs it on whichever replica holds the lease."""

    relay: str = Field(pattern=ADDRESS)
    rpc_url: str  # the relay's chain ("$VAR" allowed)
    chain_id: int = Field(ge=1)
    signer_key: SecretStr  # pays the anchoring gas ("$VAR")
    interval_s: float = Field(default=10.0, gt=0)  # a batch at least this often (when items wait)
    max_batch: int = Field(default=256, ge=1)  # or as soon as this many wait
    lease_s: float = Field(default=30.0, gt=0)  # the batcher's lease in the shared store
    blob_dir: str = ".x402-state/proof-blobs"  # local blob store (content hash = blob id)


class Upstream(_Model):
    kind: Literal["urls", "workers", "tee"] = "urls"
    urls: list[str] = Field(default_factory=list)  # urls: failover order; workers: static members
    auth_header: str | None = None
    auth_value: SecretStr | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    timeout_s: float = Field(default=600.0, gt=0)  # long LLM calls
    workers: WorkerPoolSettings | None = None
    tee: TeeSettings | None = None

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for u in urls:
            if not re.match(r"^https?://", u):
                raise ValueError(f"upstream URL must be http(s): {u}")
        return [u.rstrip("/") for u in urls]

    @model_validator(mode="after")
    def _members(self) -> Upstream:
        if (self.kind == "tee") != (self.tee is not None):
            raise ValueError("kind = \"tee\" and [tee] settings go together")
        if self.kind == "tee":
            if self.urls:
                raise ValueError("a tee upstream's enclaves come from its registry, not urls")
            return self
        if self.kind == "workers":
            self.workers = self.workers or WorkerPoolSettings()
            if not self.urls and not self.workers.dns:
                raise ValueError("a workers upstream needs urls or workers.dns")
        elif not self.urls:
            raise ValueError("an upstream needs at least one URL")
        elif self.workers is not None:
            raise ValueError("[workers] settings need kind = \"workers\"")
        return self


def parse_price(value: str) -> Decimal:
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"price {value!r} is not a decimal number") from None
    if not price.is_finite() or price < 0:
        raise ValueError(f"price {value!r} must be a non-negative number")
    return price


class TokenPricing(_Model):
    """Quote-currency (USD) prices of one model: per input token, per output token, per call
    (images, searches and other flat parts)."""

    input: str
    output: str
    per_call: str = "0"

    @field_validator("input", "output", "per_call")
    @classmethod
    def _non_negative(cls, v: str) -> str:
        parse_price(v)
        return v


class Quote(_Model):
    """How quote-currency prices become asset amounts: the quote price of one whole token of each
    accepted asset, fixed here and/or refreshed from a feed (a JSON object {symbol: price})."""

    currency: str = "USD"
    rates: dict[str, str] = Field(default_factory=dict)
    feed_url: str | None = None
    refresh_s: float = Field(default=60.0, gt=0)
    max_age_s: float = Field(default=300.0, gt=0)  # older than this: refuse to quote

    @field_validator("rates")
    @classmethod
    def _positive(cls, v: dict[str, str]) -> dict[str, str]:
        for symbol, rate in v.items():
            if parse_price(rate) <= 0:
                raise ValueError(f"rate of {symbol} must be positive")
        return v


class UptoSessions(_Model):
    """One signed upto maximum (`cap`) covers many calls of a route (OpenGradient-compatible
    X-Upto-Session), settled once: when idle, when the cap is used, or before the deadline."""

    cap: str  # quote currency: the maximum a session's permit signs for
    idle_s: float = Field(default=100.0, gt=0)
    settle_margin_s: float = Field(default=120.0, gt=6, description="settle this long before the permit deadline")
    serve_margin_s: float = Field(default=420.0, gt=0, description="stop serving this long before the deadline")
    max_timeout_s: int = Field(default=3600, ge=60, le=86_400, description="the permit's lifetime (maxTimeoutSeconds)")
    # A session serves on a promise until it is settled: the most a payer's open sessions (all of
    # them, on every replica, per asset) may have accrued and held unsettled. Quote currency;
    # None: twice the cap (a used-up session settling while its successor serves). At the limit,
    # calls are refused and the payer's sessions settled.
    max_exposure: str | None = None

    def exposure_limit(self) -> Decimal:
        return parse_price(self.max_exposure) if self.max_exposure is not None else 2 * parse_price(self.cap)
    # Re-read each open session's payer balance, Permit2 allowance and permit nonce on every new
    # block (gateway/session_funds.py) and settle at once when they no longer cover it.
    watch_funds: bool = Field(default=True, strict=True)

    @model_validator(mode="after")
    def _margins(self) -> UptoSessions:
        if parse_price(self.cap) <= 0:
            raise ValueError("sessions.cap must be positive")
        if self.max_exposure is not None and parse_price(self.max_exposure) <= 0:
            raise ValueError("sessions.max_exposure must be positive")
        if self.serve_margin_s <= self.settle_margin_s:
            raise ValueError("sessions.serve_margin_s must exceed settle_margin_s (calls finish before settlement)")
        if self.max_timeout_s <= self.serve_margin_s:
            raise ValueError("sessions.max_timeout_s must exceed serve_margin_s")
        return self


class BatchChannels(_Model):
    """batch-settlement on this route: the agent escrows a deposit once (a payment channel) and
    pays each call with a cumulative voucher, verified locally; the gateway claims the vouchers
    in batches and sweeps them to payTo (gateway/batch/)."""

    # The key that signs claim batches and refunds (the channels' receiverAuthorizer), "$VAR" allowed.
    receiver_authorizer_key: SecretStr
    withdraw_delay_s: int = Field(default=86_400, ge=900, le=2_592_000, description="channels' withdrawDelay")
    min_deposit: str | None = None  # display units of the asset; default: 10 calls
    claim_interval_s: float = Field(default=60.0, gt=0)
    settle_interval_s: float = Field(default=120.0, gt=0)
    max_claims_per_batch: int = Field(default=100, ge=1, le=100)
    sync_interval_s: float = Field(default=30.0, gt=0, description="re-read channels on chain (withdrawals)")
    # A call's hold on its channel, renewed every third of it while the call runs: a replica
    # killed mid-call leaves the channel busy for at most this long.
    call_lease_s: float = Field(default=15.0, ge=1, description="a call's hold on its channel, if its replica died")
    manager_lease_s: float = Field(default=30.0, gt=0, description="a dead replica's manager is taken over after this")

    @field_validator("receiver_authorizer_key")
    @classmethod
    def _key(cls, v: SecretStr) -> SecretStr:
        raw = v.get_secret_value()
        if not (raw.startswith("0x") and len(raw) == 66):
            raise ValueError("batch.receiver_authorizer_key must be a 0x-prefixed 32-byte hex key")
        return v


class Route(_Model):
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    path: str = Field(pattern=r"^/")
    upstream: str
    price: str | None = None  # per call, display units; None: only the listed models are offered
    models: dict[str, str] = Field(default_factory=dict)
    description: str = ""
    mime_type: str = "application/json"
    # Metered routes (pay for what was used): per-model token prices in the quote currency.
    token_prices: dict[str, TokenPricing] = Field(default_factory=dict)  # "*" = any other model
    max_per_call: str | None = None  # quote currency: the upto ceiling, and the exact price
    max_tokens_cap: int | None = Field(default=None, ge=1)
    schemes: list[Scheme] = Field(default_factory=_exact_only, min_length=1)
    missing_usage: Literal["ceiling", "floor"] = "ceiling"  # usage missing or stream cut: charge the max, or only per_call
    sessions: UptoSessions | None = None  # upto sessions on this (metered) route
    batch: BatchChannels | None = None  # batch-settlement channels offered beside the schemes
    api: Literal["openai", "anthropic", "other"] = "openai"
    payment_identifier: bool | None = Field(default=None, strict=True)  # None: the gateway's setting

    @property
    def metered(self) -> bool:
        return bool(self.token_prices)

    @field_validator("price")
    @classmethod
    def _price(cls, v: str | None) -> str | None:
        if v is not None:
            parse_price(v)
        return v

    @field_validator("models")
    @classmethod
    def _model_prices(cls, v: dict[str, str]) -> dict[str, str]:
        for price in v.values():
            parse_price(price)
        return v

    @model_validator(mode="after")
    def _priced(self) -> Route:
        if self.metered:
            if self.max_per_call is None or parse_price(self.max_per_call) <= 0:
                raise ValueError(f"metered route {self.path} needs a positive max_per_call")
        elif self.price is None and not self.models:
            raise ValueError(f"route {self.method} {self.path} has neither price, models nor token_prices")
        elif "upto" in self.schemes:
            raise ValueError(f"route {self.path}: upto needs token_prices (pay for what was used)")
        return self


class GatewaySettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8402, ge=0, le=65535)
    pay_to: str = Field(pattern=ADDRESS)
    public_url: str | None = None
    store_url: str = "sqlite://.x402-state/gateway.sqlite3"
    store_prefix: str = "x402gw:"
    facilitator: FacilitatorRef = Field(default_factory=FacilitatorRef)
    accepts: list[PaymentOption] = Field(min_length=1)
    upstreams: dict[str, Upstream] = Field(min_length=1)
    routes: list[Route] = Field(min_length=1)
    settle_timeout_s: float = Field(default=45.0, gt=0)
    verify_timeout_s: float = Field(default=10.0, gt=0)
    record_lease_s: float = Field(default=6.0, ge=1, le=300)  # renewed every third while a request works on it
    # How often each replica looks for settlement intents left by a dead replica (gateway/paywall/recovery.py).
    recovery_interval_s: float = Field(default=2.0, gt=0, le=300)
    # network -> JSON-RPC URL the gateway reads the chain through (upto sessions' funds watch,
    # reconciliation); an in-process facilitator's own chains are used for networks not named here.
    rpc_urls: dict[str, str] = Field(default_factory=dict)
    funds_poll_s: float = Field(default=1.0, gt=0, le=60)  # how often the funds watch asks for a new block
    replay_cache_bytes: int = Field(default=1 << 20, ge=0)  # responses kept for idempotent replays
    max_body_bytes: int = Field(default=4 << 20, gt=0)
    log_level: str = "info"
    shutdown_grace_s: float = Field(default=60.0, gt=0, description="in-flight paid calls finish within this")
    budgets: BudgetSettings | None = None  # absent: no budgets are enforced
    proofs: ProofAnchoring | None = None  # absent: tee proofs are verified and passed on, not anchored
    quote: Quote = Field(default_factory=Quote)
    # Declare the payment-identifier extension in 402s (idempotent retries under a client's id).
    # Off by default, as in the reference server: a client that sees it declared needs `jsonschema`.
    payment_identifier: bool = Field(default=False, strict=True)
    # The operator's console under {budgets.admin_prefix}/console: on whenever the admin API is
    # (budgets configured and an admin token set), unless turned off here.
    console: bool = Field(default=True, strict=True)
    console_session_s: float = Field(default=8 * 3600.0, gt=0, le=7 * 86400, description="login lifetime")
    # Transaction links in the console: "{tx}" is replaced by the hash (e.g. https://basescan.org/tx/{tx}).
    explorer_tx_url: str | None = Field(default=None, pattern=r"^https?://[^\s\"'<>]*\{tx\}[^\s\"'<>]*$")

    def payment_identifier_on(self, route: Route) -> bool:
        return self.payment_identifier if route.payment_identifier is None else route.payment_identifier

    @model_validator(mode="after")
    def _routes_name_known_upstreams(self) -> GatewaySettings:
        for r in self.routes:
            if r.upstream not in self.upstreams:
                raise ValueError(f"route {r.method} {r.path} names unknown upstream {r.upstream!r}")
        for r in self.routes:
            if self.upstreams[r.upstream].kind == "tee" and r.sessions is not None:
                raise ValueError(f"route {r.path}: upto sessions are not offered on tee upstreams (each answer is"
                                 " verified before it is charged)")
            if self.upstreams[r.upstream].kind == "tee" and r.batch is not None:
                raise ValueError(f"route {r.path}: batch-settlement channels are not offered on tee upstreams (each"
                                 " answer is verified before it is charged; voucher calls are not)")
        for r in self.routes:
            if r.metered and not self.quote.feed_url:
                missing = [o.symbol for o in self.accepts if o.symbol not in self.quote.rates]
                if missing:
                    raise ValueError(f"metered route {r.path}: no quote rate for {', '.join(missing)}"
                                     " (quote.rates or quote.feed_url)")
        b = self.budgets
        if b is not None and b.enabled and b.lease_calls and not is_redis_url(b.store_url or self.store_url):
            raise ValueError("budgets.lease_calls needs budgets on Redis (budgets.store_url, or the gateway's"
                             " store_url, a redis:// URL): the embedded store has no leases")
        for opt in self.accepts:
            for r in self.routes:
                for price in [p for p in [r.price, *r.models.values()] if p is not None]:
                    amount = parse_price(price) * (Decimal(10) ** opt.decimals)
                    if amount != amount.to_integral_value():
                        raise ValueError(
                            f"price {price} of {r.path} is finer than {opt.symbol}'s {opt.decimals} decimals"
                        )
        return self


def _resolve_secrets(data: dict, env: Mapping[str, str]) -> dict:
    for up in data.get("upstreams", {}).values():
        if isinstance(up.get("auth_value"), str):
            up["auth_value"] = resolve_env(up["auth_value"], env)
        up["urls"] = [resolve_env(u, env) for u in up.get("urls", [])]
        if isinstance(up.get("tee"), dict) and isinstance(up["tee"].get("rpc_url"), str):
            up["tee"]["rpc_url"] = resolve_env(up["tee"]["rpc_url"], env)
    proofs = data.get("proofs")
    if isinstance(proofs, dict):
        for key in ("rpc_url", "signer_key"):
            if isinstance(proofs.get(key), str):
                proofs[key] = resolve_env(proofs[key], env)
    for route in data.get("routes", []):
        batch = route.get("batch") if isinstance(route, dict) else None
        if isinstance(batch, dict) and isinstance(batch.get("receiver_authorizer_key"), str):
            batch["receiver_authorizer_key"] = resolve_env(batch["receiver_authorizer_key"], env)
    fac = data.get("facilitator", {})
    if isinstance(fac.get("auth_value"), str):
        fac["auth_value"] = resolve_env(fac["auth_value"], env)
    if isinstance(fac.get("url"), str):
        fac["url"] = resolve_env(fac["url"], env)
    return data


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true"):
        return True
    if value.lower() in ("0", "false"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


_TUNABLES: dict[str, tuple[str, Callable[[str], object]]] = {
    "GATEWAY_SETTLE_TIMEOUT_S": ("settle_timeout_s", float),
    "GATEWAY_VERIFY_TIMEOUT_S": ("verify_timeout_s", float),
    "GATEWAY_RECORD_LEASE_S": ("record_lease_s", float),
    "GATEWAY_RECOVERY_INTERVAL_S": ("recovery_interval_s", float),
    "GATEWAY_STORE_PREFIX": ("store_prefix", str),
    "GATEWAY_LOG_LEVEL": ("log_level", str),
    "GATEWAY_SHUTDOWN_GRACE_S": ("shutdown_grace_s", float),
    "GATEWAY_PAYMENT_IDENTIFIER": ("payment_identifier", _flag),
    "GATEWAY_CONSOLE": ("console", _flag),
    "GATEWAY_CONSOLE_SESSION_S": ("console_session_s", float),
    "GATEWAY_EXPLORER_TX_URL": ("explorer_tx_url", str),
}


def env_tunables(env: Mapping[str, str]) -> dict:
    return {field: kind(env[name]) for name, (field, kind) in _TUNABLES.items() if env.get(name)}


def load_gateway_settings(
    config_file: str | None = None, *, env: Mapping[str, str] | None = None, overrides: dict | None = None
) -> GatewaySettings:
    env = os.environ if env is None else env
    data: dict = {}
    path = config_file or env.get("GATEWAY_CONFIG_FILE")
    if path:
        with open(path, "rb") as fh:
            data = json.load(fh) if path.endswith(".json") else tomllib.load(fh)
    data = _resolve_secrets(data, env)
    for key, name in (("pay_to", "PAY_TO"), ("store_url", "STORE_URL"), ("public_url", "PUBLIC_URL"), ("host", "HOST")):
        if value := env.get(f"GATEWAY_{name}"):
            data[key] = value
    if port := env.get("GATEWAY_PORT"):
        data["port"] = int(port)
    if url := env.get("GATEWAY_FACILITATOR_URL"):
        data.setdefault("facilitator", {}).update({"mode": "remote", "url": url})
    for name, up in data.get("upstreams", {}).items():
        if urls := env.get(f"GATEWAY_UPSTREAM_{name.upper()}_URLS"):
            up["urls"] = [u.strip() for u in urls.split(",") if u.strip()]
        if auth := env.get(f"GATEWAY_UPSTREAM_{name.upper()}_AUTH"):
            up["auth_value"] = auth
    data.update(env_tunables(env))
    for key, value in (overrides or {}).items():
        data[key] = value
    return GatewaySettings.model_validate(data)
