"""`exact` through EIP-3009 transferWithAuthorization (USDC-style tokens).

Local checks in the reference's order (x402-protocol.md §3.2); then one batch reads the payer's
code, balance, the authorization's nonce state and (once per token and domain) the token's
DOMAIN_SEPARATOR, so a wrong `extra.name`/`version` is refused at verify instead of reverting at
settle. Signatures must have low s, as the token's ECDSA check demands. A repeat payer's verify
answered from the state cache leaves the nonce to the settlement's re-check
(facilitator/evm/statecache.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from facilitator.errors import ChainUnavailableError, PaymentInvalidError
from facilitator.evm import contracts
from facilitator.evm.chain import EvmChain
from facilitator.evm.eip712 import (
    address_bytes,
    checksum_address,
    expand_signature,
    token_domain_separator,
    transfer_with_authorization_digest,
)
from facilitator.evm.rpc import Call, RpcError, RpcUnavailableError
from facilitator.evm.signatures import check_signature, try_recover
from facilitator.evm.statecache import UNREAD, Effect
from facilitator.schemes.base import SettlementPlan, payment_digest
from facilitator.schemes.evm_exact.permit2 import DEADLINE_BUFFER_S, _first_error
from facilitator.x402.identity import eip3009_key
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import ExactEip3009Payload, PaymentRequirements, is_evm_address


@dataclass(eq=False)
class Eip3009Payment:
    chain: EvmChain
    payer: str
    payer_b: bytes
    asset: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce_b: bytes
    signature: bytes
    digest_b: bytes
    domain: tuple[str, str, str]
    domain_separator: bytes
    recovered: bytes | None
    record_key: str
    digest: str
    nonce_used_reason: str = R.INVALID_EXACT_EVM_NONCE_ALREADY_USED.value
    payer_is_eoa: bool = False  # known after confirm()

    @property
    def verify_extra(self) -> dict[str, Any] | None:
        return None

    @property
    def settle_amount(self) -> int:
        return self.value

    def check_time(self, now: float) -> None:
        """The time checks of prepare(), again: a payment prepared at verify and settled later."""
        check_eip3009_window(self.valid_before, self.valid_after, now)

    async def confirm(self, *, fresh: bool = True) -> None:
        """The chain checks (one round trip); raises PaymentInvalidError. The settlement call
        data is built only when settling (`plan()`), not on every verify. `fresh=False` (verify):
        reads may come from the chain's state cache, and the payer's settlements in flight count
        against its balance; the settlement's re-check reads the chain."""
        chain = self.chain
        reads = self._reads()
        check_asset = self.asset.lower() not in chain.asset_has_code
        check_domain = self.domain not in chain.domain_ok
        if check_asset:
            reads.append(Call("eth_getCode", [self.asset, "latest"]))
        if check_domain:
            reads.append(Call("eth_call", [{"to": self.asset, "data": contracts.domain_separator()}, "latest"]))
        try:
            if fresh or not chain.state.enabled or not chain.state.watch(self.asset):
                results = await chain.rpc.batch(reads)
            else:
                results = await chain.state.read(self.payer, reads, optional=(2,))  # the nonce: see statecache
        except RpcUnavailableError as exc:
            raise ChainUnavailableError(str(exc)) from exc
        payer_code, balance, used = results[:3]
        rest = results[3:]
        if check_asset:
            code = rest.pop(0)
            if isinstance(code, RpcError):
                raise ChainUnavailableError(f"eth_getCode failed: {code.message}")
            if code in ("0x", ""):
                raise PaymentInvalidError(R.ASSET_NOT_DEPLOYED_CONTRACT, f"no contract at asset {self.asset}")
            chain.asset_has_code.add(self.asset.lower())
        if check_domain:
            separator = rest.pop(0)
            if isinstance(separator, RpcError) or not isinstance(separator, str):
                raise PaymentInvalidError(R.INVALID_EXACT_EVM_EIP3009_NOT_SUPPORTED, "token has no DOMAIN_SEPARATOR()")
            if bytes.fromhex(separator[2:]) != self.domain_separator:
                raise PaymentInvalidError(
                    R.INVALID_EXACT_EVM_TOKEN_NAME_MISMATCH,
                    "extra.name/extra.version do not match the token's EIP-712 domain",
                )
            chain.domain_ok.add(self.domain)
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
            invalid=R.INVALID_EXACT_EVM_PAYLOAD_SIGNATURE,
            undeployed=R.INVALID_EXACT_EVM_PAYLOAD_UNDEPLOYED_SMART_WALLET,
        )
        if isinstance(used, RpcError):
            raise PaymentInvalidError(R.INVALID_EXACT_EVM_EIP3009_NOT_SUPPORTED, "token has no authorizationState()")
        if used is not UNREAD and contracts.decode_uint(used) != 0:
            raise PaymentInvalidError(R.INVALID_EXACT_EVM_NONCE_ALREADY_USED, "authorization nonce already used on-chain")
        if isinstance(balance, RpcError):
            raise PaymentInvalidError(R.BALANCE_CHECK_FAILED, "balanceOf reverted")
        if contracts.decode_uint(balance) < self.value + (0 if fresh else chain.state.inflight(self.asset, self.payer)):
            raise PaymentInvalidError(R.INVALID_EXACT_EVM_INSUFFICIENT_BALANCE, "payer balance is below the amount")

    def _reads(self) -> list[Call]:
        """code, balance, authorization state (in this order)."""
        return [
            Call("eth_getCode", [self.payer, "latest"]),
            Call("eth_call", [{"to": self.asset, "data": contracts.balance_of(self.payer_b)}, "latest"]),
            Call("eth_call", [{"to": self.asset, "data": contracts.authorization_state(self.payer_b, self.nonce_b)}, "latest"]),
        ]

    def plan(self) -> SettlementPlan:
        signature = self.signature
        if self.payer_is_eoa and len(signature) == 64:
            # EIP-2098 compact: the tokens' `bytes signature` overload (OpenZeppelin 5, Circle's
            # FiatToken) reads only 65 bytes, so an EOA's signature goes through (v, r, s).
            signature = expand_signature(signature)
        _, balance, state = self._reads()
        return SettlementPlan(
            payer=self.payer,
            amount=self.value,
            asset=self.asset,
            pay_to=self.to,
            tx_to=self.asset,
            tx_data=contracts.transfer_with_authorization(
                from_=self.payer, to=self.to, value=self.value, valid_after=self.valid_after,
                valid_before=self.valid_before, nonce=self.nonce_b, signature=signature,
            ),  # fmt: skip
            gas=contracts.GAS_EIP3009_SETTLE,
            effects=(Effect(balance, "debit", self.value), Effect(state, "set_bit", 0)),
        )


