"""OpenGradient's SDK (`opengradient` on PyPI) against our gateway, unchanged (issue 9 §5).

The SDK runs in its own virtualenv (scripts/og-venv.sh: its `og-x402` installs a module named
`x402` that clashes with the official client) as a subprocess (tests/og_driver.py). It pays only on
Base (eip155:8453) and hard-codes OPG's Base address, so the gateway runs on a dev chain started
with chain id 8453, where the OPG stand-in sits at that address; the SDK's RPC is pointed there.

On metered routes (upto, per-token prices), without and with upto sessions (the SDK resends
`X-Upto-Session` by itself): the SDK approves Permit2 with `ensure_opg_approval`, then makes plain
and streamed chat calls. Each call reaches the provider once and is paid once: one transfer per call
without sessions, one transfer for the session's sum with them; balances move by exactly that.
Streams reach the SDK without the usage the gateway asked for (it failed on `"usage": null` and
then paid a second time).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.devchain import DevChain, calldata, write_description
from devtools.rpc import BlockingRpc
from tests.budget_helpers import derived, opg_balance
from tests.gateway_client import CHAT, Processes, upstream_stats
from tests.payments import send_transactions
from tests.upto_helpers import SIGNED_MAX_OPG, cost_opg, replica_env, transfers_to, upto_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MODEL = "openai/gpt-4.1-mini"  # priced by the metered dev configuration's "*" entry
OPG_UNITS = 10**18


@pytest.fixture(scope="module")
def og_python() -> str:
    """.venv-og's python, built on first use; the module is skipped when it cannot be built."""
    try:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "og-venv.sh")], capture_output=True, text=True,
                              timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("OpenGradient's SDK virtualenv: pip did not finish in 15 minutes (no package index?)")
    if proc.returncode != 0:
        pytest.skip(f"OpenGradient's SDK virtualenv could not be built (no package index?): {proc.stderr[-800:]}")
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def base_chain(tmp_path_factory: pytest.TempPathFactory):
    """A dev chain of its own on Base's chain id: (description, description file)."""
    chain = DevChain(chain_id=8453, agents=0, facilitators=2)
    chain.start()
    try:
        path = tmp_path_factory.mktemp("og-chain") / "devchain.json"
        write_description(chain.description, path)
        yield chain.description, str(path)
    finally:
        chain.stop()


@pytest.fixture(scope="module")
def stack(base_chain: tuple[dict, str], redis_server: Any, tmp_path_factory: pytest.TempPathFactory):
    """The stand-in provider and two metered gateways on the Base dev chain, each paying its own
    payee: "plain" (no sessions) and "sessions" (settled after 2 s idle)."""
    devchain, devchain_file = base_chain
    tmp = tmp_path_factory.mktemp("og-stack")
    procs = Processes(devchain_file, tmp)
    try:
        upstream = procs.upstream()
        gateways = {}
        for name, sessions in (("plain", None), ("sessions", {"idle_s": 2.0})):
            prefix = f"og-{name}-{time.time_ns()}:"
            payee = derived(f"og:payee:{prefix}").address
            config = upto_config(tmp / f"{name}.json", devchain, devchain_file, upstream.url, redis_server.url,
                                 pay_to=payee, sessions=sessions)
            gateway = procs.gateway(upstream.url, redis_server.url, config=config, env=replica_env(prefix, None))
            gateways[name] = {"gateway": gateway, "payee": payee}
        yield {"upstream": upstream, **gateways}
    finally:
        procs.stop_all()


def new_payer(devchain: dict, label: str) -> Any:
    """ETH and 1,000 OPG, and no Permit2 approval: the SDK's ensure_opg_approval gives it."""
    account = derived(f"og:payer:{label}:{time.time_ns()}")
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        rpc.call("anvil_setBalance", account.address, hex(10**21))
    finally:
        rpc.close()
    opg = devchain["tokens"]["OPG"]["address"]
    send_transactions(devchain, [(account, opg, calldata("mint(address,uint256)", ["address", "uint256"],
                                                         [account.address, 1000 * OPG_UNITS]))])
    return account


