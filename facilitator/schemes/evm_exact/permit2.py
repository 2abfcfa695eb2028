"""`exact` (and `upto`) through Permit2's permitWitnessTransferFrom and an x402 proxy.

Local checks follow the reference facilitator's order (x402-protocol.md §3.3, §4.3) so we name
the same reason it would; then one JSON-RPC batch reads the payer's code, Permit2 allowance,
balance and Permit2 nonce bit. Unlike the reference we refuse a nonce already used on-chain at
verify time (its verify accepts a settled Permit2 payment again); a repeat payer's verify answered
from the state cache leaves the nonce to the settlement's re-check (facilitator/evm/statecache.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from facilitator.errors import ChainUnavailableError, PaymentInvalidError
from facilitator.evm import contracts
from facilitator.evm.chain import EvmChain
from facilitator.evm.eip712 import address_bytes, expand_signature, permit2_witness_digest
from facilitator.evm.eip712 import checksum_address as _checksum
from facilitator.evm.rpc import Call, RpcError, RpcUnavailableError
from facilitator.evm.signatures import check_signature, try_recover
from facilitator.evm.statecache import UNREAD, Effect
from facilitator.schemes.base import SettlementPlan, payment_digest
from facilitator.x402.identity import permit2_key
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import ExactPermit2Payload, PaymentRequirements

DEADLINE_BUFFER_S = 6  # as the reference: refuse permits that expire within 6 s


@dataclass(eq=False)
class Permit2Payment:
    chain: EvmChain
    upto: bool
    payer: str
    payer_b: bytes
    token: str
    token_b: bytes
    permitted: int
    nonce: int
    deadline: int
    to: str
    valid_after: int
    facilitator: str | None
    signature: bytes
    digest_b: bytes
    recovered: bytes | None
    settle_amount: int
    record_key: str
    digest: str
    nonce_used_reason: str = R.PERMIT2_INVALID_NONCE.value
    payer_is_eoa: bool = False  # known after confirm()

    @property
    def verify_extra(self) -> dict[str, Any] | None:
        return None

    def check_time(self, now: float) -> None:
        """The time checks of prepare(), again: a payment prepared at verify and settled later."""
        check_permit2_window(self.deadline, self.valid_after, now)

    async def confirm(self, *, fresh: bool = True) -> None:
        """The chain checks (one round trip); raises PaymentInvalidError. The settlement call
        data is built only when settling (`plan()`), not on every verify. `fresh=False` (verify):
        reads may come from the chain's state cache, and the payer's settlements in flight count
        against its balance; the settlement's re-check reads the chain."""
        chain = self.chain
        reads = self._reads()
        check_asset = self.token.lower() not in chain.asset_has_code
        if check_asset:
            reads.append(Call("eth_getCode", [self.token, "latest"]))
        try:
            if fresh or not chain.state.enabled or not chain.state.watch(self.token):
                results = await chain.rpc.batch(reads)
            else:
                results = await chain.state.read(self.payer, reads, optional=(3,))  # the nonce: see statecache
        except RpcUnavailableError as exc:
            raise ChainUnavailableError(str(exc)) from exc
        payer_code, allowance, balance, bitmap = results[:4]
        if check_asset:
            code = results[4]
            if isinstance(code, RpcError):
                raise ChainUnavailableError(f"eth_getCode failed: {code.message}")
            if code in ("0x", ""):
                raise PaymentInvalidError(R.ASSET_NOT_DEPLOYED_CONTRACT, f"no contract at asset {self.token}")
            chain.asset_has_code.add(self.token.lower())
        if isinstance(payer_code, RpcError):
            raise ChainUnavailableError(f"eth_getCode failed: {payer_code.message}")
        self.payer_is_eoa = payer_code in ("0x", "", None)
        await check_signature(
            chain.rpc,
            payer=self.payer,
            payer_b=self.payer_b,
            payer_code=payer_code,
            digest=self.digest_b,
            signature=self.signature,
            recovered=self.recovered,
            invalid=R.INVALID_PERMIT2_SIGNATURE,
            undeployed=R.INVALID_EXACT_EVM_PAYLOAD_UNDEPLOYED_SMART_WALLET,
        )
        if isinstance(allowance, RpcError) or isinstance(balance, RpcError):
            raise PaymentInvalidError(R.BALANCE_CHECK_FAILED, "allowance/balance read reverted")
        # what this transfer takes: an upto settlement moves only the charge, not the signed maximum
        # (a payer that kept what it owes is settled, as the SDK's facilitator does)
        need = self.settle_amount + (0 if fresh else chain.state.inflight(self.token, self.payer))
        if contracts.decode_uint(allowance) < need:
            raise PaymentInvalidError(R.PERMIT2_ALLOWANCE_REQUIRED, "payer has not approved Permit2 for this amount")
        if contracts.decode_uint(balance) < need:
            reason = R.PERMIT2_INSUFFICIENT_BALANCE if self.upto else R.INVALID_EXACT_EVM_INSUFFICIENT_BALANCE
            raise PaymentInvalidError(reason, "payer balance is below the amount")
        if bitmap is UNREAD:
            return
        if isinstance(bitmap, RpcError):
            raise ChainUnavailableError(f"nonceBitmap read failed: {bitmap.message}")
        if (contracts.decode_uint(bitmap) >> (self.nonce & 0xFF)) & 1:
            raise PaymentInvalidError(R.PERMIT2_INVALID_NONCE, "Permit2 nonce already used on-chain")

    def _reads(self) -> list[Call]:
        """code, Permit2 allowance, balance, nonce word (in this order)."""
        chain = self.chain
        return [
            Call("eth_getCode", [self.payer, "latest"]),
            Call("eth_call", [{"to": self.token, "data": contracts.allowance(self.payer_b, chain.permit2_b)}, "latest"]),
            Call("eth_call", [{"to": self.token, "data": contracts.balance_of(self.payer_b)}, "latest"]),
            Call("eth_call", [{"to": chain.permit2, "data": contracts.nonce_bitmap(self.payer_b, self.nonce >> 8)}, "latest"]),
        ]

    def _effects(self) -> tuple[Effect, ...]:
        _, allowance, balance, bitmap = self._reads()
        return (Effect(allowance, "debit_unless_max", self.settle_amount), Effect(balance, "debit", self.settle_amount),
                Effect(bitmap, "set_bit", self.nonce & 0xFF))

    def plan(self) -> SettlementPlan:
        # Verify reads v as 0/1 or 27/28 and EIP-2098's 64 bytes; Permit2's ecrecover wants v 27/28.
        signature = expand_signature(self.signature) if self.payer_is_eoa else self.signature
        if self.upto:
            assert self.facilitator is not None
            data = contracts.upto_proxy_settle(
                token=self.token, permitted=self.permitted, nonce=self.nonce, deadline=self.deadline,
                amount=self.settle_amount, owner=self.payer, to=self.to, facilitator=self.facilitator,
                valid_after=self.valid_after, signature=signature,
            )  # fmt: skip
            target = self.chain.upto_proxy
        else:
            data = contracts.exact_proxy_settle(
                token=self.token, amount=self.permitted, nonce=self.nonce, deadline=self.deadline,
                owner=self.payer, to=self.to, valid_after=self.valid_after, signature=signature,
            )  # fmt: skip
            target = self.chain.exact_proxy
        return SettlementPlan(
            payer=self.payer,
            amount=self.settle_amount,
            asset=self.token,
            pay_to=self.to,
            tx_to=target,
            tx_data=data,
            gas=contracts.GAS_PERMIT2_SETTLE,
            sender=self.facilitator,
            effects=self._effects(),
        )


