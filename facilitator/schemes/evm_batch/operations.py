"""The batch-settlement payloads as prepared payments (facilitator/schemes/base.py): each is
checked locally in `prepare`, against the chain in `confirm` (one batched read, with the escrow
call simulated by eth_call where one is sent), and `plan()` is its one transaction.

- `deposit` (verify, settle): escrows tokens through the ERC-3009 or Permit2 collector.
- `voucher`, `refund` (verify): a cumulative voucher against the channel's on-chain state.
- `claim` (settle): claimWithSignature of up to 100 vouchers; accounting only, no transfer.
- `settle` (settle): sweeps what was claimed for (receiver, token) to the receiver.
- `refund` with `refundNonce` and `claims` (settle): claims, then refundWithSignature, in one
  multicall.

The receiver authorizer's signatures (ClaimBatch, Refund) come with the payload: this
facilitator holds no authorizer key, so it advertises no `receiverAuthorizer`.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any

from facilitator.errors import PaymentInvalidError
from facilitator.evm import contracts
from facilitator.evm.chain import EvmChain
from facilitator.evm.eip712 import (
    TOKEN_PERMISSIONS_TYPEHASH,
    address_bytes,
    keccak,
    permit2_domain_separator,
    token_domain_separator,
    typed_digest,
    word_address,
    word_uint,
)
from facilitator.evm.rpc import Call, RpcError
from facilitator.evm.signatures import check_signature, try_recover
from facilitator.schemes.base import SettlementPlan
from facilitator.schemes.evm_batch import calldata
from facilitator.schemes.evm_batch.channel import (
    MAX_WITHDRAW_DELAY,
    MIN_WITHDRAW_DELAY,
    ZERO_ADDRESS,
    ChannelConfig,
    claim_batch_digest,
    parse_bytes32,
    parse_hex,
    parse_uint,
    recovers_to,
    refund_digest,
    voucher_digest,
)
from facilitator.schemes.evm_batch.state import ChannelState, read_channel
from facilitator.x402.identity import eip3009_key, permit2_key
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import PaymentRequirements, is_evm_address

DEADLINE_BUFFER_S = 6  # as the reference: refuse authorizations that expire within 6 s
MAX_CLAIMS_PER_BATCH = 100
RECEIVE_WITH_AUTHORIZATION_TYPEHASH = keccak(
    b"ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
)
DEPOSIT_WITNESS_TYPEHASH = keccak(b"DepositWitness(bytes32 channelId)")
DEPOSIT_PERMIT_WITNESS_TYPEHASH = keccak(
    b"PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,"
    b"DepositWitness witness)DepositWitness(bytes32 channelId)TokenPermissions(address token,uint256 amount)"
)


def _sha(*parts: bytes) -> str:
    return hashlib.sha256(b"".join(parts)).hexdigest()


def check_config(config: ChannelConfig, claimed_id: bytes, requirements: PaymentRequirements, chain_id: int) -> None:
    """The channel is the one these requirements describe (the SDK's checks, in its order)."""
    if config.channel_id(chain_id) != claimed_id:
        raise PaymentInvalidError(
            R.INVALID_BATCH_SETTLEMENT_EVM_CHANNEL_ID_MISMATCH, "channelConfig does not hash to voucher.channelId"
        )
    if config.receiver.lower() != requirements.pay_to.lower():
        raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_RECEIVER_MISMATCH, "channel receiver is not payTo")
    extra = requirements.extra or {}
    authorizer = extra.get("receiverAuthorizer")
    if (
        not isinstance(authorizer, str)
        or authorizer.lower() == ZERO_ADDRESS
        or config.receiver_authorizer.lower() != authorizer.lower()
    ):
        raise PaymentInvalidError(
            R.INVALID_BATCH_SETTLEMENT_EVM_RECEIVER_AUTHORIZER_MISMATCH, "channel receiverAuthorizer is not the required one"
        )
    if config.token.lower() != requirements.asset.lower():
        raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_TOKEN_MISMATCH, "channel token is not the asset")
    delay = extra.get("withdrawDelay")
    if delay is not None and str(config.withdraw_delay) != str(delay):
        raise PaymentInvalidError(
            R.INVALID_BATCH_SETTLEMENT_EVM_WITHDRAW_DELAY_MISMATCH, "channel withdrawDelay is not the required one"
        )
    if not MIN_WITHDRAW_DELAY <= config.withdraw_delay <= MAX_WITHDRAW_DELAY:
        raise PaymentInvalidError(
            R.INVALID_BATCH_SETTLEMENT_EVM_WITHDRAW_DELAY_OUT_OF_RANGE, "withdrawDelay must be 900 s to 30 days"
        )


