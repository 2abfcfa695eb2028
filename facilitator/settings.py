"""Facilitator settings: a TOML file, environment overrides, or a dev chain description.

Secrets (signer keys, RPC URLs with API keys) may be written as "$VAR" / "${VAR}" in the file
and are resolved from the environment at load time; they are SecretStr so they never print.

Environment overrides (all optional):
  FACILITATOR_CONFIG_FILE   path of the TOML file (same as --config)
  FACILITATOR_SIGNER_KEYS   comma-separated private keys (replaces signer_keys)
  FACILITATOR_STORE_URL     redis://… or sqlite:///path or memory://
  FACILITATOR_STORE_PREFIX  key prefix in Redis (default "x402:")
  FACILITATOR_RECEIPT_TIMEOUT_S, FACILITATOR_RECONCILE_INTERVAL_S
  FACILITATOR_HOST / FACILITATOR_PORT
  FACILITATOR_RPC_URL_<CHAINID>   RPC URL of one network, e.g. FACILITATOR_RPC_URL_8453
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

_ENV_REF = re.compile(r"^\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?$")


def resolve_env(value: str, env: Mapping[str, str]) -> str:
    match = _ENV_REF.match(value.strip())
    if not match:
        return value
    name = match.group(1)
    if name not in env:
        raise ValueError(f"environment variable {name} is referenced but not set")
    return env[name]


class TokenSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$")
    symbol: str
    decimals: int = Field(ge=0, le=36)
    transfer_method: Literal["permit2", "eip3009"]
    eip712_name: str
    eip712_version: str


class NetworkSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    network: str = Field(pattern=r"^eip155:[0-9]+$")
    rpc_url: SecretStr
    permit2: str = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
    exact_proxy: str = "0x402085c248EeA27D92E8b30b2C58ed07f9E20001"
    upto_proxy: str = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
    tokens: list[TokenSettings] = Field(default_factory=list)

    @property
    def chain_id(self) -> int:
        return int(self.network.split(":")[1])


class FacilitatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(default=4020, ge=0, le=65535)
    store_url: str = "sqlite://.x402-state/facilitator.sqlite3"
    store_prefix: str = "x402:"
    signer_keys: list[SecretStr] = Field(default_factory=list)
    networks: list[NetworkSettings] = Field(default_factory=list)
    receipt_timeout_s: float = Field(default=20.0, gt=0, le=600)
    reconcile_interval_s: float = Field(default=5.0, gt=0)
    # How long a settler owns a payment it claimed before its transaction is recorded; a crashed
    # settler's claim is taken over after it. Recording takes milliseconds: a few seconds suffice
    # even with a slow node; shorter leases only make a crash's payments answer sooner.
    claim_lease_s: float = Field(default=60.0, ge=5, le=600)
    # How often new blocks are scanned to keep verify's state cache honest; 0 turns the cache off
    # (every verify reads the chain). facilitator/evm/statecache.py.
    state_poll_s: float = Field(default=0.25, ge=0, le=10)
    max_body_bytes: int = Field(default=64 * 1024, gt=1024)
    log_level: str = "info"
    shutdown_grace_s: float = Field(default=60.0, gt=0, description="in-flight settlements finish within this")

    @field_validator("signer_keys")
    @classmethod
    def _keys_look_like_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for k in keys:
            if not re.fullmatch(r"(0x)?[0-9a-fA-F]{64}", k.get_secret_value()):
                raise ValueError("a signer key is not 32 bytes of hex")  # never echo the value
        return keys


def _resolve(data: dict, env: Mapping[str, str]) -> dict:
    data = dict(data)
    if "signer_keys" in data:
        data["signer_keys"] = [resolve_env(k, env) for k in data["signer_keys"]]
    nets = []
    for net in data.get("networks", []):
        net = dict(net)
        if "rpc_url" in net:
            net["rpc_url"] = resolve_env(net["rpc_url"], env)
        nets.append(net)
    if nets:
        data["networks"] = nets
    return data


def devchain_overlay(description: dict) -> dict:
    """Networks, tokens and signer keys from a `x402-facilitator devchain --out FILE` file."""
    return {
        "signer_keys": [a["private_key"] for a in description["accounts"]["facilitator"]],
        "networks": [
            {
                "network": description["network"],
                "rpc_url": description["rpc_url"],
                "permit2": description["contracts"]["permit2"],
                "exact_proxy": description["contracts"]["exact_proxy"],
                "upto_proxy": description["contracts"]["upto_proxy"],
                "tokens": [
                    {
                        "address": t["address"],
                        "symbol": symbol,
                        "decimals": t["decimals"],
                        "transfer_method": t["transfer_method"],
                        "eip712_name": t["eip712_name"],
                        "eip712_version": t["eip712_version"],
                    }
                    for symbol, t in description["tokens"].items()
                ],
            }
        ],
    }


def load_settings(
    config_file: str | None = None,
    *,
    devchain_file: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: dict | None = None,
) -> FacilitatorSettings:
    env = os.environ if env is None else env
    data: dict = {}
    path = config_file or env.get("FACILITATOR_CONFIG_FILE")
    if path:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    if devchain_file:
        with open(devchain_file) as fh:
            data.update(devchain_overlay(json.load(fh)))
    data = _resolve(data, env)
    if keys := env.get("FACILITATOR_SIGNER_KEYS"):
        data["signer_keys"] = [k.strip() for k in keys.split(",") if k.strip()]
    if url := env.get("FACILITATOR_STORE_URL"):
        data["store_url"] = url
    if prefix := env.get("FACILITATOR_STORE_PREFIX"):
        data["store_prefix"] = prefix
    if timeout := env.get("FACILITATOR_RECEIPT_TIMEOUT_S"):
        data["receipt_timeout_s"] = float(timeout)
    if grace := env.get("FACILITATOR_SHUTDOWN_GRACE_S"):
        data["shutdown_grace_s"] = float(grace)
    if poll := env.get("FACILITATOR_STATE_POLL_S"):
        data["state_poll_s"] = float(poll)
    if lease := env.get("FACILITATOR_CLAIM_LEASE_S"):
        data["claim_lease_s"] = float(lease)
    if interval := env.get("FACILITATOR_RECONCILE_INTERVAL_S"):
        data["reconcile_interval_s"] = float(interval)
    if host := env.get("FACILITATOR_HOST"):
        data["host"] = host
    if port := env.get("FACILITATOR_PORT"):
        data["port"] = int(port)
    for net in data.get("networks", []):
        chain_id = net.get("network", ":").split(":")[-1]
        if url := env.get(f"FACILITATOR_RPC_URL_{chain_id}"):
            net["rpc_url"] = url
    data.update(overrides or {})
    return FacilitatorSettings.model_validate(data)
