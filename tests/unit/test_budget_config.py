"""Budget policies in the gateway's config file (TOML or JSON) are read strictly: an amount is a
whole number or a string of digits, a flag is a boolean. Anything else stops the gateway at start
with the field named, instead of a budget nobody wrote ("1_000" read as 1000, true as 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.settings import load_gateway_settings

ASSET = "0x" + "11" * 20
AGENT = "0x" + "a1" * 20

TOML_HEAD = f"""
pay_to = "0x{"22" * 20}"

[[accepts]]
network = "eip155:84532"
asset = "{ASSET}"
symbol = "OPG"
decimals = 18
transfer_method = "permit2"
eip712_name = "OpenGradient"
eip712_version = "1"

[upstreams.llm]
urls = ["http://127.0.0.1:9"]

[[routes]]
path = "/v1/chat/completions"
upstream = "llm"
price = "0.01"

[budgets]
store_url = "memory://"

[[budgets.policies]]
agent = "{AGENT}"
network = "eip155:84532"
asset = "{ASSET}"
"""


def _toml(tmp_path: Path, policy_lines: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(TOML_HEAD + policy_lines)
    return str(path)


def _json(tmp_path: Path, policy: dict) -> str:
    import tomllib

    doc = tomllib.loads(TOML_HEAD)
    doc["budgets"]["policies"][0] |= policy
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.mark.parametrize("lines,loc", [
    ('limits = [{ period = "day", amount = "1_000" }]', "amount"),
    ('limits = [{ period = "day", amount = true }]', "amount"),
    ('limits = [{ period = "day", amount = " 5" }]', "amount"),
    ('limits = [{ period = "day", amount = "1e3" }]', "amount"),
    ('limits = [{ period = "day", amount = 1.0 }]', "amount"),
    ('limits = [{ period = "day", amount = "5", rolling = "yes" }]', "rolling"),
    ('per_call_max = "+5"', "per_call_max"),
    ('per_call_max = false', "per_call_max"),
    ('suspended = "no"', "suspended"),
    ('rate_limit = { per_minute = "60" }', "per_minute"),
])  # fmt: skip
def test_toml_policies_are_strict(tmp_path: Path, lines: str, loc: str) -> None:
    with pytest.raises(ValidationError) as refused:
        load_gateway_settings(_toml(tmp_path, lines), env={})
    assert [e["loc"][-1] for e in refused.value.errors()] == [loc]


@pytest.mark.parametrize("policy,loc", [
    ({"limits": [{"period": "day", "amount": "1_000"}]}, "amount"),
    ({"limits": [{"period": "day", "amount": True}]}, "amount"),
    ({"limits": [{"period": "day", "amount": "5", "rolling": "yes"}]}, "rolling"),
    ({"suspended": "no"}, "suspended"),
    ({"per_call_max": "1" * 79}, "per_call_max"),
])  # fmt: skip
def test_json_policies_are_strict(tmp_path: Path, policy: dict, loc: str) -> None:
    with pytest.raises(ValidationError) as refused:
        load_gateway_settings(_json(tmp_path, policy), env={})
    assert [e["loc"][-1] for e in refused.value.errors()] == [loc]


def test_digit_strings_and_whole_numbers_are_amounts(tmp_path: Path) -> None:
    lines = ('limits = [{ period = "day", amount = "5000000000000000000000" }, { period = "hour", amount = 7,'
             ' rolling = true }]\nper_call_max = "0012"\nsuspended = false\nrate_limit = { per_minute = 60 }')
    settings = load_gateway_settings(_toml(tmp_path, lines), env={})
    assert settings.budgets is not None
    policy = settings.budgets.policies[0].policy()
    assert [(lim.period, lim.amount, lim.rolling) for lim in policy.limits] == [
        ("day", 5 * 10**21, False), ("hour", 7, True)]
    assert policy.per_call_max == 12 and policy.suspended is False



@pytest.mark.parametrize("store,ok", [('store_url = "memory://"', False), ('store_url = "sqlite://b.sqlite3"', False),
                                      ('store_url = "redis://127.0.0.1:6379/0"', True)])
def test_budget_leases_need_budgets_on_redis(tmp_path: Path, store: str, ok: bool) -> None:
    """lease_calls on the embedded store is a configuration error when the file is read, not a
    crash when the gateway starts."""
    path = tmp_path / "gateway.toml"
    path.write_text(TOML_HEAD.replace('store_url = "memory://"', store + "\nlease_calls = 8"))
    if ok:
        assert load_gateway_settings(str(path), env={}).budgets.lease_calls == 8  # type: ignore[union-attr]
    else:
        with pytest.raises(ValueError, match="lease_calls needs budgets on Redis"):
            load_gateway_settings(str(path), env={})
