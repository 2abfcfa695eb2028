"""`serve --workers N` keeps secrets out of every process's environment: the workers load the
config themselves and resolve its "$VAR" references, so a signer key or a provider key is found in
/proc/PID/environ only under the variable the operator named, never copied under another."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from devtools.devconfig import dev_settings
from tests.conftest import _port
from tests.gateway_client import CHAT, CHAT_BODY, MALFORMED, call, get_json, malformed_answer, sign_for

pytestmark = pytest.mark.e2e

SIGNER_VAR = "X402_TEST_WORKERS_SIGNER_KEY"


def facilitator_toml(devchain: dict[str, Any], path: Path) -> str:
    """The dev chain's network as a facilitator config whose signer key is "$SIGNER_VAR"."""
    tokens = "".join(
        f'\n[[networks.tokens]]\naddress = "{t["address"]}"\nsymbol = "{symbol}"\ndecimals = {t["decimals"]}\n'
        f'transfer_method = "{t["transfer_method"]}"\neip712_name = "{t["eip712_name"]}"\n'
        f'eip712_version = "{t["eip712_version"]}"\n'
        for symbol, t in devchain["tokens"].items())
    c = devchain["contracts"]
    path.write_text(
        f'signer_keys = ["${SIGNER_VAR}"]\nstore_url = "memory://"\n\n[[networks]]\nnetwork = "{devchain["network"]}"\n'
        f'rpc_url = "{devchain["rpc_url"]}"\npermit2 = "{c["permit2"]}"\nexact_proxy = "{c["exact_proxy"]}"\n'
        f'upto_proxy = "{c["upto_proxy"]}"\n' + tokens)
    return str(path)


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as fh:
            for child in map(int, fh.read().split()):
                out += [child, *descendants(child)]
    return out


def workers(pid: int, n: int) -> list[int]:
    """The parent's uvicorn worker processes, once all `n` are there."""
    deadline = time.monotonic() + 30
    while True:
        found = []
        for child in descendants(pid):
            with open(f"/proc/{child}/cmdline", "rb") as fh:
                cmdline = fh.read()
            if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
                found.append(child)
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def environ(pid: int) -> list[tuple[str, str]]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        return [entry.partition("=")[::2] for entry in fh.read().decode("latin-1").split("\0") if entry]


def assert_no_leaks(parent: int, secrets: dict[str, set[str]]) -> None:
    """No environment entry of the parent or its workers holds a secret (hex or text, any case)
    under another name than the operator's variables for it (`secrets`: value -> names)."""
    procs = workers(parent, 2)
    assert len(procs) >= 2, f"expected 2 workers under {parent}, found {procs}"
    for pid in [parent, *procs]:
        env = environ(pid)
        leaked = [name for secret, names in secrets.items()
                  for name, value in env if secret.lower() in f"{name}={value}".lower() and name not in names]
        assert leaked == [], f"pid {pid} ({'parent' if pid == parent else 'worker'}): secrets under {leaked}"
        # The check can see a secret: the operator's own variables are there, inherited.
        assert all(any(secret.lower() in v.lower() for n, v in env if n in names) for secret, names in secrets.items())


def test_facilitator_workers_resolve_the_signer_key_themselves(devchain: dict, tmp_path: Path, spawn: Any) -> None:
    signer = devchain["accounts"]["facilitator"][2]
    key = signer["private_key"].removeprefix("0x")
    config = facilitator_toml(devchain, tmp_path / "facilitator.toml")
    port = _port()
    service = spawn([sys.executable, "-m", "facilitator.cli", "serve", "--config", config, "--port", str(port),
                     "--workers", "2"], port, {SIGNER_VAR: signer["private_key"]})
    assert_no_leaks(service.proc.pid, {key: {SIGNER_VAR}})
    for _ in range(4):  # whichever worker answers signs with the key from $SIGNER_VAR
        supported = get_json(service.url + "/supported")
        assert supported["signers"]["eip155:*"] == [Account.from_key(signer["private_key"]).address]
    for request in MALFORMED:  # the workers' uvicorn protocol refuses in JSON too
        status, doc = malformed_answer(service.url, request)
        assert status == 400 and doc["error"] == "invalid_request", doc


async def test_gateway_workers_resolve_secrets_themselves(devchain: dict, tmp_path: Path, spawn: Any) -> None:
    signer = devchain["accounts"]["facilitator"][2]
    upstream_key = "sk-" + uuid.uuid4().hex
    up_port = _port()
    upstream = spawn([sys.executable, "-m", "gateway.cli", "upstream", "--port", str(up_port),
                      "--require-auth", upstream_key], up_port)
    doc = dev_settings(devchain, devchain_file=None, upstream_urls=[upstream.url], upstream_auth="x").model_dump(mode="json")
    doc["store_url"] = "memory://"
    doc["facilitator"] = {"mode": "local", "config_file": facilitator_toml(devchain, tmp_path / "facilitator.toml")}
    for name, up in doc["upstreams"].items():
        up["auth_value"] = "$X402_TEST_WORKERS_ANTHROPIC_KEY" if name == "anthropic" else "$X402_TEST_WORKERS_AUTH"
    config = tmp_path / "gateway.json"
    config.write_text(json.dumps(doc))
    port = _port()
    env = {SIGNER_VAR: signer["private_key"], "X402_TEST_WORKERS_AUTH": f"Bearer {upstream_key}",
           "X402_TEST_WORKERS_ANTHROPIC_KEY": upstream_key, "FACILITATOR_STORE_URL": "memory://"}
    gateway = spawn([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port),
                     "--workers", "2"], port, env)
    assert_no_leaks(gateway.proc.pid, {signer["private_key"].removeprefix("0x"): {SIGNER_VAR},
                                       upstream_key: {"X402_TEST_WORKERS_AUTH", "X402_TEST_WORKERS_ANTHROPIC_KEY"}})
    # A paid call: the worker resolved the upstream's key and the in-process facilitator's signer.
    payment = await sign_for(devchain, gateway.url + CHAT, CHAT_BODY, agent=3)
    r = await call(gateway.url + CHAT, CHAT_BODY, payment=payment)
    assert r.status == 200 and r.settle is not None and r.settle.success, r
    assert r.json()["choices"][0]["message"]["content"].startswith("Echo:")
    for request in MALFORMED:
        status, doc = malformed_answer(gateway.url, request)
        assert status == 400 and doc["error"] == "invalid_request", doc