@dataclass(frozen=True, slots=True)
class SignedVoucher:
    channel_id: bytes
    max_claimable: int
    signature: bytes

    @classmethod
    def from_wire(cls, raw: Any, reason: R) -> SignedVoucher:
        if not isinstance(raw, dict):
            raise PaymentInvalidError(reason, "voucher must be an object")
        return cls(
            parse_bytes32(raw.get("channelId"), reason, "voucher.channelId"),
            parse_uint(raw.get("maxClaimableAmount"), reason, "voucher.maxClaimableAmount"),
            parse_hex(raw.get("signature"), reason, "voucher.signature"),
        )


async def check_voucher_signature(chain: EvmChain, config: ChannelConfig, voucher: SignedVoucher, payer_code: Any) -> None:
    """ECDSA against the payerAuthorizer; with none, the payer's signature (ERC-1271 for a contract)."""
    digest = voucher_digest(chain.chain_id, voucher.channel_id, voucher.max_claimable)
    if config.payer_authorizer != ZERO_ADDRESS:
        if not recovers_to(digest, voucher.signature, config.payer_authorizer):
            raise PaymentInvalidError(
                R.INVALID_BATCH_SETTLEMENT_EVM_VOUCHER_SIGNATURE, "voucher not signed by the payerAuthorizer"
            )
        return
    if isinstance(payer_code, RpcError):
        raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_RPC_READ_FAILED, "payer code could not be read")
    await check_signature(
        chain.rpc, payer=config.payer, payer_b=address_bytes(config.payer), payer_code=payer_code, digest=digest,
        signature=voucher.signature, recovered=try_recover(digest, voucher.signature, require_low_s=True),
        invalid=R.INVALID_BATCH_SETTLEMENT_EVM_VOUCHER_SIGNATURE, undeployed=R.INVALID_BATCH_SETTLEMENT_EVM_VOUCHER_SIGNATURE,
    )  # fmt: skip


@dataclass(eq=False)
class _Operation:
    chain: EvmChain
    payer: str
    record_key: str
    digest: str
    nonce_used_reason: str = R.INVALID_TRANSACTION_STATE.value
    verify_extra: dict[str, Any] | None = field(default=None, init=False)

    @property
    def settle_amount(self) -> int:
        return 0

    def check_time(self, now: float) -> None:
        return None

    def plan(self) -> SettlementPlan:
        raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_PAYLOAD_TYPE, "this payload type is verified, not settled")

    async def _simulate(self, data: bytes, reason: R) -> None:
        result = await self.chain.rpc.batch(
            [Call("eth_call", [{"to": contracts.BATCH_SETTLEMENT, "data": "0x" + data.hex()}, "latest"])]
        )
        if isinstance(result[0], RpcError):
            raise PaymentInvalidError(reason, f"simulation reverted: {result[0].message}"[:200])


# ---------------------------------------------------------------------------------------------
# voucher / refund (verify)


@dataclass(eq=False)
class VoucherCheck(_Operation):
    config: ChannelConfig = field(default=None)  # type: ignore[assignment]
    voucher: SignedVoucher = field(default=None)  # type: ignore[assignment]
    refund: bool = False

    async def confirm(self, *, fresh: bool = True) -> None:
        state, (code,) = await read_channel(self.chain, self.voucher.channel_id, Call("eth_getCode", [self.payer, "latest"]))
        await check_voucher_signature(self.chain, self.config, self.voucher, code)
        if state.balance == 0:
            raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_CHANNEL_NOT_FOUND, "no channel with a positive balance")
        if self.voucher.max_claimable > state.balance:
            raise PaymentInvalidError(
                R.INVALID_BATCH_SETTLEMENT_EVM_CUMULATIVE_EXCEEDS_BALANCE, "voucher above the channel's balance"
            )
        below = (
            self.voucher.max_claimable < state.total_claimed if self.refund else self.voucher.max_claimable <= state.total_claimed
        )
        if below:
            raise PaymentInvalidError(
                R.INVALID_BATCH_SETTLEMENT_EVM_CUMULATIVE_BELOW_CLAIMED, "voucher not above what was claimed"
            )
        self.verify_extra = state.to_wire()


