"""x402 reason codes, verbatim from the spec and the official SDK.

These strings travel in ``VerifyResponse.invalidReason`` and ``SettleResponse.errorReason``.
They are the only place in the project where a reason string is typed; everything else
refers to an ``ErrorReason`` member.

Sources (see ``x402-protocol.md`` section 2.7): core spec section 9, and the SDK's EVM
constants (``x402/mechanisms/evm/constants.py``, ``exact/permit2_utils.py``,
``upto/``, ``extensions/``). Member names are the value in UPPER_SNAKE case.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ErrorReason"]


class ErrorReason(StrEnum):
    # -- core spec (x402-specification-v2.md section 9) --------------------------------
    INSUFFICIENT_FUNDS = "insufficient_funds"
    INVALID_EXACT_EVM_PAYLOAD_AUTHORIZATION_VALID_AFTER = "invalid_exact_evm_payload_authorization_valid_after"
    INVALID_EXACT_EVM_PAYLOAD_AUTHORIZATION_VALID_BEFORE = "invalid_exact_evm_payload_authorization_valid_before"
    INVALID_EXACT_EVM_PAYLOAD_AUTHORIZATION_VALUE_MISMATCH = "invalid_exact_evm_payload_authorization_value_mismatch"
    INVALID_EXACT_EVM_PAYLOAD_SIGNATURE = "invalid_exact_evm_payload_signature"
    INVALID_EXACT_EVM_PAYLOAD_RECIPIENT_MISMATCH = "invalid_exact_evm_payload_recipient_mismatch"
    INVALID_NETWORK = "invalid_network"
    INVALID_PAYLOAD = "invalid_payload"
    INVALID_PAYMENT_REQUIREMENTS = "invalid_payment_requirements"
    INVALID_SCHEME = "invalid_scheme"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    INVALID_X402_VERSION = "invalid_x402_version"
    INVALID_TRANSACTION_STATE = "invalid_transaction_state"
    UNEXPECTED_VERIFY_ERROR = "unexpected_verify_error"
    UNEXPECTED_SETTLE_ERROR = "unexpected_settle_error"

    # -- exact, EIP-3009 (SDK) ---------------------------------------------------------
    INVALID_EXACT_EVM_PAYLOAD_UNDEPLOYED_SMART_WALLET = "invalid_exact_evm_payload_undeployed_smart_wallet"
    SMART_WALLET_DEPLOYMENT_FAILED = "smart_wallet_deployment_failed"
    EIP6492_FACTORY_NOT_ALLOWED = "eip6492_factory_not_allowed"
    INVALID_EXACT_EVM_NONCE_ALREADY_USED = "invalid_exact_evm_nonce_already_used"
    INVALID_EXACT_EVM_INSUFFICIENT_BALANCE = "invalid_exact_evm_insufficient_balance"
    MISSING_EIP712_DOMAIN = "missing_eip712_domain"
    NETWORK_MISMATCH = "network_mismatch"
    INVALID_EXACT_EVM_FAILED_TO_GET_NETWORK_CONFIG = "invalid_exact_evm_failed_to_get_network_config"
    INVALID_EXACT_EVM_FAILED_TO_GET_ASSET_INFO = "invalid_exact_evm_failed_to_get_asset_info"
    INVALID_EXACT_EVM_FAILED_TO_VERIFY_SIGNATURE = "invalid_exact_evm_failed_to_verify_signature"
    INVALID_EXACT_EVM_TOKEN_NAME_MISMATCH = "invalid_exact_evm_token_name_mismatch"
    INVALID_EXACT_EVM_TOKEN_VERSION_MISMATCH = "invalid_exact_evm_token_version_mismatch"
    INVALID_EXACT_EVM_EIP3009_NOT_SUPPORTED = "invalid_exact_evm_eip3009_not_supported"
    INVALID_EXACT_EVM_TRANSACTION_SIMULATION_FAILED = "invalid_exact_evm_transaction_simulation_failed"
    INVALID_EXACT_EVM_TRANSFER_EVENT_MISMATCH = "invalid_exact_evm_transfer_event_mismatch"
    ASSET_NOT_DEPLOYED_CONTRACT = "asset_not_deployed_contract"
    TRANSACTION_FAILED = "transaction_failed"
    SETTLEMENT_PENDING = "settlement_pending"

    # -- Permit2, exact and upto: verify ---------------------------------------------------
    INVALID_PERMIT2_SPENDER = "invalid_permit2_spender"
    INVALID_PERMIT2_RECIPIENT_MISMATCH = "invalid_permit2_recipient_mismatch"
    PERMIT2_DEADLINE_EXPIRED = "permit2_deadline_expired"
    PERMIT2_NOT_YET_VALID = "permit2_not_yet_valid"
    PERMIT2_AMOUNT_MISMATCH = "permit2_amount_mismatch"
    PERMIT2_TOKEN_MISMATCH = "permit2_token_mismatch"
    INVALID_PERMIT2_SIGNATURE = "invalid_permit2_signature"
    PERMIT2_ALLOWANCE_REQUIRED = "permit2_allowance_required"
    PERMIT2_INSUFFICIENT_BALANCE = "permit2_insufficient_balance"
    PERMIT2_INVALID_DESTINATION = "permit2_invalid_destination"
    PERMIT2_INVALID_OWNER = "permit2_invalid_owner"
    INVALID_PERMIT2_PAYLOAD_FORMAT = "invalid_permit2_payload_format"
    BALANCE_CHECK_FAILED = "balance_check_failed"

    # -- Permit2: settle-time revert mapping ---------------------------------------------
    PERMIT2_2612_AMOUNT_MISMATCH = "permit2_2612_amount_mismatch"
    INVALID_PERMIT2_AMOUNT = "invalid_permit2_amount"  # exact
    PERMIT2_INVALID_AMOUNT = "permit2_invalid_amount"  # upto
    INVALID_PERMIT2_DESTINATION = "invalid_permit2_destination"
    INVALID_PERMIT2_OWNER = "invalid_permit2_owner"
    PERMIT2_PAYMENT_TOO_EARLY = "permit2_payment_too_early"
    PERMIT2_INVALID_NONCE = "permit2_invalid_nonce"
    ERC20_APPROVAL_TX_FAILED = "erc20_approval_tx_failed"
    ERC20_APPROVAL_BROADCAST_FAILED = "erc20_approval_broadcast_failed"

    # -- upto ------------------------------------------------------------------------------
    INVALID_UPTO_EVM_PAYLOAD_SETTLEMENT_EXCEEDS_AMOUNT = "invalid_upto_evm_payload_settlement_exceeds_amount"
    UPTO_FACILITATOR_MISMATCH = "upto_facilitator_mismatch"
    INVALID_UPTO_EVM_SCHEME = "invalid_upto_evm_scheme"
    INVALID_UPTO_EVM_NETWORK_MISMATCH = "invalid_upto_evm_network_mismatch"
    UPTO_AMOUNT_EXCEEDS_PERMITTED = "upto_amount_exceeds_permitted"
    UPTO_UNAUTHORIZED_FACILITATOR = "upto_unauthorized_facilitator"
    INVALID_UPTO_EVM_TRANSACTION_FAILED = "invalid_upto_evm_transaction_failed"
    INVALID_UPTO_EVM_FAILED_TO_GET_NETWORK_CONFIG = "invalid_upto_evm_failed_to_get_network_config"
    UNSUPPORTED_PAYLOAD_TYPE = "unsupported_payload_type"

    # -- batch-settlement (SDK x402/mechanisms/evm/batch_settlement/errors.py) -------------
    INVALID_BATCH_SETTLEMENT_EVM_SCHEME = "invalid_batch_settlement_evm_scheme"
    INVALID_BATCH_SETTLEMENT_EVM_NETWORK_MISMATCH = "invalid_batch_settlement_evm_network_mismatch"
    INVALID_BATCH_SETTLEMENT_EVM_MISSING_EIP712_DOMAIN = "invalid_batch_settlement_evm_missing_eip712_domain"
    INVALID_BATCH_SETTLEMENT_EVM_PAYLOAD_TYPE = "invalid_batch_settlement_evm_payload_type"
    INVALID_BATCH_SETTLEMENT_EVM_CHANNEL_NOT_FOUND = "invalid_batch_settlement_evm_channel_not_found"
    INVALID_BATCH_SETTLEMENT_EVM_CHANNEL_ID_MISMATCH = "invalid_batch_settlement_evm_channel_id_mismatch"
    INVALID_BATCH_SETTLEMENT_EVM_CHANNEL_ID_INVALID = "invalid_batch_settlement_evm_channel_id_invalid"
    INVALID_BATCH_SETTLEMENT_EVM_CHANNEL_BUSY = "invalid_batch_settlement_evm_channel_busy"
    INVALID_BATCH_SETTLEMENT_EVM_RECEIVER_MISMATCH = "invalid_batch_settlement_evm_receiver_mismatch"
    INVALID_BATCH_SETTLEMENT_EVM_RECEIVER_AUTHORIZER_MISMATCH = "invalid_batch_settlement_evm_receiver_authorizer_mismatch"
    INVALID_BATCH_SETTLEMENT_EVM_AUTHORIZER_ADDRESS_MISMATCH = "invalid_batch_settlement_evm_authorizer_address_mismatch"
    INVALID_BATCH_SETTLEMENT_EVM_AUTHORIZER_NOT_CONFIGURED = "invalid_batch_settlement_evm_authorizer_not_configured"
    INVALID_BATCH_SETTLEMENT_EVM_TOKEN_MISMATCH = "invalid_batch_settlement_evm_token_mismatch"
    INVALID_BATCH_SETTLEMENT_EVM_WITHDRAW_DELAY_MISMATCH = "invalid_batch_settlement_evm_withdraw_delay_mismatch"
    INVALID_BATCH_SETTLEMENT_EVM_WITHDRAW_DELAY_OUT_OF_RANGE = "invalid_batch_settlement_evm_withdraw_delay_out_of_range"
    INVALID_BATCH_SETTLEMENT_EVM_VOUCHER_SIGNATURE = "invalid_batch_settlement_evm_voucher_signature"
    INVALID_BATCH_SETTLEMENT_EVM_CUMULATIVE_EXCEEDS_BALANCE = "invalid_batch_settlement_evm_cumulative_exceeds_balance"
    INVALID_BATCH_SETTLEMENT_EVM_CUMULATIVE_BELOW_CLAIMED = "invalid_batch_settlement_evm_cumulative_below_claimed"
    INVALID_BATCH_SETTLEMENT_EVM_CUMULATIVE_AMOUNT_MISMATCH = "invalid_batch_settlement_evm_cumulative_amount_mismatch"
    INVALID_BATCH_SETTLEMENT_EVM_CHARGE_EXCEEDS_SIGNED_CUMULATIVE = "invalid_batch_settlement_evm_charge_exceeds_signed_cumulative"
    INVALID_BATCH_SETTLEMENT_EVM_INSUFFICIENT_BALANCE = "invalid_batch_settlement_evm_insufficient_balance"
    INVALID_BATCH_SETTLEMENT_EVM_DEPOSIT_PAYLOAD = "invalid_batch_settlement_evm_deposit_payload"
    INVALID_BATCH_SETTLEMENT_EVM_DEPOSIT_SIMULATION_FAILED = "invalid_batch_settlement_evm_deposit_simulation_failed"
    INVALID_BATCH_SETTLEMENT_EVM_DEPOSIT_BELOW_MIN_DEPOSIT = "invalid_batch_settlement_evm_deposit_below_min_deposit"
    INVALID_BATCH_SETTLEMENT_EVM_DEPOSIT_TRANSACTION_FAILED = "invalid_batch_settlement_evm_deposit_transaction_failed"
    INVALID_BATCH_SETTLEMENT_EVM_VOUCHER_PAYLOAD = "invalid_batch_settlement_evm_voucher_payload"
    INVALID_BATCH_SETTLEMENT_EVM_CLAIM_PAYLOAD = "invalid_batch_settlement_evm_claim_payload"
    INVALID_BATCH_SETTLEMENT_EVM_CLAIM_SIMULATION_FAILED = "invalid_batch_settlement_evm_claim_simulation_failed"
    INVALID_BATCH_SETTLEMENT_EVM_SETTLE_PAYLOAD = "invalid_batch_settlement_evm_settle_payload"
    INVALID_BATCH_SETTLEMENT_EVM_REFUND_PAYLOAD = "invalid_batch_settlement_evm_refund_payload"
    INVALID_BATCH_SETTLEMENT_EVM_REFUND_SIMULATION_FAILED = "invalid_batch_settlement_evm_refund_simulation_failed"
    INVALID_BATCH_SETTLEMENT_EVM_REFUND_AMOUNT_INVALID = "invalid_batch_settlement_evm_refund_amount_invalid"
    INVALID_BATCH_SETTLEMENT_EVM_REFUND_NO_BALANCE = "invalid_batch_settlement_evm_refund_no_balance"
    INVALID_BATCH_SETTLEMENT_EVM_PAYLOAD_AUTHORIZATION_VALID_AFTER = "invalid_batch_settlement_evm_payload_authorization_valid_after"
    INVALID_BATCH_SETTLEMENT_EVM_PAYLOAD_AUTHORIZATION_VALID_BEFORE = "invalid_batch_settlement_evm_payload_authorization_valid_before"
    INVALID_BATCH_SETTLEMENT_EVM_RECEIVE_AUTHORIZATION_SIGNATURE = "invalid_batch_settlement_evm_receive_authorization_signature"
    INVALID_BATCH_SETTLEMENT_EVM_ERC3009_AUTHORIZATION_REQUIRED = "invalid_batch_settlement_evm_erc3009_authorization_required"
    INVALID_BATCH_SETTLEMENT_EVM_PERMIT2_AUTHORIZATION_REQUIRED = "invalid_batch_settlement_evm_permit2_authorization_required"
    INVALID_BATCH_SETTLEMENT_EVM_PERMIT2_INVALID_SPENDER = "invalid_batch_settlement_evm_permit2_invalid_spender"
    INVALID_BATCH_SETTLEMENT_EVM_PERMIT2_AMOUNT_MISMATCH = "invalid_batch_settlement_evm_permit2_amount_mismatch"
    INVALID_BATCH_SETTLEMENT_EVM_PERMIT2_DEADLINE_EXPIRED = "invalid_batch_settlement_evm_permit2_deadline_expired"
    INVALID_BATCH_SETTLEMENT_EVM_PERMIT2_INVALID_SIGNATURE = "invalid_batch_settlement_evm_permit2_invalid_signature"
    INVALID_BATCH_SETTLEMENT_EVM_PERMIT2_ALLOWANCE_REQUIRED = "invalid_batch_settlement_evm_permit2_allowance_required"
    INVALID_BATCH_SETTLEMENT_EVM_RPC_READ_FAILED = "invalid_batch_settlement_evm_rpc_read_failed"

    # -- eip2612GasSponsoring extension ----------------------------------------------------
    INVALID_EIP2612_EXTENSION_FORMAT = "invalid_eip2612_extension_format"
    EIP2612_FROM_MISMATCH = "eip2612_from_mismatch"
    EIP2612_ASSET_MISMATCH = "eip2612_asset_mismatch"
    EIP2612_SPENDER_NOT_PERMIT2 = "eip2612_spender_not_permit2"
    EIP2612_DEADLINE_EXPIRED = "eip2612_deadline_expired"

    # -- erc20ApprovalGasSponsoring extension ----------------------------------------------
    INVALID_ERC20_APPROVAL_EXTENSION_FORMAT = "invalid_erc20_approval_extension_format"
    ERC20_APPROVAL_FROM_MISMATCH = "erc20_approval_from_mismatch"
    ERC20_APPROVAL_ASSET_MISMATCH = "erc20_approval_asset_mismatch"
    ERC20_APPROVAL_SPENDER_NOT_PERMIT2 = "erc20_approval_spender_not_permit2"
    ERC20_APPROVAL_TX_PARSE_FAILED = "erc20_approval_tx_parse_failed"
    ERC20_APPROVAL_TX_VALIDATION_UNAVAILABLE = "erc20_approval_tx_validation_unavailable"
    ERC20_APPROVAL_TX_INVALID_SIGNATURE = "erc20_approval_tx_invalid_signature"
    ERC20_APPROVAL_TX_SIGNER_MISMATCH = "erc20_approval_tx_signer_mismatch"
    ERC20_APPROVAL_TX_WRONG_TARGET = "erc20_approval_tx_wrong_target"
    ERC20_APPROVAL_TX_WRONG_SELECTOR = "erc20_approval_tx_wrong_selector"
    ERC20_APPROVAL_TX_INVALID_CALLDATA = "erc20_approval_tx_invalid_calldata"
    ERC20_APPROVAL_TX_WRONG_SPENDER = "erc20_approval_tx_wrong_spender"

    # -- resource-server level -------------------------------------------------------------
    EXTENSION_ECHO_MISMATCH = "extension_echo_mismatch"
