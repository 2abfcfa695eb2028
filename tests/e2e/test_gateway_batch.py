"""batch-settlement through two gateway replicas sharing Redis (issue 11), with real processes,
real Redis and the dev chain.

- The official client's `BatchSettlementEvmScheme` (unchanged; ERC-3009 via USDC, Permit2 via
  OPG) pays many calls through one deposit, alternating replicas; after the managers' claims and
  settle, payTo's balance rose by exactly the sum charged, and the client's cooperative refund
  returns exactly the rest.
- Hostile vouchers are refused and never served: at or below the last one, above the deposit,
  signed by another key, for another channel, replayed on the other replica, racing itself on
  both replicas. A payer who starts a timed withdrawal stops being served and is claimed at once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from x402 import x402Client
from x402.http.clients.httpx import x402HttpxClient
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.client.config import (
    BatchSettlementDepositPolicy,
    BatchSettlementEvmSchemeOptions,
)
from x402.mechanisms.evm.batch_settlement.client.refund import RefundOptions, _RefundResponse
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
from x402.mechanisms.evm.signers import EthAccountSigner, EthAccountSignerWithRPC

from devtools.devchain import calldata
from devtools.rpc import BlockingRpc
from tests.gateway_client import CHAT, CHAT_BODY, Processes, encode_payment
from tests.payments import balance_of, send_transactions

pytestmark = pytest.mark.e2e

MAX_UINT256 = 2**256 - 1
PRICE = {"OPG": 5 * 10**15, "USDC": 5_000}  # gpt-4o-mini: 0.005
SEED = f"x402-batch-e2e:{uuid.uuid4().hex[:8]}"


def derived(label: str) -> LocalAccount:
    return Account.from_key(keccak(text=f"{SEED}:{label}"))


AUTHORIZER = derived("receiver-authorizer")


def fund(devchain: dict[str, Any], *accounts: LocalAccount) -> None:
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        rpc.batch([("anvil_setBalance", [a.address, hex(10**21)]) for a in accounts])
    finally:
        rpc.close()
    txs = []
    for a in accounts:
        for symbol, token in devchain["tokens"].items():
            amount = 10**21 if symbol == "OPG" else 10**9
            txs.append((a, token["address"], calldata("mint(address,uint256)", ["address", "uint256"], [a.address, amount])))
            txs.append((a, token["address"], calldata("approve(address,uint256)", ["address", "uint256"],
                                                      [devchain["contracts"]["permit2"], MAX_UINT256])))
    send_transactions(devchain, txs)


def batch_config(path: Path, devchain: dict[str, Any], devchain_file: str, upstream_url: str, store_url: str,
                 pay_to: str) -> str:
    from devtools.devconfig import dev_settings
    from gateway.settings import load_gateway_settings

    doc = dev_settings(devchain, devchain_file=devchain_file, upstream_urls=[upstream_url], upstream_auth="sk-upstream",
                       store_url=store_url).model_dump(mode="json", exclude_none=True)
    for name, up in doc["upstreams"].items():
        up["auth_value"] = "sk-upstream" if name == "anthropic" else "Bearer sk-upstream"
    doc["pay_to"] = pay_to
    batch = {"receiver_authorizer_key": "0x" + bytes(AUTHORIZER.key).hex(), "withdraw_delay_s": 900,
             "min_deposit": "0.05", "claim_interval_s": 1.0, "settle_interval_s": 1.0, "sync_interval_s": 0.5,
             "call_lease_s": 30}
    doc["routes"][0]["batch"] = batch
    # completions: metered (per token, at most max_per_call a call), paid by vouchers too
    completions = doc["routes"][1]
    completions.pop("price")
    completions |= {"token_prices": {"*": {"input": "0.000001", "output": "0.000002", "per_call": "0.0001"}},
                    "max_per_call": "0.01", "max_tokens_cap": 512, "schemes": ["exact"], "batch": batch}
    path.write_text(json.dumps(doc, indent=1))
    load_gateway_settings(str(path), env={})
    return str(path)


@pytest.fixture(scope="module")
def stack(devchain_file: str, redis_server: Any, devchain: dict, tmp_path_factory: pytest.TempPathFactory):
    procs = Processes(devchain_file, tmp_path_factory.mktemp("batch"))
    payee = derived("payee").address
    try:
        upstream = procs.upstream()
        config = batch_config(procs.log_dir / "batch.json", devchain, devchain_file, upstream.url, redis_server.url,
                              payee)
        prefix = f"batch:{uuid.uuid4().hex[:8]}:"
        keys = [a["private_key"] for a in devchain["accounts"]["facilitator"]]
        env = {"GATEWAY_STORE_PREFIX": prefix + "gw:", "FACILITATOR_STORE_PREFIX": prefix + "fac:"}
        replicas = [procs.gateway(upstream.url, redis_server.url, config=config,
                                  env=env | {"FACILITATOR_SIGNER_KEYS": keys[i]}) for i in range(2)]
        yield {"replicas": replicas, "payee": payee, "procs": procs, "config": config, "upstream": upstream.url,
               "store": redis_server.url, "env": env | {"FACILITATOR_SIGNER_KEYS": keys[2 % len(keys)]}}
    finally:
        procs.stop_all()


def official_client(payer: LocalAccount, asset: str, deposit_multiplier: int = 10,
                    rpc_url: str | None = None) -> tuple[x402Client, Any]:
    """`rpc_url`: the client can read the chain (the SDK needs it to adopt a corrective 402's state)."""
    signer = EthAccountSignerWithRPC(payer, rpc_url=rpc_url) if rpc_url else payer
    scheme = BatchSettlementEvmScheme(signer, BatchSettlementEvmSchemeOptions(
        deposit_policy=BatchSettlementDepositPolicy(deposit_multiplier=deposit_multiplier)))
    client = x402Client()
    client.register("eip155:84532", scheme)
    client.set_spend_controls(False)  # the dev tokens are not in the SDK's default-asset table
    client.register_policy(lambda version, reqs: [r for r in reqs if r.asset.lower() == asset.lower()
                                                  and r.scheme == "batch-settlement"])
    return client, scheme


def decoded(header: str) -> dict[str, Any]:
    return json.loads(base64.b64decode(header))


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def channel_state(devchain: dict[str, Any], channel_id: str) -> tuple[int, int]:
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        data = "0x" + calldata("channels(bytes32)", ["bytes32"], [bytes.fromhex(channel_id[2:])]).hex()
        out = rpc.call("eth_call", {"to": devchain["contracts"]["batch_settlement"], "data": data}, "latest")
    finally:
        rpc.close()
    return int(out[2:66], 16), int(out[66:130], 16)


@pytest.mark.parametrize("symbol", ["USDC", "OPG"])
async def test_official_client_pays_many_calls_through_one_deposit(stack: Any, devchain: dict, symbol: str) -> None:
    payer = derived(f"payer-{symbol}")
    fund(devchain, payer)
    asset = devchain["tokens"][symbol]["address"]
    client, scheme = official_client(payer, asset)
    payer_before = balance_of(devchain, symbol, payer.address)
    payee_before = balance_of(devchain, symbol, stack["payee"])
    calls, deposits = 6, set()
    for i in range(calls):
        replica = stack["replicas"][i % 2]
        async with x402HttpxClient(client, timeout=30) as http:
            r = await http.post(replica.url + CHAT, json=CHAT_BODY)
        assert r.status_code == 200, r.text
        receipt = decoded(r.headers["PAYMENT-RESPONSE"])
        assert receipt["success"] and receipt["extra"]["chargedAmount"] == str(PRICE[symbol])
        assert receipt["extra"]["channelState"]["chargedCumulativeAmount"] == str((i + 1) * PRICE[symbol])
        if receipt["transaction"]:
            deposits.add(receipt["transaction"])
    assert len(deposits) == 1  # one deposit paid for every call
    deposit = 10 * PRICE[symbol]
    assert balance_of(devchain, symbol, payer.address) == payer_before - deposit
    charged = calls * PRICE[symbol]

    # the managers claim and sweep: payTo got exactly what was charged, to the base unit
    wait_for(lambda: balance_of(devchain, symbol, stack["payee"]) - payee_before == charged)
    await asyncio.sleep(1.5)  # a later pass moves nothing more
    assert balance_of(devchain, symbol, stack["payee"]) - payee_before == charged

    # the client's cooperative refund returns exactly the rest
    def fetch(url: str, headers: dict[str, str]) -> _RefundResponse:
        """The route is POST; the probe's 402 is narrowed to this asset (the client takes the first
        batch-settlement option it sees)."""
        resp = httpx.post(url, json=CHAT_BODY, headers=headers, timeout=30)
        out = dict(resp.headers)
        if "payment-required" in out and not headers:
            required = decoded(out["payment-required"])
            required["accepts"] = [q for q in required["accepts"] if q["asset"].lower() == asset.lower()]
            out["payment-required"] = base64.b64encode(json.dumps(required).encode()).decode()
        return _RefundResponse(status=resp.status_code, headers=out)

    settled = await asyncio.to_thread(scheme.refund, stack["replicas"][1].url + CHAT, RefundOptions(fetch=fetch))
    assert settled.success and int(settled.amount) == deposit - charged, settled
    assert balance_of(devchain, symbol, payer.address) == payer_before - charged


async def test_metered_calls_charge_what_was_used(stack: Any, devchain: dict) -> None:
    """A metered route: each voucher allows the per-call maximum, the call is charged its usage
    (less), reported in `chargedAmount`; a stream's charge comes in its final `x402.payment`
    event, and the client resynchronises from the corrective 402 on its next call."""
    payer = derived("metered")
    fund(devchain, payer)
    asset = devchain["tokens"]["USDC"]["address"]
    client, _ = official_client(payer, asset, rpc_url=devchain["rpc_url"])
    url = stack["replicas"][0].url + "/v1/completions"
    body = {"model": "any-model", "prompt": "count to three"}
    ceiling = 10_000  # 0.01 USDC
    charges = []
    async with x402HttpxClient(client, timeout=30) as http:
        for _ in range(2):
            r = await http.post(url, json=body)
            assert r.status_code == 200, r.text
            receipt = decoded(r.headers["PAYMENT-RESPONSE"])
            charges.append(int(receipt["extra"]["chargedAmount"]))
        assert all(0 < c < ceiling for c in charges), charges
        assert receipt["extra"]["channelState"]["chargedCumulativeAmount"] == str(sum(charges))
        r = await http.post(url, json=body | {"stream": True})
        assert r.status_code == 200 and b"event: x402.payment" in r.content, r.text
        event = json.loads(r.content.split(b"event: x402.payment\ndata: ")[1].split(b"\n")[0])
        charges.append(int(event["extra"]["chargedAmount"]))
        assert 0 < charges[-1] < ceiling
        assert event["extra"]["channelState"]["chargedCumulativeAmount"] == str(sum(charges))
        r = await http.post(url, json=body)  # resynchronised through the corrective 402, then paid
        assert r.status_code == 200, r.text
        charges.append(int(decoded(r.headers["PAYMENT-RESPONSE"])["extra"]["chargedAmount"]))
    assert decoded(r.headers["PAYMENT-RESPONSE"])["extra"]["channelState"]["chargedCumulativeAmount"] == str(sum(charges))


# -- hostile agents --------------------------------------------------------------------------------


class Channel:
    """A channel opened by the official client, then driven by hand."""

    def __init__(self, devchain: dict[str, Any], payer: LocalAccount, requirement: dict[str, Any]) -> None:
        self.devchain, self.payer, self.requirement = devchain, payer, requirement
        extra = requirement["extra"]
        self.config = ChannelConfig(payer=payer.address, payer_authorizer=payer.address,
                                    receiver=requirement["payTo"], receiver_authorizer=extra["receiverAuthorizer"],
                                    token=requirement["asset"], withdraw_delay=extra["withdrawDelay"],
                                    salt="0x" + "00" * 32)
        self.id = compute_channel_id(self.config, devchain["network"])

    def payment(self, max_claimable: int, *, signer: LocalAccount | None = None, channel_id: str | None = None,
                kind: str = "voucher", extra: dict[str, Any] | None = None) -> str:
        voucher = sign_voucher(EthAccountSigner(signer or self.payer), channel_id or self.id, max_claimable,
                               self.devchain["network"])
        inner = {"type": kind, "channelConfig": self.config.to_dict(), "voucher": voucher.to_dict(), **(extra or {})}
        return encode_payment({"x402Version": 2, "payload": inner, "accepted": self.requirement,
                               "resource": {"url": "http://x" + CHAT}})


async def post(url: str, payment: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(url + CHAT, json=CHAT_BODY, headers={"PAYMENT-SIGNATURE": payment})


async def offered(url: str, asset: str) -> dict[str, Any]:
    """The route's batch-settlement requirement for `asset`, from an unpaid call's 402."""
    async with httpx.AsyncClient(timeout=30) as http:
        unpaid = await http.post(url + CHAT, json=CHAT_BODY)
    return next(q for q in decoded(unpaid.headers["PAYMENT-REQUIRED"])["accepts"]
                if q["scheme"] == "batch-settlement" and q["asset"] == asset)


async def test_hostile_vouchers_are_refused_and_never_served(stack: Any, devchain: dict) -> None:
    a, b = stack["replicas"]
    payer, stranger = derived("hostile"), derived("stranger")
    fund(devchain, payer)
    asset = devchain["tokens"]["OPG"]["address"]
    client, _ = official_client(payer, asset)
    async with x402HttpxClient(client, timeout=30) as http:
        r = await http.post(a.url + CHAT, json=CHAT_BODY)
    assert r.status_code == 200, r.text
    requirement = await offered(a.url, asset)
    ch = Channel(devchain, payer, requirement)
    price, deposit = PRICE["OPG"], 10 * PRICE["OPG"]  # the route's minDeposit: 10 calls

    async def refused(resp: httpx.Response, reason: str) -> None:
        assert resp.status_code == 402 and b"Echo" not in resp.content, resp.text
        assert json.loads(base64.b64decode(resp.headers["PAYMENT-REQUIRED"]))["error"] == reason, resp.text

    # malformed deposit and refund fields (the fuzzer's 500s): refused by name, nothing moves
    for bad in ("x", [1], 5, True):
        await refused(await post(a.url, ch.payment(2 * price, kind="deposit", extra={"deposit": bad})),
                      "invalid_batch_settlement_evm_deposit_payload")
    for amount in ("abc", "1.5", "0x10", "", [1], {"a": 1}, True):
        await refused(await post(b.url, ch.payment(price, kind="refund", extra={"amount": amount})),
                      "invalid_batch_settlement_evm_refund_amount_invalid")
    # at or below the last voucher (charged is 1 price): refused with the corrective state
    for stale in (price, price - 1):
        resp = await post(b.url, ch.payment(stale))
        await refused(resp, "invalid_batch_settlement_evm_cumulative_amount_mismatch")
        state = json.loads(base64.b64decode(resp.headers["PAYMENT-REQUIRED"]))["accepts"]
        corrective = next(q for q in state if q["scheme"] == "batch-settlement" and q["asset"] == asset)
        assert corrective["extra"]["channelState"]["chargedCumulativeAmount"] == str(price)
    # signed by another key; for another channel
    await refused(await post(a.url, ch.payment(2 * price, signer=stranger)), "invalid_batch_settlement_evm_voucher_signature")
    await refused(await post(a.url, ch.payment(2 * price, channel_id="0x" + "ab" * 32)),
                  "invalid_batch_settlement_evm_channel_id_mismatch")
    # a good one on A; the same again on B (a replay) is refused
    good = ch.payment(2 * price)
    assert (await post(a.url, good)).status_code == 200
    await refused(await post(b.url, good), "invalid_batch_settlement_evm_cumulative_amount_mismatch")
    # the next one racing itself on both replicas: served once
    racing = ch.payment(3 * price)
    results = await asyncio.gather(post(a.url, racing), post(b.url, racing))
    assert sorted(r.status_code for r in results) == [200, 402], [r.text for r in results]
    loser = next(r for r in results if r.status_code == 402)
    assert decoded(loser.headers["PAYMENT-REQUIRED"])["error"] in (
        "invalid_batch_settlement_evm_channel_busy", "invalid_batch_settlement_evm_cumulative_amount_mismatch")
    # use up the deposit; one more call is above it: refused
    for n in range(4, 11):
        assert (await post((a, b)[n % 2].url, ch.payment(n * price))).status_code == 200
    await refused(await post(b.url, ch.payment(11 * price)), "invalid_batch_settlement_evm_cumulative_exceeds_balance")
    assert channel_state(devchain, ch.id)[0] == deposit
    # everything charged is claimed on chain, once: totalClaimed is exactly the 10 calls served
    wait_for(lambda: channel_state(devchain, ch.id)[1] == deposit)


async def test_a_withdrawing_payer_is_claimed_and_no_longer_served(stack: Any, devchain: dict) -> None:
    a, b = stack["replicas"]
    payer = derived("withdrawer")
    fund(devchain, payer)
    asset = devchain["tokens"]["USDC"]["address"]
    client, _ = official_client(payer, asset)
    for replica in (a, b):
        async with x402HttpxClient(client, timeout=30) as http:
            assert (await http.post(replica.url + CHAT, json=CHAT_BODY)).status_code == 200
    requirement = await offered(a.url, asset)
    ch = Channel(devchain, payer, requirement)
    balance, _ = channel_state(devchain, ch.id)
    config = (ch.config.payer, ch.config.payer_authorizer, ch.config.receiver, ch.config.receiver_authorizer,
              ch.config.token, ch.config.withdraw_delay, b"\0" * 32)
    send_transactions(devchain, [(payer, devchain["contracts"]["batch_settlement"], calldata(
        "initiateWithdraw((address,address,address,address,address,uint40,bytes32),uint128)",
        ["(address,address,address,address,address,uint40,bytes32)", "uint128"], [config, balance - 2 * PRICE["USDC"]]))])
    started = time.monotonic()
    # both calls' charges are claimed long before the 900 s delay could end
    wait_for(lambda: channel_state(devchain, ch.id)[1] == 2 * PRICE["USDC"], timeout=20)
    assert time.monotonic() - started < 20
    # and the channel serves no more calls, on either replica
    for replica in (a, b):
        resp = await post(replica.url, ch.payment(3 * PRICE["USDC"]))  # continues exactly from what was charged
        assert resp.status_code == 402 and b"Echo" not in resp.content, resp.text
        assert "withdrawal" in resp.json()["message"]


# -- crashes ----------------------------------------------------------------------------------------


def claimed_events(devchain: dict[str, Any], channel_id: str) -> int:
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        topic = "0x" + keccak(text="Claimed(bytes32,address,uint128,uint128)").hex()
        logs = rpc.call("eth_getLogs", {"address": devchain["contracts"]["batch_settlement"], "fromBlock": "0x0",
                                        "toBlock": "latest", "topics": [topic, channel_id]})
    finally:
        rpc.close()
    return len(logs)


def claim_transactions(devchain: dict[str, Any], since_block: int) -> list[str]:
    """Hashes of claimWithSignature transactions (top-level or in a multicall) mined after `since_block`."""
    from facilitator.schemes.evm_batch.calldata import SEL_CLAIM_WITH_SIGNATURE, SEL_MULTICALL

    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        latest = int(rpc.call("eth_blockNumber"), 16)
        blocks = rpc.batch([("eth_getBlockByNumber", [hex(n), True]) for n in range(since_block + 1, latest + 1)])
    finally:
        rpc.close()
    target = devchain["contracts"]["batch_settlement"].lower()
    return [tx["hash"] for block in blocks for tx in block["transactions"]
            if (tx.get("to") or "").lower() == target
            and bytes.fromhex(tx["input"][2:10]) in (SEL_CLAIM_WITH_SIGNATURE, SEL_MULTICALL)]


def block_number(devchain: dict[str, Any]) -> int:
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        return int(rpc.call("eth_blockNumber"), 16)
    finally:
        rpc.close()


async def test_kill_9_during_calls_and_during_a_claim(devchain_file: str, redis_server: Any, devchain: dict,
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    """Replica C (its facilitator behind a proxy that can withhold answers) serves calls and runs
    the only channel manager. It is killed -9 while a call is in flight, and again while its claim
    is on chain but unanswered; replica D takes over. Every voucher served is claimed, exactly once
    (one Claimed event per claim transaction), and payTo gets exactly what was charged."""
    from tests.gateway_client import set_mode

    procs = Processes(devchain_file, tmp_path_factory.mktemp("batch-kill"))
    payee, payer = derived("kill-payee").address, derived("kill-payer")
    fund(devchain, payer)
    symbol, asset = "USDC", devchain["tokens"]["USDC"]["address"]
    price = PRICE[symbol]
    try:
        upstream = procs.upstream()
        path = procs.log_dir / "kill.json"
        config = batch_config(path, devchain, devchain_file, upstream.url, redis_server.url, payee)
        doc = json.loads(path.read_text())
        # settle (sweep) only on a manager's first pass: a withheld answer below is a claim's
        doc["routes"][0]["batch"] |= {"call_lease_s": 2.0, "manager_lease_s": 2.0, "claim_interval_s": 1.0,
                                      "settle_interval_s": 3600.0}
        path.write_text(json.dumps(doc))
        prefix = f"batch-kill:{uuid.uuid4().hex[:8]}:"
        keys = [a["private_key"] for a in devchain["accounts"]["facilitator"]]
        fac = procs.facilitator(redis_server.url, env={"FACILITATOR_STORE_PREFIX": prefix + "fac:",
                                                       "FACILITATOR_SIGNER_KEYS": keys[0]})
        proxy = procs.hostile(fac.url)
        env = {"GATEWAY_STORE_PREFIX": prefix + "gw:", "FACILITATOR_STORE_PREFIX": prefix + "fac:"}
        c = procs.gateway(upstream.url, redis_server.url, config=config, facilitator_url=proxy.url, env=env)
        client, _ = official_client(payer, asset)
        async with x402HttpxClient(client, timeout=30) as http:
            for _ in range(3):
                assert (await http.post(c.url + CHAT, json=CHAT_BODY)).status_code == 200
        channel_id = (await offered(c.url, asset)) and Channel(devchain, payer, await offered(c.url, asset)).id
        wait_for(lambda: channel_state(devchain, channel_id)[1] == 3 * price)  # C's manager claimed the 3
        claims_before = claimed_events(devchain, channel_id)

        # kill -9 during a call (the upstream is slow; the voucher was taken, nothing was answered)
        async def slow_call() -> None:
            async with x402HttpxClient(client, timeout=30) as http:
                await http.post(c.url + CHAT, json=CHAT_BODY, headers={"X-Devupstream-Fault": "slow:5000"})

        task = asyncio.ensure_future(slow_call())
        await asyncio.sleep(1.0)
        c.kill()
        with pytest.raises(Exception):  # noqa: B017 - the connection dies with the replica
            await task
        d = procs.gateway(upstream.url, redis_server.url, config=config, env=env | {"FACILITATOR_SIGNER_KEYS": keys[1]})
        # the client never got an answer: it pays the same call again on D, served once its hold expires
        async with x402HttpxClient(client, timeout=30) as http:
            for _ in range(2):
                r = await http.post(d.url + CHAT, json=CHAT_BODY)
                while r.status_code == 402 and "busy" in r.headers.get("PAYMENT-REQUIRED", "") + r.text:
                    await asyncio.sleep(0.5)
                    r = await http.post(d.url + CHAT, json=CHAT_BODY)
                assert r.status_code == 200, r.text
        charged = 5 * price
        wait_for(lambda: channel_state(devchain, channel_id)[1] == charged)

        # kill -9 during a claim: C' sends it (it lands on chain), its answer is withheld, C' dies
        d.kill()
        since = block_number(devchain)
        c2 = procs.gateway(upstream.url, redis_server.url, config=config, facilitator_url=proxy.url, env=env)
        await asyncio.sleep(4.0)  # D's lease expired; C' took it and made its first pass
        set_mode(proxy, settle="proxy-then-sleep", sleep_s=60)
        async with x402HttpxClient(client, timeout=30) as http:
            assert (await http.post(c2.url + CHAT, json=CHAT_BODY)).status_code == 200  # deposit-free: a voucher
        charged += price
        wait_for(lambda: channel_state(devchain, channel_id)[1] == charged)  # on chain; C' still waits
        c2.kill()
        events = claimed_events(devchain, channel_id)
        procs.gateway(upstream.url, redis_server.url, config=config, env=env | {"FACILITATOR_SIGNER_KEYS": keys[1]})
        # D' finds the journaled claim, sends it again: the facilitator answers its recorded result
        wait_for(lambda: balance_of(devchain, symbol, payee) == charged, timeout=30)
        await asyncio.sleep(2.0)
        assert claimed_events(devchain, channel_id) == events  # nothing claimed twice
        assert len(claim_transactions(devchain, since)) == 1  # D' answered C''s claim from its record: no new one
        assert events <= claims_before + 3
        assert channel_state(devchain, channel_id) == (10 * price, charged)
        assert balance_of(devchain, symbol, payee) == charged
    finally:
        procs.stop_all()


async def test_a_replica_dead_after_charging_a_voucher_owes_its_answer_once(stack: Any, devchain: dict) -> None:
    """A replica exits right after charging a voucher (the fault hook), before answering: the
    agent's resend of that very voucher, on another replica, gets the answer kept with the charge,
    without a new charge and without calling the upstream again; a resend after that is a replay
    (refused), and the next voucher continues from what was charged once."""
    a, _ = stack["replicas"]
    payer = derived("owed")
    fund(devchain, payer)
    asset = devchain["tokens"]["USDC"]["address"]
    client, _ = official_client(payer, asset)
    async with x402HttpxClient(client, timeout=30) as http:
        assert (await http.post(a.url + CHAT, json=CHAT_BODY)).status_code == 200  # the deposit's call
    ch = Channel(devchain, payer, await offered(a.url, asset))
    price = PRICE["USDC"]
    dying = stack["procs"].gateway(stack["upstream"], stack["store"], config=stack["config"],
                                   env=stack["env"] | {"GATEWAY_FAULT_EXIT_AFTER_SETTLE": "1"})
    second = ch.payment(2 * price)
    with pytest.raises(httpx.HTTPError):
        await post(dying.url, second)
    assert dying.proc.wait(10) == 70

    owed = await post(a.url, second)
    assert owed.status_code == 200 and b"Echo" in owed.content, owed.text
    receipt = decoded(owed.headers["PAYMENT-RESPONSE"])
    assert receipt["extra"]["chargedAmount"] == str(price)
    assert receipt["extra"]["channelState"]["chargedCumulativeAmount"] == str(2 * price)  # charged once
    again = await post(a.url, second)  # delivered now: a replay
    assert again.status_code == 402 and b"Echo" not in again.content
    assert decoded(again.headers["PAYMENT-REQUIRED"])["error"] == "invalid_batch_settlement_evm_cumulative_amount_mismatch"
    third = await post(a.url, ch.payment(3 * price))
    assert third.status_code == 200
    assert decoded(third.headers["PAYMENT-RESPONSE"])["extra"]["channelState"]["chargedCumulativeAmount"] == \
        str(3 * price)


async def test_a_call_longer_than_its_lease_keeps_its_channel_and_a_replay_meanwhile_is_refused(
        devchain_file: str, redis_server: Any, devchain: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    """call_lease_s is 1 s and the upstream takes 3.5 s: the call renews its hold, so the very same
    voucher sent to the other replica meanwhile is refused (without renewal the lapsed hold would
    have let it in: two answers for one price), and the call itself is served and charged once."""
    procs = Processes(devchain_file, tmp_path_factory.mktemp("batch-lease"))
    payer = derived("lease-payer")
    fund(devchain, payer)
    asset, price = devchain["tokens"]["OPG"]["address"], PRICE["OPG"]
    try:
        upstream = procs.upstream()
        path = procs.log_dir / "lease.json"
        batch_config(path, devchain, devchain_file, upstream.url, redis_server.url, derived("lease-payee").address)
        doc = json.loads(path.read_text())
        doc["routes"][0]["batch"] |= {"call_lease_s": 1.0}
        path.write_text(json.dumps(doc))
        env = {"GATEWAY_STORE_PREFIX": f"batch-lease:{uuid.uuid4().hex[:8]}:gw:"}
        a, b = (procs.gateway(upstream.url, redis_server.url, config=str(path), env=env) for _ in range(2))
        client, _ = official_client(payer, asset)
        async with x402HttpxClient(client, timeout=30) as http:
            assert (await http.post(a.url + CHAT, json=CHAT_BODY)).status_code == 200  # the deposit's call
        ch = Channel(devchain, payer, await offered(a.url, asset))
        voucher = ch.payment(2 * price)
        async with httpx.AsyncClient(timeout=30) as http:
            slow = asyncio.ensure_future(http.post(a.url + CHAT, json=CHAT_BODY, headers={
                "PAYMENT-SIGNATURE": voucher, "X-Devupstream-Fault": "slow:3500"}))
            await asyncio.sleep(2.5)  # well past the first lease
            replay = await http.post(b.url + CHAT, json=CHAT_BODY, headers={"PAYMENT-SIGNATURE": voucher})
            assert replay.status_code == 402 and b"Echo" not in replay.content, replay.text
            assert decoded(replay.headers["PAYMENT-REQUIRED"])["error"] == "invalid_batch_settlement_evm_channel_busy"
            served = await slow
        assert served.status_code == 200, served.text
        assert decoded(served.headers["PAYMENT-RESPONSE"])["extra"]["channelState"]["chargedCumulativeAmount"] \
            == str(2 * price)
        assert (await post(b.url, ch.payment(3 * price))).status_code == 200  # charged exactly 2 prices so far
    finally:
        procs.stop_all()