def prepare_voucher(chain: EvmChain, inner: dict[str, Any], requirements: PaymentRequirements, *, refund: bool) -> VoucherCheck:
    reason = R.INVALID_BATCH_SETTLEMENT_EVM_REFUND_PAYLOAD if refund else R.INVALID_BATCH_SETTLEMENT_EVM_VOUCHER_PAYLOAD
    config = ChannelConfig.from_wire(inner.get("channelConfig"), reason)
    voucher = SignedVoucher.from_wire(inner.get("voucher"), reason)
    check_config(config, voucher.channel_id, requirements, chain.chain_id)
    if refund and inner.get("amount") is not None:  # a partial refund names a decimal amount
        parse_uint(inner.get("amount"), R.INVALID_BATCH_SETTLEMENT_EVM_REFUND_AMOUNT_INVALID, "amount")
    key = f"{chain.network}:batch-voucher:{voucher.channel_id.hex()}:{voucher.max_claimable}"
    return VoucherCheck(
        chain, config.payer, key, _sha(voucher.channel_id, voucher.signature), config=config, voucher=voucher, refund=refund
    )


# ---------------------------------------------------------------------------------------------
# deposit (verify, settle)


@dataclass(eq=False)
class DepositOp(_Operation):
    config: ChannelConfig = field(default=None)  # type: ignore[assignment]
    voucher: SignedVoucher = field(default=None)  # type: ignore[assignment]
    amount: int = 0
    method: str = "eip3009"
    collector: str = ""
    collector_data: bytes = b""
    auth_digest: bytes = b""
    auth_signature: bytes = b""
    auth_nonce: bytes = b""  # ERC-3009 nonce (keccak(channelId, salt))
    valid_after: int = 0
    valid_before: int = 0  # ERC-3009 validBefore, Permit2 deadline
    state: ChannelState | None = None

    @property
    def settle_amount(self) -> int:
        return self.amount

    def check_time(self, now: float) -> None:
        if self.method == "permit2":
            if self.valid_before < now + DEADLINE_BUFFER_S:
                raise PaymentInvalidError(
                    R.INVALID_BATCH_SETTLEMENT_EVM_PERMIT2_DEADLINE_EXPIRED, "permit expired or expires within 6 s"
                )
            return
        if self.valid_before < now + DEADLINE_BUFFER_S:
            raise PaymentInvalidError(
                R.INVALID_BATCH_SETTLEMENT_EVM_PAYLOAD_AUTHORIZATION_VALID_BEFORE, "authorization expired or expires within 6 s"
            )
        if self.valid_after > now:
            raise PaymentInvalidError(
                R.INVALID_BATCH_SETTLEMENT_EVM_PAYLOAD_AUTHORIZATION_VALID_AFTER, "authorization is not yet valid"
            )

    def _tx_data(self) -> bytes:
        return calldata.deposit(self.config, self.amount, self.collector, self.collector_data)

    async def confirm(self, *, fresh: bool = True) -> None:
        payer_b = address_bytes(self.payer)
        token = self.config.token
        extra = [
            Call("eth_getCode", [self.payer, "latest"]),
            Call("eth_call", [{"to": token, "data": contracts.balance_of(payer_b)}, "latest"]),
        ]
        if self.method == "permit2":
            extra.append(Call("eth_call", [{"to": token, "data": contracts.allowance(payer_b, self.chain.permit2_b)}, "latest"]))
        extra.append(Call("eth_call", [{"to": contracts.BATCH_SETTLEMENT, "data": "0x" + self._tx_data().hex()}, "latest"]))
        state, (code, balance, *rest) = await read_channel(self.chain, self.voucher.channel_id, *extra)
        simulated = rest.pop()
        is_eoa = code in ("0x", "", None)
        if is_eoa and try_recover(self.auth_digest, self.auth_signature) != payer_b:
            raise PaymentInvalidError(
                R.INVALID_BATCH_SETTLEMENT_EVM_PERMIT2_INVALID_SIGNATURE
                if self.method == "permit2"
                else R.INVALID_BATCH_SETTLEMENT_EVM_RECEIVE_AUTHORIZATION_SIGNATURE,
                "deposit authorization not signed by the payer",
            )
        if self.method == "permit2":
            allowance = rest[0]
            if isinstance(allowance, RpcError) or contracts.decode_uint(allowance) < self.amount:
                raise PaymentInvalidError(
                    R.INVALID_BATCH_SETTLEMENT_EVM_PERMIT2_ALLOWANCE_REQUIRED, "payer has not approved Permit2 for the amount"
                )
        await check_voucher_signature(self.chain, self.config, self.voucher, code)
        if isinstance(balance, RpcError) or contracts.decode_uint(balance) < self.amount:
            raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_INSUFFICIENT_BALANCE, "payer balance is below the deposit")
        if self.voucher.max_claimable > state.balance + self.amount:
            raise PaymentInvalidError(
                R.INVALID_BATCH_SETTLEMENT_EVM_CUMULATIVE_EXCEEDS_BALANCE, "voucher above the balance after the deposit"
            )
        if self.voucher.max_claimable <= state.total_claimed:
            raise PaymentInvalidError(
                R.INVALID_BATCH_SETTLEMENT_EVM_CUMULATIVE_BELOW_CLAIMED, "voucher not above what was claimed"
            )
        if isinstance(simulated, RpcError):
            raise PaymentInvalidError(
                R.INVALID_BATCH_SETTLEMENT_EVM_DEPOSIT_SIMULATION_FAILED,
                f"deposit simulation reverted: {simulated.message}"[:200],
            )
        self.state = state
        self.verify_extra = state.to_wire()

    def plan(self) -> SettlementPlan:
        assert self.state is not None
        after = ChannelState(
            self.state.channel_id,
            self.state.balance + self.amount,
            self.state.total_claimed,
            self.state.withdraw_requested_at,
            self.state.refund_nonce,
        )
        # ERC-3009 moves payer -> collector -> escrow; Permit2 payer -> escrow: the first hop is checked.
        first_hop = self.collector if self.method == "eip3009" else contracts.BATCH_SETTLEMENT
        return SettlementPlan(
            payer=self.payer,
            amount=self.amount,
            asset=self.config.token,
            pay_to=first_hop,
            tx_to=contracts.BATCH_SETTLEMENT,
            tx_data=self._tx_data(),
            gas=calldata.GAS_DEPOSIT,
            extra={"channelState": after.to_wire()},
        )


