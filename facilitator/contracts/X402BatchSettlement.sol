// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {Multicall} from "@openzeppelin/contracts/utils/Multicall.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

import {IBatchDepositCollector} from "./IBatchDepositCollector.sol";

/// @title x402 batch-settlement escrow (ABI-compatible with x402BatchSettlement)
/// @notice Unidirectional payment channels for the x402 `batch-settlement`
///         scheme. A payer escrows tokens in a channel; the receiver side
///         claims cumulative, payer-signed vouchers (accounting only) and
///         later sweeps everything claimed to the receiver in one transfer.
///         The payer's escape hatch is a timed withdrawal of what is not
///         claimed, which gives the receiver `withdrawDelay` seconds to claim.
/// @dev A channel is named by the EIP-712 hash of its immutable config under
///      the domain ("x402 Batch Settlement", "1", chainId, this address), so
///      the same config names different channels on other chains/deployments.
///      No admin, no storage initialisation: the runtime code can be copied to
///      the canonical address (anvil_setCode) and OpenZeppelin's EIP712
///      rebuilds its separator for the new `address(this)`.
contract X402BatchSettlement is EIP712, Multicall, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    struct ChannelConfig {
        address payer;
        address payerAuthorizer; // EOA signing vouchers; zero = the payer signs (ERC-1271 allowed)
        address receiver;
        address receiverAuthorizer; // signs claim batches and refunds; never zero
        address token;
        uint40 withdrawDelay;
        bytes32 salt;
    }

    struct ChannelState {
        uint128 balance; // deposited minus refunded/withdrawn (claimed funds stay counted until then)
        uint128 totalClaimed; // cumulative, only grows
    }

    struct WithdrawalState {
        uint128 amount;
        uint40 initiatedAt; // zero: none pending
    }

    struct ReceiverState {
        uint128 totalClaimed;
        uint128 totalSettled;
    }

    struct Voucher {
        ChannelConfig channel;
        uint128 maxClaimableAmount;
    }

    /// @dev `totalClaimed` is the new cumulative total, not a delta: replaying a row is a no-op.
    struct VoucherClaim {
        Voucher voucher;
        bytes signature;
        uint128 totalClaimed;
    }

    uint40 public constant MIN_WITHDRAW_DELAY = 900;
    uint40 public constant MAX_WITHDRAW_DELAY = 2_592_000;

    bytes32 public constant CHANNEL_CONFIG_TYPEHASH = keccak256(
        "ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,address token,uint40 withdrawDelay,bytes32 salt)"
    );
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 maxClaimableAmount)");
    bytes32 public constant REFUND_TYPEHASH = keccak256("Refund(bytes32 channelId,uint256 nonce,uint128 amount)");
    bytes32 public constant CLAIM_ENTRY_TYPEHASH =
        keccak256("ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)");
    bytes32 public constant CLAIM_BATCH_TYPEHASH = keccak256(
        "ClaimBatch(ClaimEntry[] claims)ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
    );

    mapping(bytes32 channelId => ChannelState) public channels;
    mapping(bytes32 channelId => uint256) public refundNonce;
    mapping(bytes32 channelId => WithdrawalState) public pendingWithdrawals;
    mapping(address receiver => mapping(address token => ReceiverState)) public receivers;

    event ChannelCreated(bytes32 indexed channelId, ChannelConfig config);
    event ChannelClosed(bytes32 indexed channelId, ChannelConfig config);
    event Deposited(bytes32 indexed channelId, address indexed sender, uint128 amount, uint128 newBalance);
    event Claimed(bytes32 indexed channelId, address indexed sender, uint128 claimAmount, uint128 newTotalClaimed);
    event Settled(address indexed receiver, address indexed token, address indexed sender, uint128 amount);
    event Refunded(bytes32 indexed channelId, address indexed sender, uint128 amount);
    event WithdrawInitiated(bytes32 indexed channelId, uint128 amount, uint40 finalizeAfter);
    event WithdrawFinalized(bytes32 indexed channelId, address indexed sender, uint128 amount);

    error InvalidChannel();
    error ZeroDeposit();
    error DepositOverflow();
    error InvalidSignature();
    error NotReceiverAuthorizer();
    error NotAuthorizedToClaim();
    error NotAuthorizedToRefund();
    error ClaimExceedsCeiling();
    error ClaimExceedsBalance();
    error WithdrawalAlreadyPending();
    error WithdrawalNotPending();
    error NotAuthorizedToFinalizeWithdraw();
    error WithdrawDelayNotElapsed();
    error NothingToWithdraw();
    error WithdrawAmountExceedsAvailable();
    error WithdrawDelayOutOfRange();
    error EmptyBatch();
    error DepositCollectionFailed();
    error InvalidCollector();
    error InvalidRefundNonce();
    error ZeroRefund();

    constructor() EIP712("x402 Batch Settlement", "1") {}

    // ---- deposits ----

    /// @notice Escrow `amount` into the channel of `config`, pulled by `collector`.
    function deposit(ChannelConfig calldata config, uint128 amount, address collector, bytes calldata collectorData)
        external
        nonReentrant
    {
        _checkConfig(config);
        if (amount == 0) revert ZeroDeposit();
        if (collector == address(0)) revert InvalidCollector();

        bytes32 channelId = getChannelId(config);
        ChannelState storage state = channels[channelId];
        uint128 before = state.balance;
        if (amount > type(uint128).max - before) revert DepositOverflow();
        state.balance = before + amount;

        // The collector is untrusted code: only the token balance we end up holding counts.
        IERC20 token = IERC20(config.token);
        uint256 held = token.balanceOf(address(this));
        IBatchDepositCollector(collector).collect(config.payer, config.token, amount, channelId, collectorData);
        if (token.balanceOf(address(this)) != held + amount) revert DepositCollectionFailed();

        if (before == 0 && state.totalClaimed == 0) emit ChannelCreated(channelId, config);
        emit Deposited(channelId, msg.sender, amount, state.balance);
    }

    // ---- claims and settlement ----

    /// @notice Apply voucher claims; the caller must be the receiver or receiverAuthorizer of every row.
    function claim(VoucherClaim[] calldata voucherClaims) external nonReentrant {
        uint256 n = voucherClaims.length;
        if (n == 0) revert EmptyBatch();
        for (uint256 i; i < n; ++i) {
            if (!_receiverSide(msg.sender, voucherClaims[i].voucher.channel)) revert NotAuthorizedToClaim();
            _applyClaim(voucherClaims[i]);
        }
    }

    /// @notice Apply voucher claims authorised by one ClaimBatch signature of the rows' common
    ///         receiverAuthorizer; anyone may relay it.
    function claimWithSignature(VoucherClaim[] calldata voucherClaims, bytes calldata authorizerSignature)
        external
        nonReentrant
    {
        uint256 n = voucherClaims.length;
        if (n == 0) revert EmptyBatch();
        address authorizer = voucherClaims[0].voucher.channel.receiverAuthorizer;
        if (!SignatureChecker.isValidSignatureNow(authorizer, getClaimBatchDigest(voucherClaims), authorizerSignature)) {
            revert InvalidSignature();
        }
        for (uint256 i; i < n; ++i) {
            if (voucherClaims[i].voucher.channel.receiverAuthorizer != authorizer) revert NotReceiverAuthorizer();
            _applyClaim(voucherClaims[i]);
        }
    }

    /// @notice Transfer everything claimed but not yet settled for (receiver, token). Permissionless.
    function settle(address receiver, address token) external nonReentrant {
        ReceiverState storage totals = receivers[receiver][token];
        uint128 due = totals.totalClaimed - totals.totalSettled;
        if (due == 0) return;
        totals.totalSettled = totals.totalClaimed;
        IERC20(token).safeTransfer(receiver, due);
        emit Settled(receiver, token, msg.sender, due);
    }

    // ---- payer's timed withdrawal ----

    /// @notice Start withdrawing up to `amount` of the unclaimed escrow (payer or payerAuthorizer).
    function initiateWithdraw(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        if (!_payerSide(msg.sender, config)) revert InvalidChannel();
        if (amount == 0) revert NothingToWithdraw();
        bytes32 channelId = getChannelId(config);
        WithdrawalState storage pending = pendingWithdrawals[channelId];
        if (pending.initiatedAt != 0) revert WithdrawalAlreadyPending();
        if (amount > _unclaimed(channels[channelId])) revert WithdrawAmountExceedsAvailable();
        pending.amount = amount;
        pending.initiatedAt = uint40(block.timestamp);
        emit WithdrawInitiated(channelId, amount, uint40(block.timestamp) + config.withdrawDelay);
    }

    /// @notice After the delay, pay out the pending withdrawal, capped by what is still unclaimed
    ///         (claims landed during the delay win).
    function finalizeWithdraw(ChannelConfig calldata config) external nonReentrant {
        if (!_payerSide(msg.sender, config)) revert NotAuthorizedToFinalizeWithdraw();
        bytes32 channelId = getChannelId(config);
        WithdrawalState storage pending = pendingWithdrawals[channelId];
        uint256 initiatedAt = pending.initiatedAt;
        if (initiatedAt == 0) revert WithdrawalNotPending();
        if (block.timestamp < initiatedAt + config.withdrawDelay) revert WithdrawDelayNotElapsed();

        ChannelState storage state = channels[channelId];
        uint128 unclaimed = _unclaimed(state);
        uint128 paid = pending.amount < unclaimed ? pending.amount : unclaimed;
        delete pendingWithdrawals[channelId];
        state.balance -= paid;

        emit WithdrawFinalized(channelId, msg.sender, paid);
        if (state.balance == 0 && state.totalClaimed == 0) emit ChannelClosed(channelId, config);
        if (paid != 0) IERC20(config.token).safeTransfer(config.payer, paid);
    }

    // ---- cooperative refunds ----

    /// @notice Return up to `amount` of the unclaimed escrow to the payer (receiver or receiverAuthorizer).
    function refund(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        if (!_receiverSide(msg.sender, config)) revert NotAuthorizedToRefund();
        _refund(config, amount);
    }

    /// @notice Same as `refund`, authorised by a Refund signature of the receiverAuthorizer at the
    ///         channel's current refund nonce; anyone may relay it.
    function refundWithSignature(
        ChannelConfig calldata config,
        uint128 amount,
        uint256 nonce,
        bytes calldata receiverAuthorizerSignature
    ) external nonReentrant {
        bytes32 channelId = getChannelId(config);
        if (refundNonce[channelId] != nonce) revert InvalidRefundNonce();
        if (!SignatureChecker.isValidSignatureNow(
                config.receiverAuthorizer, getRefundDigest(channelId, nonce, amount), receiverAuthorizerSignature
            )) revert InvalidSignature();
        _refund(config, amount);
    }

    // ---- views ----

    function getChannelId(ChannelConfig calldata config) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(CHANNEL_CONFIG_TYPEHASH, config)));
    }

    function getVoucherDigest(bytes32 channelId, uint128 maxClaimableAmount) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, maxClaimableAmount)));
    }

    function getRefundDigest(bytes32 channelId, uint256 nonce, uint128 amount) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(REFUND_TYPEHASH, channelId, nonce, amount)));
    }

    /// @notice EIP-712 digest of ClaimBatch(ClaimEntry[] claims): an array member is hashed as the
    ///         keccak of its entries' struct hashes, concatenated.
    function getClaimBatchDigest(VoucherClaim[] calldata voucherClaims) public view returns (bytes32) {
        bytes memory entries = new bytes(32 * voucherClaims.length);
        for (uint256 i; i < voucherClaims.length; ++i) {
            VoucherClaim calldata row = voucherClaims[i];
            bytes32 entry = keccak256(
                abi.encode(
                    CLAIM_ENTRY_TYPEHASH,
                    getChannelId(row.voucher.channel),
                    row.voucher.maxClaimableAmount,
                    row.totalClaimed
                )
            );
            assembly ("memory-safe") {
                mstore(add(add(entries, 32), mul(i, 32)), entry)
            }
        }
        return _hashTypedDataV4(keccak256(abi.encode(CLAIM_BATCH_TYPEHASH, keccak256(entries))));
    }

    // ---- internals ----

    function _checkConfig(ChannelConfig calldata config) private pure {
        if (
            config.payer == address(0) || config.receiver == address(0) || config.receiverAuthorizer == address(0)
                || config.token == address(0)
        ) revert InvalidChannel();
        if (config.withdrawDelay < MIN_WITHDRAW_DELAY || config.withdrawDelay > MAX_WITHDRAW_DELAY) {
            revert WithdrawDelayOutOfRange();
        }
    }

    function _receiverSide(address who, ChannelConfig calldata config) private pure returns (bool) {
        return who == config.receiver || who == config.receiverAuthorizer;
    }

    function _payerSide(address who, ChannelConfig calldata config) private pure returns (bool) {
        return who == config.payer || who == config.payerAuthorizer;
    }

    function _unclaimed(ChannelState storage state) private view returns (uint128) {
        return state.balance - state.totalClaimed;
    }

    function _applyClaim(VoucherClaim calldata row) private {
        ChannelConfig calldata config = row.voucher.channel;
        bytes32 channelId = getChannelId(config);
        ChannelState storage state = channels[channelId];
        uint128 already = state.totalClaimed;
        uint128 target = row.totalClaimed;
        if (target <= already) return; // replayed or superseded row
        if (target > row.voucher.maxClaimableAmount) revert ClaimExceedsCeiling();
        if (target > state.balance) revert ClaimExceedsBalance();

        bytes32 digest = getVoucherDigest(channelId, row.voucher.maxClaimableAmount);
        bool signed = config.payerAuthorizer != address(0)
            ? _recovers(digest, row.signature, config.payerAuthorizer)
            : SignatureChecker.isValidSignatureNow(config.payer, digest, row.signature);
        if (!signed) revert InvalidSignature();

        uint128 delta = target - already;
        state.totalClaimed = target;
        receivers[config.receiver][config.token].totalClaimed += delta;
        emit Claimed(channelId, msg.sender, delta, target);
    }

    /// @dev ECDSA only (a payerAuthorizer is an EOA): a malformed signature is a plain failure.
    function _recovers(bytes32 digest, bytes calldata signature, address expected) private pure returns (bool) {
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, signature);
        return err == ECDSA.RecoverError.NoError && signer == expected;
    }

    /// @dev The nonce advances before the cap is applied, so even a refund that moves nothing
    ///      invalidates Refund signatures made for the previous nonce.
    function _refund(ChannelConfig calldata config, uint128 amount) private {
        if (amount == 0) revert ZeroRefund();
        bytes32 channelId = getChannelId(config);
        unchecked {
            ++refundNonce[channelId];
        }
        ChannelState storage state = channels[channelId];
        uint128 unclaimed = _unclaimed(state);
        uint128 paid = amount < unclaimed ? amount : unclaimed;
        if (paid == 0) return;
        state.balance -= paid;

        WithdrawalState storage pending = pendingWithdrawals[channelId];
        if (pending.initiatedAt != 0) {
            if (paid >= pending.amount) delete pendingWithdrawals[channelId];
            else pending.amount -= paid;
        }

        emit Refunded(channelId, msg.sender, paid);
        if (state.balance == 0 && state.totalClaimed == 0) emit ChannelClosed(channelId, config);
        IERC20(config.token).safeTransfer(config.payer, paid);
    }
}