def check_permit2_window(deadline: int, valid_after: int, now: float) -> None:
    if deadline < now + DEADLINE_BUFFER_S:
        raise PaymentInvalidError(R.PERMIT2_DEADLINE_EXPIRED, "permit deadline has passed or is within 6 s")
    if valid_after > now:
        raise PaymentInvalidError(R.PERMIT2_NOT_YET_VALID, "validAfter is in the future")


def prepare_permit2(
    chain: EvmChain,
    raw_payload: dict,
    requirements: PaymentRequirements,
    *,
    now: float,
    upto: bool = False,
    facilitator_addresses: frozenset[str] = frozenset(),
    settle: bool = False,
) -> Permit2Payment:
    try:
        payload = ExactPermit2Payload.model_validate(raw_payload)
    except ValidationError as exc:
        raise PaymentInvalidError(R.INVALID_PERMIT2_PAYLOAD_FORMAT, _first_error(exc)) from None
    auth = payload.permit2_authorization
    spender = chain.upto_proxy if upto else chain.exact_proxy
    if auth.spender.lower() != spender.lower():
        raise PaymentInvalidError(R.INVALID_PERMIT2_SPENDER, f"spender must be {spender}")
    if auth.witness.to.lower() != requirements.pay_to.lower():
        raise PaymentInvalidError(R.INVALID_PERMIT2_RECIPIENT_MISMATCH, "witness.to is not payTo")
    facilitator = auth.witness.facilitator
    if upto:
        if facilitator is None or facilitator.lower() not in facilitator_addresses:
            raise PaymentInvalidError(R.UPTO_FACILITATOR_MISMATCH, "witness.facilitator is not one of our signers")
    elif facilitator is not None:
        raise PaymentInvalidError(R.INVALID_PERMIT2_PAYLOAD_FORMAT, "exact witness has no facilitator field")
    try:
        deadline = int(auth.deadline)
        valid_after = int(auth.witness.valid_after)
        permitted = int(auth.permitted.amount)
        nonce = int(auth.nonce)
    except (TypeError, ValueError):
        raise PaymentInvalidError(R.INVALID_PERMIT2_PAYLOAD_FORMAT,
                                  "deadline, validAfter, amount, nonce must be integers") from None
    if not (0 <= nonce < 2**256 and 0 <= deadline < 2**256 and 0 <= valid_after < 2**256 and 0 <= permitted < 2**256):
        raise PaymentInvalidError(R.INVALID_PERMIT2_PAYLOAD_FORMAT, "integer out of uint256 range")
    check_permit2_window(deadline, valid_after, now)
    required = int(requirements.amount)
    settle_amount = permitted
    if upto and settle:
        # upto settle: requirements.amount is the actual charge, at most the signed maximum.
        if required > permitted:
            raise PaymentInvalidError(
                R.INVALID_UPTO_EVM_PAYLOAD_SETTLEMENT_EXCEEDS_AMOUNT, "settlement amount exceeds the signed maximum"
            )
        settle_amount = required
    elif permitted != required:
        raise PaymentInvalidError(R.PERMIT2_AMOUNT_MISMATCH, "signed amount differs from the required amount")
    if auth.permitted.token.lower() != requirements.asset.lower():
        raise PaymentInvalidError(R.PERMIT2_TOKEN_MISMATCH, "permitted token is not the required asset")
    if permitted == 0:
        raise PaymentInvalidError(R.INVALID_PERMIT2_AMOUNT, "amount must be positive")
    try:
        signature = bytes.fromhex(payload.signature[2:])
        payer_b = address_bytes(auth.from_)
        token_b = address_bytes(auth.permitted.token)
        to_b = address_bytes(auth.witness.to)
    except ValueError:
        raise PaymentInvalidError(R.INVALID_PERMIT2_PAYLOAD_FORMAT, "malformed hex") from None
    digest_b = permit2_witness_digest(
        chain_id=chain.chain_id,
        permit2=chain.permit2_b,
        token=token_b,
        amount=permitted,
        spender=address_bytes(spender),
        nonce=nonce,
        deadline=deadline,
        to=to_b,
        valid_after=valid_after,
        facilitator=address_bytes(facilitator) if upto and facilitator else None,
    )
    recovered = try_recover(digest_b, signature)
    payer = _checksum(auth.from_)
    return Permit2Payment(
        chain=chain,
        upto=upto,
        payer=payer,
        payer_b=payer_b,
        token=_checksum(auth.permitted.token),
        token_b=token_b,
        permitted=permitted,
        nonce=nonce,
        deadline=deadline,
        to=_checksum(auth.witness.to),
        valid_after=valid_after,
        facilitator=_checksum(facilitator) if facilitator else None,
        signature=signature,
        digest_b=digest_b,
        recovered=recovered,
        settle_amount=settle_amount,
        record_key=permit2_key(chain.network, payer, nonce),
        digest=payment_digest(digest_b, signature),
    )


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    return f"{loc}: {err.get('msg', 'invalid')}"