def prepare_deposit(chain: EvmChain, inner: dict[str, Any], requirements: PaymentRequirements, *, now: float) -> DepositOp:
    reason = R.INVALID_BATCH_SETTLEMENT_EVM_DEPOSIT_PAYLOAD
    config = ChannelConfig.from_wire(inner.get("channelConfig"), reason)
    voucher = SignedVoucher.from_wire(inner.get("voucher"), reason)
    deposit = inner.get("deposit")
    if not isinstance(deposit, dict) or not isinstance(deposit.get("authorization"), dict):
        raise PaymentInvalidError(reason, "deposit.authorization must be an object")
    check_config(config, voucher.channel_id, requirements, chain.chain_id)
    amount = parse_uint(deposit.get("amount"), reason, "deposit.amount")
    if amount == 0:
        raise PaymentInvalidError(reason, "deposit.amount must be positive")
    auth = deposit["authorization"]
    hinted = (requirements.extra or {}).get("assetTransferMethod")
    method = hinted if hinted in ("permit2", "eip3009") else ("permit2" if "permit2Authorization" in auth else "eip3009")
    op = DepositOp(chain, config.payer, "", "", config=config, voucher=voucher, amount=amount, method=method)
    if method == "permit2":
        _prepare_permit2_deposit(op, auth.get("permit2Authorization"), requirements)
    else:
        _prepare_erc3009_deposit(op, auth.get("erc3009Authorization"), requirements)
    op.digest = _sha(op.auth_digest, op.auth_signature, voucher.signature)
    op.check_time(now)
    return op