def check_eip3009_window(valid_before: int, valid_after: int, now: float) -> None:
    if valid_before < now + DEADLINE_BUFFER_S:
        raise PaymentInvalidError(R.INVALID_EXACT_EVM_PAYLOAD_AUTHORIZATION_VALID_BEFORE,
                                  "authorization expired or expires within 6 s")
    if valid_after > now:
        raise PaymentInvalidError(R.INVALID_EXACT_EVM_PAYLOAD_AUTHORIZATION_VALID_AFTER, "authorization is not yet valid")


def prepare_eip3009(chain: EvmChain, raw_payload: dict, requirements: PaymentRequirements, *, now: float) -> Eip3009Payment:
    try:
        payload = ExactEip3009Payload.model_validate(raw_payload)
    except ValidationError as exc:
        raise PaymentInvalidError(R.INVALID_PAYLOAD, _first_error(exc)) from None
    if not is_evm_address(requirements.asset):  # read on chain and watched by the state cache: never free text
        raise PaymentInvalidError(R.INVALID_PAYMENT_REQUIREMENTS, "asset must be an EVM address: 0x and 40 hex digits")
    extra = requirements.extra or {}
    name, version = extra.get("name"), extra.get("version")
    if not isinstance(name, str) or not isinstance(version, str):
        token = chain.token(requirements.asset)
        if token is None:
            raise PaymentInvalidError(R.MISSING_EIP712_DOMAIN, "requirements.extra needs the token's EIP-712 name and version")
        name, version = token.eip712_name, token.eip712_version
    auth = payload.authorization
    if auth.to.lower() != requirements.pay_to.lower():
        raise PaymentInvalidError(R.INVALID_EXACT_EVM_PAYLOAD_RECIPIENT_MISMATCH, "authorization.to is not payTo")
    try:
        value = int(auth.value)
        valid_after = int(auth.valid_after)
        valid_before = int(auth.valid_before)
    except (TypeError, ValueError):
        raise PaymentInvalidError(R.INVALID_PAYLOAD, "value, validAfter, validBefore must be integers") from None
    if not (0 <= value < 2**256 and 0 <= valid_after < 2**256 and 0 <= valid_before < 2**256):
        raise PaymentInvalidError(R.INVALID_PAYLOAD, "integer out of uint256 range")
    if value != int(requirements.amount):
        raise PaymentInvalidError(R.INVALID_EXACT_EVM_PAYLOAD_AUTHORIZATION_VALUE_MISMATCH,
                                  "value differs from the required amount")
    check_eip3009_window(valid_before, valid_after, now)
    if value == 0:
        raise PaymentInvalidError(R.INVALID_EXACT_EVM_PAYLOAD_AUTHORIZATION_VALUE_MISMATCH, "amount must be positive")
    try:
        signature = bytes.fromhex(payload.signature[2:])
        payer_b = address_bytes(auth.from_)
        asset_b = address_bytes(requirements.asset)
        nonce_b = bytes.fromhex(auth.nonce[2:])
    except ValueError:
        raise PaymentInvalidError(R.INVALID_PAYLOAD, "malformed hex") from None
    separator = token_domain_separator(name, version, chain.chain_id, asset_b)
    digest_b = transfer_with_authorization_digest(
        domain_separator=separator,
        from_=payer_b,
        to=address_bytes(auth.to),
        value=value,
        valid_after=valid_after,
        valid_before=valid_before,
        nonce=nonce_b,
    )
    payer = checksum_address(auth.from_)
    asset = checksum_address(requirements.asset)
    return Eip3009Payment(
        chain=chain,
        payer=payer,
        payer_b=payer_b,
        asset=asset,
        to=checksum_address(auth.to),
        value=value,
        valid_after=valid_after,
        valid_before=valid_before,
        nonce_b=nonce_b,
        signature=signature,
        digest_b=digest_b,
        domain=(asset.lower(), name, version),
        domain_separator=separator,
        recovered=try_recover(digest_b, signature, require_low_s=True),
        record_key=eip3009_key(chain.network, asset, payer, auth.nonce),
        digest=payment_digest(digest_b, signature),
    )
