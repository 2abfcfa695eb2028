"""Gateway settings: where the payment-identifier extension is declared."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from gateway.settings import GatewaySettings, load_gateway_settings

BASE = {
    "pay_to": "0x" + "11" * 20,
    "accepts": [{"network": "eip155:8453", "asset": "0x" + "22" * 20, "symbol": "OPG", "decimals": 18,
                 "transfer_method": "permit2", "eip712_name": "OpenGradient", "eip712_version": "1"}],
    "upstreams": {"llm": {"urls": ["http://127.0.0.1:1"]}},
    "routes": [{"path": "/a", "upstream": "llm", "price": "0.01"},
               {"path": "/b", "upstream": "llm", "price": "0.01", "payment_identifier": True},
               {"path": "/c", "upstream": "llm", "price": "0.01", "payment_identifier": False}],
}


def test_payment_identifier_is_off_unless_the_operator_turns_it_on() -> None:
    s = GatewaySettings.model_validate(BASE)
    assert [s.payment_identifier_on(r) for r in s.routes] == [False, True, False]
    s = GatewaySettings.model_validate(BASE | {"payment_identifier": True})
    assert [s.payment_identifier_on(r) for r in s.routes] == [True, True, False]  # a route may opt out


def test_payment_identifier_flags_are_strict_booleans() -> None:
    with pytest.raises(ValidationError):
        GatewaySettings.model_validate(BASE | {"payment_identifier": "yes"})
    with pytest.raises(ValidationError):
        GatewaySettings.model_validate(BASE | {"routes": [BASE["routes"][0] | {"payment_identifier": 1}]})


def test_the_environment_turns_it_on_with_true_or_false_only(tmp_path) -> None:
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(BASE))
    assert load_gateway_settings(str(path), env={"GATEWAY_PAYMENT_IDENTIFIER": "true"}).payment_identifier is True
    assert load_gateway_settings(str(path), env={"GATEWAY_PAYMENT_IDENTIFIER": "0"}).payment_identifier is False
    with pytest.raises(ValueError, match="true or false"):
        load_gateway_settings(str(path), env={"GATEWAY_PAYMENT_IDENTIFIER": "yes"})


def test_tee_routes_offer_neither_sessions_nor_batch_channels() -> None:
    """Both serve before anything is settled per call; a tee answer is verified before it is charged."""
    tee = {"kind": "tee", "tee": {"registry": "0x" + "33" * 20, "rpc_url": "http://127.0.0.1:1"}}
    base = BASE | {"upstreams": {"llm": {"urls": ["http://127.0.0.1:1"]}, "enclaves": tee}}
    batch = {"path": "/t", "upstream": "enclaves", "price": "0.01",
             "batch": {"receiver_authorizer_key": "0x" + "44" * 32}}
    with pytest.raises(ValidationError, match="batch-settlement channels are not offered on tee"):
        GatewaySettings.model_validate(base | {"routes": [batch]})
    GatewaySettings.model_validate(base | {"routes": [batch | {"upstream": "llm"}]})