def _prepare_erc3009_deposit(op: DepositOp, auth: Any, requirements: PaymentRequirements) -> None:
    if not isinstance(auth, dict):
        raise PaymentInvalidError(
            R.INVALID_BATCH_SETTLEMENT_EVM_ERC3009_AUTHORIZATION_REQUIRED, "erc3009Authorization is missing"
        )
    extra = requirements.extra or {}
    name, version = extra.get("name"), extra.get("version")
    if not isinstance(name, str) or not isinstance(version, str) or not name or not version:
        raise PaymentInvalidError(
            R.INVALID_BATCH_SETTLEMENT_EVM_MISSING_EIP712_DOMAIN, "extra.name and extra.version are required"
        )
    reason = R.INVALID_BATCH_SETTLEMENT_EVM_DEPOSIT_PAYLOAD
    op.valid_after = parse_uint(auth.get("validAfter"), reason, "validAfter", bits=256)
    op.valid_before = parse_uint(auth.get("validBefore"), reason, "validBefore", bits=256)
    salt_b = parse_bytes32(auth.get("salt"), reason, "salt")
    op.auth_signature = parse_hex(
        auth.get("signature"), R.INVALID_BATCH_SETTLEMENT_EVM_RECEIVE_AUTHORIZATION_SIGNATURE, "signature"
    )
    op.auth_nonce = keccak(op.voucher.channel_id + salt_b)
    op.collector = contracts.ERC3009_DEPOSIT_COLLECTOR
    separator = token_domain_separator(name, version, op.chain.chain_id, address_bytes(op.config.token))
    op.auth_digest = typed_digest(
        separator,
        keccak(
            RECEIVE_WITH_AUTHORIZATION_TYPEHASH
            + word_address(address_bytes(op.payer))
            + word_address(address_bytes(op.collector))
            + word_uint(op.amount)
            + word_uint(op.valid_after)
            + word_uint(op.valid_before)
            + op.auth_nonce
        ),
    )
    op.collector_data = calldata.erc3009_collector_data(
        op.valid_after, op.valid_before, int.from_bytes(salt_b, "big"), op.auth_signature
    )
    op.record_key = eip3009_key(op.chain.network, op.config.token, op.payer, "0x" + op.auth_nonce.hex())
    op.nonce_used_reason = R.INVALID_EXACT_EVM_NONCE_ALREADY_USED.value


def _prepare_permit2_deposit(op: DepositOp, auth: Any, requirements: PaymentRequirements) -> None:
    if not isinstance(auth, dict):
        raise PaymentInvalidError(
            R.INVALID_BATCH_SETTLEMENT_EVM_PERMIT2_AUTHORIZATION_REQUIRED, "permit2Authorization is missing"
        )
    reason = R.INVALID_BATCH_SETTLEMENT_EVM_DEPOSIT_PAYLOAD
    permitted, witness = auth.get("permitted"), auth.get("witness")
    if not isinstance(permitted, dict) or not isinstance(witness, dict):
        raise PaymentInvalidError(reason, "permit2Authorization.permitted/witness must be objects")
    owner, spender, token = auth.get("from"), auth.get("spender"), permitted.get("token")
    if not all(isinstance(a, str) and len(a) == 42 and a.startswith("0x") for a in (owner, spender, token)):
        raise PaymentInvalidError(reason, "permit2Authorization addresses are malformed")
    assert isinstance(owner, str) and isinstance(spender, str) and isinstance(token, str)
    if owner.lower() != op.payer.lower():
        raise PaymentInvalidError(
            R.INVALID_BATCH_SETTLEMENT_EVM_PERMIT2_INVALID_SIGNATURE, "permit2Authorization.from is not the payer"
        )
    if spender.lower() != contracts.PERMIT2_DEPOSIT_COLLECTOR.lower():
        raise PaymentInvalidError(
            R.INVALID_BATCH_SETTLEMENT_EVM_PERMIT2_INVALID_SPENDER, "spender is not the Permit2 deposit collector"
        )
    if token.lower() != requirements.asset.lower():
        raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_TOKEN_MISMATCH, "permitted token is not the asset")
    if parse_uint(permitted.get("amount"), reason, "permitted.amount", bits=256) != op.amount:
        raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_PERMIT2_AMOUNT_MISMATCH, "permitted amount is not the deposit")
    if parse_bytes32(witness.get("channelId"), reason, "witness.channelId") != op.voucher.channel_id:
        raise PaymentInvalidError(
            R.INVALID_BATCH_SETTLEMENT_EVM_CHANNEL_ID_MISMATCH, "the permit's witness names another channel"
        )
    nonce = parse_uint(auth.get("nonce"), reason, "nonce", bits=256)
    op.valid_before = parse_uint(auth.get("deadline"), reason, "deadline", bits=256)
    op.auth_signature = parse_hex(auth.get("signature"), R.INVALID_BATCH_SETTLEMENT_EVM_PERMIT2_INVALID_SIGNATURE, "signature")
    op.collector = contracts.PERMIT2_DEPOSIT_COLLECTOR
    permitted_hash = keccak(TOKEN_PERMISSIONS_TYPEHASH + word_address(address_bytes(token)) + word_uint(op.amount))
    witness_hash = keccak(DEPOSIT_WITNESS_TYPEHASH + op.voucher.channel_id)
    op.auth_digest = typed_digest(
        permit2_domain_separator(op.chain.chain_id, op.chain.permit2_b),
        keccak(
            DEPOSIT_PERMIT_WITNESS_TYPEHASH
            + permitted_hash
            + word_address(address_bytes(spender))
            + word_uint(nonce)
            + word_uint(op.valid_before)
            + witness_hash
        ),
    )
    op.collector_data = calldata.permit2_collector_data(nonce, op.valid_before, op.auth_signature)
    op.record_key = permit2_key(op.chain.network, op.payer, nonce)
    op.nonce_used_reason = R.PERMIT2_INVALID_NONCE.value