def run_sdk(og_python: str, devchain: dict, gateway_url: str, account: Any, calls: list[str]) -> list[dict]:
    env = dict(os.environ) | {"BASE_MAINNET_RPC": devchain["rpc_url"]}
    proc = subprocess.run([og_python, str(ROOT / "tests" / "og_driver.py"), gateway_url,
                           "0x" + bytes(account.key).hex(), MODEL, *calls],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT / "tests")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [s["step"] for s in steps] == ["approval", *calls], steps
    approval = steps[0]
    assert approval["before"] == 0 and approval["after"] == 20 * OPG_UNITS and approval["tx"], approval
    return steps[1:]


def chat_calls(upstream: Any) -> int:
    return upstream_stats(upstream)["by_path"].get(CHAT, 0)


def check_calls(steps: list[dict]) -> int:
    """Every call answered in full; streams without usage. Returns what one call costs, from the
    usage a plain call reported (every call sends the same prompt and gets the same answer)."""
    plain = [s for s in steps if s["step"] == "chat"]
    assert plain and plain[0]["usage"] and plain[0]["content"], steps
    for s in steps:
        assert s["content"] == plain[0]["content"], steps
        if s["step"] == "stream":
            assert s["final"] and s["usage"] is None and s["chunks"] > 1, s
        else:
            assert s["usage"] == plain[0]["usage"] and s["finish_reason"] == "stop", s
    cost = cost_opg(MODEL.split("/")[1], plain[0]["usage"])
    assert 0 < cost < SIGNED_MAX_OPG
    return cost


def test_plain_and_streamed_calls_are_each_paid_once(og_python: str, base_chain: tuple[dict, str],
                                                     stack: dict) -> None:
    devchain, _ = base_chain
    gw, payee = stack["plain"]["gateway"], stack["plain"]["payee"]
    payer = new_payer(devchain, "plain")
    before, forwarded = (opg_balance(devchain, payer.address), opg_balance(devchain, payee)), chat_calls(stack["upstream"])
    calls = ["chat", "stream", "stream", "chat"]

    steps = run_sdk(og_python, devchain, gw.url, payer, calls)

    cost = check_calls(steps)
    assert chat_calls(stack["upstream"]) - forwarded == len(calls)  # no call was sent twice
    transfers = transfers_to(devchain, payee)
    assert [(t["from"].lower(), t["amount"]) for t in transfers] == [(payer.address.lower(), cost)] * len(calls)
    assert before[0] - opg_balance(devchain, payer.address) == len(calls) * cost
    assert opg_balance(devchain, payee) - before[1] == len(calls) * cost


def test_calls_under_an_upto_session_are_settled_once_for_their_sum(og_python: str, base_chain: tuple[dict, str],
                                                                    stack: dict) -> None:
    devchain, _ = base_chain
    gw, payee = stack["sessions"]["gateway"], stack["sessions"]["payee"]
    payer = new_payer(devchain, "sessions")
    before, forwarded = (opg_balance(devchain, payer.address), opg_balance(devchain, payee)), chat_calls(stack["upstream"])
    calls = ["chat", "stream", "chat", "stream", "stream"]

    steps = run_sdk(og_python, devchain, gw.url, payer, calls)

    cost = check_calls(steps)
    assert chat_calls(stack["upstream"]) - forwarded == len(calls)
    deadline = time.monotonic() + 30  # the reaper settles the session once it has been idle for 2 s
    while not (transfers := transfers_to(devchain, payee)) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a second (wrong) settlement would land by now
    transfers = transfers_to(devchain, payee)
    assert [(t["from"].lower(), t["amount"]) for t in transfers] == [(payer.address.lower(), len(calls) * cost)]
    assert before[0] - opg_balance(devchain, payer.address) == len(calls) * cost
    assert opg_balance(devchain, payee) - before[1] == len(calls) * cost
