"""Differential test: our facilitator's verify against the official SDK's `x402Facilitator` (x402 2.25.0).

Each payload of a corpus (valid and tampered, for Permit2 via OPG and EIP-3009 via USDC) is verified
by our facilitator (in process, `memory://` store) and by the SDK's exact-EVM facilitator on the same
dev chain. They must agree on validity, except where we are documented to be stricter; when we say
invalid we must name an `ErrorReason`. Both reasons are pinned in `EXPECTED`, which must equal this table:

| case                  | method  | ours                                                   | SDK                                                    |     |
|-----------------------|---------|--------------------------------------------------------|--------------------------------------------------------|-----|
| valid                 | permit2 | valid                                                  | valid                                                  |     |
| valid                 | eip3009 | valid                                                  | valid                                                  |     |
| wrong_amount          | permit2 | permit2_amount_mismatch                                | permit2_amount_mismatch                                |     |
| wrong_amount          | eip3009 | invalid_exact_evm_payload_authorization_value_mismatch | invalid_exact_evm_payload_authorization_value_mismatch |     |
| wrong_pay_to          | permit2 | invalid_permit2_recipient_mismatch                     | invalid_permit2_recipient_mismatch                     |     |
| wrong_pay_to          | eip3009 | invalid_exact_evm_payload_recipient_mismatch           | invalid_exact_evm_payload_recipient_mismatch           |     |
| wrong_asset           | permit2 | permit2_token_mismatch                                 | permit2_token_mismatch                                 |     |
| wrong_asset           | eip3009 | invalid_payment_requirements                           | invalid_exact_evm_payload_signature                    | (1) |
| wrong_network         | permit2 | invalid_network                                        | network_mismatch                                       | (2) |
| wrong_network         | eip3009 | invalid_network                                        | network_mismatch                                       | (2) |
| wrong_spender         | permit2 | invalid_permit2_spender                                | invalid_permit2_spender                                |     |
| expired               | permit2 | permit2_deadline_expired                               | permit2_deadline_expired                               |     |
| expired               | eip3009 | invalid_exact_evm_payload_authorization_valid_before   | invalid_exact_evm_payload_authorization_valid_before   |     |
| expires_within_buffer | permit2 | permit2_deadline_expired                               | permit2_deadline_expired                               |     |
| expires_within_buffer | eip3009 | invalid_exact_evm_payload_authorization_valid_before   | invalid_exact_evm_payload_authorization_valid_before   |     |
| not_yet_valid         | permit2 | permit2_not_yet_valid                                  | permit2_not_yet_valid                                  |     |
| not_yet_valid         | eip3009 | invalid_exact_evm_payload_authorization_valid_after    | invalid_exact_evm_payload_authorization_valid_after    |     |
| bad_sig_flipped_r     | permit2 | invalid_permit2_signature                              | invalid_permit2_signature                              |     |
| bad_sig_flipped_r     | eip3009 | invalid_exact_evm_payload_signature                    | invalid_exact_evm_payload_signature                    |     |
| bad_sig_other_key     | permit2 | invalid_permit2_signature                              | invalid_permit2_signature                              |     |
| bad_sig_other_key     | eip3009 | invalid_exact_evm_payload_signature                    | invalid_exact_evm_payload_signature                    |     |
| replayed              | permit2 | permit2_invalid_nonce                                  | **valid**                                              | (4) |
| replayed              | eip3009 | invalid_exact_evm_nonce_already_used                   | invalid_exact_evm_nonce_already_used                   |     |
| replayed_fresh_store  | permit2 | permit2_invalid_nonce                                  | **valid**                                              | (4) |
| replayed_fresh_store  | eip3009 | invalid_exact_evm_nonce_already_used                   | invalid_exact_evm_nonce_already_used                   |     |
| insufficient_balance  | permit2 | invalid_exact_evm_insufficient_balance                 | invalid_exact_evm_insufficient_balance                 |     |
| insufficient_balance  | eip3009 | invalid_exact_evm_insufficient_balance                 | invalid_exact_evm_insufficient_balance                 |     |
| no_allowance          | permit2 | permit2_allowance_required                             | permit2_allowance_required                             |     |
| accepted_differs      | permit2 | invalid_payment_requirements                           | **valid**                                              | (5) |
| accepted_differs      | eip3009 | invalid_payment_requirements                           | **valid**                                              | (5) |

Validity agrees everywhere except (4) and (5). Where the reason strings differ:

1. We compare `paymentPayload.accepted` with `paymentRequirements` field by field (after the
   scheme's local checks, before any chain read); the SDK has no such check, builds the EIP-3009
   digest with verifyingContract = the other token, and the recovered signer is not `from`.
2. We route on `paymentRequirements.network`, which is not configured (eip155:8453); the SDK routes
   on `accepted.network` (eip155:84532, registered) and then finds the two differ.
3. (resolved) Our USDC stand-in now reverts with Circle's "ERC20: transfer amount exceeds
   balance", which the SDK's simulation maps to the same reason as ours.
4. Documented, expected: we are stricter. The SDK's Permit2 verify never reads Permit2's nonce
   bitmap, so it accepts a payment that was already settled (the settle would revert with
   InvalidNonce). We refuse it from the settlement store (`replayed`) and, with an empty store,
   from the on-chain bitmap (`replayed_fresh_store`). For EIP-3009 the SDK's simulation catches it.
5. Documented, expected: we are stricter. `paymentPayload.accepted` names another maxTimeoutSeconds
   than `paymentRequirements` (the signed payment is valid). The SDK's facilitator leaves that to
   the resource server; we apply the rule the gateway binds payments with
   (`facilitator.x402.matching`, the SDK server's own rule) and refuse it.

Payers, payees and spenders are fresh accounts derived from a fixed seed, so the shared dev-chain
accounts are untouched. Run with `-s` to see the table row of every case.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from x402 import x402Client, x402Facilitator
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.constants import PERMIT2_WITNESS_TYPES
from x402.mechanisms.evm.exact.register import register_exact_evm_client, register_exact_evm_facilitator
from x402.schemas import PaymentPayload as SdkPaymentPayload
from x402.schemas import PaymentRequired, ResourceInfo
from x402.schemas import PaymentRequirements as SdkPaymentRequirements

from devtools.devchain import calldata
from devtools.rpc import BlockingRpc
from facilitator.app import build_facilitator
from facilitator.service import Facilitator
from facilitator.settings import devchain_overlay, load_settings
from facilitator.x402.reasons import ErrorReason
from facilitator.x402.types import SettleRequest, VerifyRequest
from tests.payments import facilitator_body, requirements_for, send_transactions

pytestmark = pytest.mark.integration

SEED = "x402-differential"
MAX_UINT256 = 2**256 - 1
RESOURCE_URL = "http://test/differential"
SYMBOL = {"permit2": "OPG", "eip3009": "USDC"}
AMOUNT = {"OPG": 10**15, "USDC": 1_000}  # 0.001 of each
MINTED = {"OPG": 10**21, "USDC": 10**9}
TRANSFER_WITH_AUTHORIZATION_TYPES = {
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ]
}

# (case, method) -> (our invalidReason, the SDK's invalidReason); None = valid. Mirrors the table above.
_P2_SAME = {
    "wrong_amount": "permit2_amount_mismatch",
    "wrong_pay_to": "invalid_permit2_recipient_mismatch",
    "wrong_asset": "permit2_token_mismatch",
    "wrong_spender": "invalid_permit2_spender",
    "expired": "permit2_deadline_expired",
    "expires_within_buffer": "permit2_deadline_expired",
    "not_yet_valid": "permit2_not_yet_valid",
    "bad_sig_flipped_r": "invalid_permit2_signature",
    "bad_sig_other_key": "invalid_permit2_signature",
    "insufficient_balance": "invalid_exact_evm_insufficient_balance",
    "no_allowance": "permit2_allowance_required",
}
_3009_SAME = {
    "wrong_amount": "invalid_exact_evm_payload_authorization_value_mismatch",
    "wrong_pay_to": "invalid_exact_evm_payload_recipient_mismatch",
    "expired": "invalid_exact_evm_payload_authorization_valid_before",
    "expires_within_buffer": "invalid_exact_evm_payload_authorization_valid_before",
    "not_yet_valid": "invalid_exact_evm_payload_authorization_valid_after",
    "bad_sig_flipped_r": "invalid_exact_evm_payload_signature",
    "bad_sig_other_key": "invalid_exact_evm_payload_signature",
    "replayed": "invalid_exact_evm_nonce_already_used",
    "replayed_fresh_store": "invalid_exact_evm_nonce_already_used",
    "insufficient_balance": "invalid_exact_evm_insufficient_balance",
}
EXPECTED: dict[tuple[str, str], tuple[str | None, str | None]] = {
    ("valid", "permit2"): (None, None),
    ("valid", "eip3009"): (None, None),
    **{(case, "permit2"): (reason, reason) for case, reason in _P2_SAME.items()},
    **{(case, "eip3009"): (reason, reason) for case, reason in _3009_SAME.items()},
    ("wrong_asset", "eip3009"): ("invalid_payment_requirements", "invalid_exact_evm_payload_signature"),  # (1)
    ("wrong_network", "permit2"): ("invalid_network", "network_mismatch"),  # (2)
    ("wrong_network", "eip3009"): ("invalid_network", "network_mismatch"),  # (2)
    ("replayed", "permit2"): ("permit2_invalid_nonce", None),  # (4)
    ("replayed_fresh_store", "permit2"): ("permit2_invalid_nonce", None),  # (4)
    ("accepted_differs", "permit2"): ("invalid_payment_requirements", None),  # (5)
    ("accepted_differs", "eip3009"): ("invalid_payment_requirements", None),  # (5)
}

# Where we are deliberately stricter than the SDK: we say invalid, it says valid.
STRICTER = {
    # The SDK's Permit2 verify never reads the nonce bitmap, so it accepts a settled payment again
    # (the replay would revert at settle with InvalidNonce). We refuse it at verify.
    ("replayed", "permit2"),
    ("replayed_fresh_store", "permit2"),
    # The SDK's facilitator does not compare `accepted` with the requirements beyond scheme and
    # network; we compare every field, as a resource server must.
    ("accepted_differs", "permit2"),
    ("accepted_differs", "eip3009"),
}

CASES: list[tuple[str, str]] = [
    (case, method)
    for case in (
        "valid",
        "wrong_amount",
        "wrong_pay_to",
        "wrong_asset",
        "wrong_network",
        "wrong_spender",
        "expired",
        "expires_within_buffer",
        "not_yet_valid",
        "bad_sig_flipped_r",
        "bad_sig_other_key",
        "replayed",
        "replayed_fresh_store",
        "insufficient_balance",
        "no_allowance",
        "accepted_differs",
    )
    for method in ("permit2", "eip3009")
    if not (method == "eip3009" and case in ("wrong_spender", "no_allowance"))
]


def derived(label: str) -> LocalAccount:
    """Deterministic test key: keccak256("x402-differential:{label}")."""
    return Account.from_key(keccak(text=f"{SEED}:{label}"))


# ---------------------------------------------------------------------------------------------
# Environment: both facilitators and fresh accounts


@dataclass
class Env:
    devchain: dict[str, Any]
    ours: Facilitator
    ours_fresh: Facilitator  # a second instance with an empty store: only the chain can say "used"
    sdk: x402Facilitator
    payer: LocalAccount  # ETH, tokens, Permit2 approvals
    broke: LocalAccount  # ETH, Permit2 approvals, no tokens
    unapproved: LocalAccount  # ETH, tokens, no Permit2 approval
    stranger: LocalAccount  # signs in someone else's name; never funded
    payee: str
    other_payee: str
    other_spender: str
    nonce_counter: int = 0


def fund(devchain: dict[str, Any], accounts: dict[LocalAccount, tuple[bool, bool]]) -> None:
    """ETH for every account; then, per account, (mint tokens?, approve Permit2?) on both tokens."""
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        rpc.batch([("anvil_setBalance", [a.address, hex(10**21)]) for a in accounts])
    finally:
        rpc.close()
    txs = []
    for account, (mint, approve) in accounts.items():
        for symbol, token in devchain["tokens"].items():
            if mint:
                txs.append((account, token["address"],
                            calldata("mint(address,uint256)", ["address", "uint256"], [account.address, MINTED[symbol]])))
            if approve:
                txs.append((account, token["address"], calldata(
                    "approve(address,uint256)", ["address", "uint256"], [devchain["contracts"]["permit2"], MAX_UINT256])))
    send_transactions(devchain, txs)


def our_facilitator(devchain: dict[str, Any]) -> Facilitator:
    return build_facilitator(load_settings(None, env={}, overrides=devchain_overlay(devchain) | {"store_url": "memory://"}))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def env(devchain: dict[str, Any]):
    sdk = x402Facilitator()
    sdk_key = devchain["accounts"]["facilitator"][-1]["private_key"]  # verify never sends a transaction
    register_exact_evm_facilitator(sdk, FacilitatorWeb3Signer(private_key=sdk_key, rpc_url=devchain["rpc_url"]),
                                   networks=devchain["network"])
    e = Env(
        devchain=devchain, ours=our_facilitator(devchain), ours_fresh=our_facilitator(devchain), sdk=sdk,
        payer=derived("payer"), broke=derived("broke"), unapproved=derived("unapproved"), stranger=derived("stranger"),
        payee=derived("payee").address, other_payee=derived("other-payee").address,
        other_spender=derived("other-spender").address,
    )
    fund(devchain, {e.payer: (True, True), e.broke: (False, True), e.unapproved: (True, False)})
    try:
        yield e
    finally:
        await e.ours.close()
        await e.ours_fresh.close()


# ---------------------------------------------------------------------------------------------
# Signing: the official client for well-formed payments, eth_account for hand-made ones


async def official_sign(account: LocalAccount, requirements: dict[str, Any]) -> dict[str, Any]:
    client = x402Client()
    register_exact_evm_client(client, account)
    client.set_spend_controls(False)  # test tokens are not in the SDK's default-asset table
    req = SdkPaymentRequirements.model_validate(requirements)
    payload = await client.create_payment_payload(PaymentRequired(accepts=[req], resource=ResourceInfo(url=RESOURCE_URL)))
    return payload.model_dump(by_alias=True, exclude_none=True)


def _wire(inner: dict[str, Any], requirements: dict[str, Any]) -> dict[str, Any]:
    return {"x402Version": 2, "payload": inner, "accepted": copy.deepcopy(requirements), "resource": {"url": RESOURCE_URL}}


def _signed(account: LocalAccount, signer: LocalAccount, domain: dict, types: dict, message: dict,
            flip_r: bool) -> str:
    signable = encode_typed_data(domain_data=domain, message_types=types, message_data=message)
    sig = bytearray(signer.sign_message(signable).signature)
    if flip_r:
        # Flip one byte of r, choosing one for which ecrecover still yields *an* address (a wrong
        # one): a recoverable but wrong signature, the same kind every run.
        original = bytes(sig)
        for i in range(31, -1, -1):
            sig = bytearray(original)
            sig[i] ^= 0xFF
            try:
                recovered = Account.recover_message(signable, signature=bytes(sig))
            except Exception:  # noqa: BLE001 - any failure to recover is as good as a wrong address
                continue
            assert recovered != account.address
            break
        else:
            raise AssertionError("no recoverable r-flip found")
    return "0x" + bytes(sig).hex()


def next_nonce(e: Env) -> int:
    e.nonce_counter += 1
    return int.from_bytes(keccak(text=f"{SEED}:nonce:{e.nonce_counter}:{time.time_ns()}"), "big")


def sign_permit2(e: Env, account: LocalAccount, requirements: dict[str, Any], *, signer: LocalAccount | None = None,
                 spender: str | None = None, deadline: int | None = None, valid_after: int = 0,
                 flip_r: bool = False) -> dict[str, Any]:
    now = int(time.time())
    d = e.devchain
    message = {
        "permitted": {"token": requirements["asset"], "amount": int(requirements["amount"])},
        "spender": spender or d["contracts"]["exact_proxy"],
        "nonce": next_nonce(e),
        "deadline": now + 300 if deadline is None else deadline,
        "witness": {"to": requirements["payTo"], "validAfter": valid_after},
    }
    domain = {"name": "Permit2", "chainId": d["chain_id"], "verifyingContract": d["contracts"]["permit2"]}
    signature = _signed(account, signer or account, domain, PERMIT2_WITNESS_TYPES, message, flip_r)
    inner = {
        "permit2Authorization": {
            "from": account.address,
            "permitted": {"token": message["permitted"]["token"], "amount": str(message["permitted"]["amount"])},
            "spender": message["spender"],
            "nonce": str(message["nonce"]),
            "deadline": str(message["deadline"]),
            "witness": {"to": message["witness"]["to"], "validAfter": str(valid_after)},
        },
        "signature": signature,
    }
    return _wire(inner, requirements)


def sign_eip3009(e: Env, account: LocalAccount, requirements: dict[str, Any], *, signer: LocalAccount | None = None,
                 valid_before: int | None = None, valid_after: int = 0, flip_r: bool = False) -> dict[str, Any]:
    now = int(time.time())
    d = e.devchain
    nonce = "0x" + next_nonce(e).to_bytes(32, "big").hex()
    message = {
        "from": account.address,
        "to": requirements["payTo"],
        "value": int(requirements["amount"]),
        "validAfter": valid_after,
        "validBefore": now + 300 if valid_before is None else valid_before,
        "nonce": nonce,
    }
    domain = {"name": requirements["extra"]["name"], "version": requirements["extra"]["version"],
              "chainId": d["chain_id"], "verifyingContract": requirements["asset"]}
    signature = _signed(account, signer or account, domain, TRANSFER_WITH_AUTHORIZATION_TYPES, message, flip_r)
    inner = {"authorization": {k: str(v) if isinstance(v, int) else v for k, v in message.items()}, "signature": signature}
    return _wire(inner, requirements)


def sign_self(e: Env, method: str, account: LocalAccount, requirements: dict[str, Any], **kw: Any) -> dict[str, Any]:
    if method == "permit2":
        kw = {("deadline" if k == "expiry" else k): v for k, v in kw.items()}
        return sign_permit2(e, account, requirements, **kw)
    kw = {("valid_before" if k == "expiry" else k): v for k, v in kw.items()}
    return sign_eip3009(e, account, requirements, **kw)


# ---------------------------------------------------------------------------------------------
# The corpus


async def build_case(e: Env, case: str, method: str) -> tuple[dict[str, Any], dict[str, Any], Facilitator]:
    """(paymentPayload, paymentRequirements handed to verify, which of our instances verifies)."""
    d = e.devchain
    symbol = SYMBOL[method]
    other_symbol = "USDC" if symbol == "OPG" else "OPG"
    req = requirements_for(d, symbol, AMOUNT[symbol], pay_to=e.payee)
    now = int(time.time())

    if case == "valid":
        return await official_sign(e.payer, req), req, e.ours
    if case in ("wrong_amount", "wrong_pay_to", "wrong_asset", "wrong_network"):
        payload = await official_sign(e.payer, req)
        tampered = copy.deepcopy(req)
        if case == "wrong_amount":
            tampered["amount"] = str(2 * AMOUNT[symbol])
        elif case == "wrong_pay_to":
            tampered["payTo"] = e.other_payee
        elif case == "wrong_asset":
            tampered["asset"] = d["tokens"][other_symbol]["address"]
        else:
            tampered["network"] = "eip155:8453"
        return payload, tampered, e.ours
    if case == "wrong_spender":
        return sign_permit2(e, e.payer, req, spender=e.other_spender), req, e.ours
    if case == "expired":
        return sign_self(e, method, e.payer, req, expiry=now - 10), req, e.ours
    if case == "expires_within_buffer":
        return sign_self(e, method, e.payer, req, expiry=now + 3), req, e.ours
    if case == "not_yet_valid":
        return sign_self(e, method, e.payer, req, valid_after=now + 600, expiry=now + 3600), req, e.ours
    if case == "bad_sig_flipped_r":
        return sign_self(e, method, e.payer, req, flip_r=True), req, e.ours
    if case == "bad_sig_other_key":
        return sign_self(e, method, e.payer, req, signer=e.stranger), req, e.ours
    if case in ("replayed", "replayed_fresh_store"):
        payload = await official_sign(e.payer, req)
        settled = await e.ours.settle(SettleRequest.model_validate(facilitator_body(payload, req)))
        assert settled.success, settled
        return payload, req, (e.ours if case == "replayed" else e.ours_fresh)
    if case == "insufficient_balance":
        return await official_sign(e.broke, req), req, e.ours
    if case == "no_allowance":
        return await official_sign(e.unapproved, req), req, e.ours
    if case == "accepted_differs":
        payload = await official_sign(e.payer, req)
        payload["accepted"]["maxTimeoutSeconds"] += 60
        return payload, req, e.ours
    raise AssertionError(case)


# ---------------------------------------------------------------------------------------------
# The comparison


@dataclass
class Row:
    case: str
    method: str
    ours_valid: bool
    ours_reason: str | None
    sdk_valid: bool | None
    sdk_reason: str | None
    note: str = ""

    def cells(self) -> list[str]:
        def show(valid: bool | None, reason: str | None) -> str:
            return "valid" if valid else (reason or "?")

        return [self.case, self.method, show(self.ours_valid, self.ours_reason),
                show(self.sdk_valid, self.sdk_reason), self.note]


RESULTS: dict[str, Row] = {}


def render(rows: list[Row]) -> str:
    header = ["case", "method", "ours", "sdk", "note"]
    lines = [header] + [r.cells() for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    fmt = lambda line: "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines[1:])])


async def sdk_verify(sdk: x402Facilitator, payload: dict[str, Any], requirements: dict[str, Any]) -> tuple[bool | None, str | None]:
    try:
        resp = await sdk.verify(SdkPaymentPayload.model_validate(payload), SdkPaymentRequirements.model_validate(requirements))
    except Exception as exc:  # noqa: BLE001 - an exception is not an answer: recorded, and fails the case
        return None, f"raised {type(exc).__name__}: {exc}"
    return resp.is_valid, resp.invalid_reason


@pytest.mark.parametrize(("case", "method"), CASES, ids=[f"{c}-{m}" for c, m in CASES])
async def test_verify_agrees_with_sdk(env: Env, case: str, method: str) -> None:
    payload, requirements, ours_fac = await build_case(env, case, method)
    ours = await ours_fac.verify(VerifyRequest.model_validate(facilitator_body(payload, requirements)))
    sdk_valid, sdk_reason = await sdk_verify(env.sdk, payload, requirements)

    row = Row(case, method, ours.is_valid, ours.invalid_reason, sdk_valid, sdk_reason)
    if (case, method) in STRICTER:
        row.note = "documented: ours stricter"
    elif sdk_valid is not None and ours.is_valid != sdk_valid:
        row.note = "DISAGREE"
    elif not ours.is_valid and ours.invalid_reason != sdk_reason:
        row.note = "reasons differ"
    RESULTS[f"{case}-{method}"] = row
    print(render([row]))
    context = (f"\npayload={payload}\nrequirements={requirements}\nours={ours}\n\n"
               + render(list(RESULTS.values())))

    assert sdk_valid is not None, f"the SDK raised instead of answering{context}"
    if (case, method) in STRICTER:
        assert sdk_valid, f"the SDK now refuses this case: drop it from STRICTER{context}"
        assert not ours.is_valid, f"we must refuse what the SDK wrongly accepts{context}"
    else:
        assert ours.is_valid == sdk_valid, f"validity differs from the SDK{context}"
    if not ours.is_valid:
        assert ours.invalid_reason in {r.value for r in ErrorReason}, f"not an ErrorReason{context}"
    assert (ours.invalid_reason, sdk_reason) == EXPECTED[(case, method)], f"reasons differ from the table{context}"
    assert (case == "valid") == ours.is_valid, f"unexpected validity{context}"


def test_docstring_table_is_expected() -> None:
    """The module docstring's table says what `EXPECTED` asserts, row for row."""
    rows = {}
    for line in (__doc__ or "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and (cells[0], cells[1]) in EXPECTED:
            as_reason = lambda c: None if c.strip("*") == "valid" else c  # noqa: E731
            rows[(cells[0], cells[1])] = (as_reason(cells[2]), as_reason(cells[3]))
    assert rows == EXPECTED
    assert set(EXPECTED) == set(CASES)