# ---------------------------------------------------------------------------------------------
# claim (settle)


def _claim_rows(raw: Any, reason: R) -> list[calldata.ClaimRow]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_CLAIMS_PER_BATCH:
        raise PaymentInvalidError(reason, f"claims must be a list of 1 to {MAX_CLAIMS_PER_BATCH} rows")
    rows: list[calldata.ClaimRow] = []
    for row in raw:
        if not isinstance(row, dict) or not isinstance(row.get("voucher"), dict):
            raise PaymentInvalidError(reason, "a claim row needs voucher.channel and voucher.maxClaimableAmount")
        voucher = row["voucher"]
        config = ChannelConfig.from_wire(voucher.get("channel"), reason)
        max_claimable = parse_uint(voucher.get("maxClaimableAmount"), reason, "maxClaimableAmount")
        total = parse_uint(row.get("totalClaimed"), reason, "totalClaimed")
        if total > max_claimable:
            raise PaymentInvalidError(reason, "totalClaimed above the voucher's maxClaimableAmount")
        rows.append((config, max_claimable, parse_hex(row.get("signature"), reason, "signature"), total))
    return rows


def _authorizer_signature(raw: Any, authorizer: str, digest: bytes, reason: R) -> bytes:
    if raw is None:
        raise PaymentInvalidError(
            R.INVALID_BATCH_SETTLEMENT_EVM_AUTHORIZER_NOT_CONFIGURED,
            "this facilitator holds no receiver-authorizer key: sign the payload",
        )
    signature = parse_hex(raw, reason, "authorizer signature")
    if len(signature) == 65 and not recovers_to(digest, signature, authorizer):
        raise PaymentInvalidError(
            R.INVALID_BATCH_SETTLEMENT_EVM_AUTHORIZER_ADDRESS_MISMATCH, "not signed by the channels' receiverAuthorizer"
        )
    return signature


@dataclass(eq=False)
class ClaimOp(_Operation):
    tx_data: bytes = b""
    rows: int = 0

    async def confirm(self, *, fresh: bool = True) -> None:
        await self._simulate(self.tx_data, R.INVALID_BATCH_SETTLEMENT_EVM_CLAIM_SIMULATION_FAILED)

    def plan(self) -> SettlementPlan:
        return SettlementPlan(
            payer=self.payer,
            amount=0,
            asset="",
            pay_to="",
            tx_to=contracts.BATCH_SETTLEMENT,
            tx_data=self.tx_data,
            gas=calldata.GAS_CLAIM_BASE + calldata.GAS_CLAIM_PER_ROW * self.rows,
            transfers=False,
            response_amount="",
        )


def prepare_claim(chain: EvmChain, inner: dict[str, Any]) -> ClaimOp:
    reason = R.INVALID_BATCH_SETTLEMENT_EVM_CLAIM_PAYLOAD
    rows = _claim_rows(inner.get("claims"), reason)
    authorizer = rows[0][0].receiver_authorizer
    if any(config.receiver_authorizer != authorizer for config, *_ in rows):
        raise PaymentInvalidError(
            R.INVALID_BATCH_SETTLEMENT_EVM_AUTHORIZER_ADDRESS_MISMATCH, "all rows must share one receiverAuthorizer"
        )
    entries = [(config.channel_id(chain.chain_id), m, t) for config, m, _, t in rows]
    digest = claim_batch_digest(chain.chain_id, entries)
    signature = _authorizer_signature(inner.get("claimAuthorizerSignature"), authorizer, digest, reason)
    # One record per signed batch: the same batch sent twice (a retry, another replica) is one claim.
    return ClaimOp(
        chain,
        authorizer,
        f"{chain.network}:batch-claim:{digest.hex()}",
        _sha(digest),
        tx_data=calldata.claim_with_signature(rows, signature),
        rows=len(rows),
    )


# ---------------------------------------------------------------------------------------------
# settle (settle): sweep claimed funds to the receiver


@dataclass(eq=False)
class SweepOp(_Operation):
    receiver: str = ""
    token: str = ""
    due: int = 0

    @property
    def settle_amount(self) -> int:
        return self.due

    async def confirm(self, *, fresh: bool = True) -> None:
        result = await self.chain.rpc.batch(
            [
                Call(
                    "eth_call",
                    [{"to": contracts.BATCH_SETTLEMENT, "data": calldata.receivers_read(self.receiver, self.token)}, "latest"],
                )
            ]
        )
        if isinstance(result[0], RpcError) or not isinstance(result[0], str):
            raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_RPC_READ_FAILED, "receivers() could not be read")
        claimed, settled = calldata.decode_pair(result[0])
        self.due = claimed - settled

    def plan(self) -> SettlementPlan:
        return SettlementPlan(
            payer=contracts.BATCH_SETTLEMENT,
            amount=self.due,
            asset=self.token,
            pay_to=self.receiver,
            tx_to=contracts.BATCH_SETTLEMENT,
            tx_data=calldata.settle(self.receiver, self.token),
            gas=calldata.GAS_SETTLE,
        )


def prepare_sweep(chain: EvmChain, inner: dict[str, Any]) -> SweepOp:
    reason = R.INVALID_BATCH_SETTLEMENT_EVM_SETTLE_PAYLOAD
    receiver, token = inner.get("receiver"), inner.get("token")
    if not (is_evm_address(receiver) and is_evm_address(token)):
        raise PaymentInvalidError(reason, "receiver and token must be addresses: 0x and 40 hex digits")
    assert isinstance(receiver, str) and isinstance(token, str)
    # settle() is idempotent on chain (a second one moves nothing), so each request is its own record.
    key = f"{chain.network}:batch-settle:{receiver.lower()}:{token.lower()}:{secrets.token_hex(8)}"
    return SweepOp(chain, receiver, key, _sha(key.encode()), receiver=receiver, token=token)


# ---------------------------------------------------------------------------------------------
# refund (settle): claim what is owed, then return the rest


@dataclass(eq=False)
class RefundOp(_Operation):
    config: ChannelConfig = field(default=None)  # type: ignore[assignment]
    channel_id: bytes = b""
    requested: int | None = None  # None: everything unclaimed
    nonce: int = 0
    rows: list[calldata.ClaimRow] = field(default_factory=list)
    claim_signature: bytes = b""
    refund_signature: bytes = b""
    refunded: int = 0
    state: ChannelState | None = None

    @property
    def settle_amount(self) -> int:
        return self.refunded

    def _tx_data(self, amount: int) -> bytes:
        refund = calldata.refund_with_signature(self.config, amount, self.nonce, self.refund_signature)
        if not self.rows:
            return refund
        return calldata.multicall([calldata.claim_with_signature(self.rows, self.claim_signature), refund])

    async def confirm(self, *, fresh: bool = True) -> None:
        state, _ = await read_channel(self.chain, self.channel_id)
        if state.refund_nonce != self.nonce:
            raise PaymentInvalidError(
                R.INVALID_BATCH_SETTLEMENT_EVM_REFUND_PAYLOAD, f"refundNonce is {state.refund_nonce}, not {self.nonce}"
            )
        claimed = max(
            [state.total_claimed, *(t for c, _, _, t in self.rows if c.channel_id(self.chain.chain_id) == self.channel_id)]
        )
        unclaimed = state.balance - claimed
        amount = unclaimed if self.requested is None else min(self.requested, unclaimed)
        if amount <= 0:
            raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_REFUND_NO_BALANCE, "nothing unclaimed to refund")
        if self.requested is not None and amount != self.requested:
            raise PaymentInvalidError(
                R.INVALID_BATCH_SETTLEMENT_EVM_REFUND_AMOUNT_INVALID, "refund amount above what is unclaimed"
            )
        self.refunded = amount
        await self._simulate(self._tx_data(self._signed_amount()), R.INVALID_BATCH_SETTLEMENT_EVM_REFUND_SIMULATION_FAILED)
        self.state = ChannelState(
            self.channel_id, state.balance - amount, claimed, state.withdraw_requested_at, state.refund_nonce + 1
        )

    def _signed_amount(self) -> int:
        # The Refund signature binds the amount sent; a full refund is signed for what is unclaimed.
        return self.requested if self.requested is not None else self.refunded

    def plan(self) -> SettlementPlan:
        assert self.state is not None
        return SettlementPlan(
            payer=contracts.BATCH_SETTLEMENT,
            amount=self.refunded,
            asset=self.config.token,
            pay_to=self.config.payer,
            tx_to=contracts.BATCH_SETTLEMENT,
            tx_data=self._tx_data(self._signed_amount()),
            gas=calldata.GAS_REFUND + calldata.GAS_CLAIM_PER_ROW * len(self.rows),
            extra={"channelState": self.state.to_wire()},
        )


def prepare_refund(chain: EvmChain, inner: dict[str, Any], requirements: PaymentRequirements) -> RefundOp:
    reason = R.INVALID_BATCH_SETTLEMENT_EVM_REFUND_PAYLOAD
    config = ChannelConfig.from_wire(inner.get("channelConfig"), reason)
    voucher = SignedVoucher.from_wire(inner.get("voucher"), reason)
    check_config(config, voucher.channel_id, requirements, chain.chain_id)
    nonce = parse_uint(inner.get("refundNonce"), reason, "refundNonce", bits=256)
    requested = (
        None
        if inner.get("amount") is None
        else parse_uint(inner.get("amount"), R.INVALID_BATCH_SETTLEMENT_EVM_REFUND_AMOUNT_INVALID, "amount")
    )
    if requested == 0:
        raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_REFUND_AMOUNT_INVALID, "refund amount must be positive")
    rows = _claim_rows(inner["claims"], reason) if inner.get("claims") else []
    op = RefundOp(
        chain,
        config.payer,
        f"{chain.network}:batch-refund:{voucher.channel_id.hex()}:{nonce}",
        "",
        config=config,
        channel_id=voucher.channel_id,
        requested=requested,
        nonce=nonce,
        rows=rows,
    )
    if rows:
        entries = [(c.channel_id(chain.chain_id), m, t) for c, m, _, t in rows]
        op.claim_signature = _authorizer_signature(
            inner.get("claimAuthorizerSignature"), config.receiver_authorizer, claim_batch_digest(chain.chain_id, entries), reason
        )
    # A full refund's amount is only known on chain: its signature is checked by the simulation.
    raw_sig = inner.get("refundAuthorizerSignature")
    if requested is not None:
        op.refund_signature = _authorizer_signature(
            raw_sig, config.receiver_authorizer, refund_digest(chain.chain_id, voucher.channel_id, nonce, requested), reason
        )
    else:
        if raw_sig is None:
            raise PaymentInvalidError(
                R.INVALID_BATCH_SETTLEMENT_EVM_AUTHORIZER_NOT_CONFIGURED, "refundAuthorizerSignature is required"
            )
        op.refund_signature = parse_hex(raw_sig, reason, "refundAuthorizerSignature")
    op.digest = _sha(voucher.channel_id, word_uint(nonce), op.refund_signature)
    return op
