// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";

import {ISignatureTransfer} from "./ISignatureTransfer.sol";

/// @title Shared logic of the x402 Permit2 proxies (exact and upto)
/// @notice The proxy is the `spender` a payer signs in a Permit2 witness
///         transfer; the witness binds the recipient (and, for upto, the
///         facilitator), so whoever submits the transaction cannot redirect
///         the funds. The proxy holds no funds and has no admin.
/// @dev The guard lives in transient storage (EIP-1153), so the runtime code
///      can be copied to another address (anvil_setCode) without any storage
///      initialisation. PERMIT2 is an immutable, i.e. part of the runtime code.
abstract contract X402BasePermit2Proxy is ReentrancyGuardTransient {
    ISignatureTransfer public immutable PERMIT2;

    struct EIP2612Permit {
        uint256 value;
        uint256 deadline;
        bytes32 r;
        bytes32 s;
        uint8 v;
    }

    event Settled();
    event SettledWithPermit();
    event EIP2612PermitFailedWithReason(address indexed token, address indexed owner, string reason);
    event EIP2612PermitFailedWithPanic(address indexed token, address indexed owner, uint256 errorCode);
    event EIP2612PermitFailedWithData(address indexed token, address indexed owner, bytes data);

    error InvalidPermit2Address();
    error InvalidDestination();
    error PaymentTooEarly();
    error InvalidOwner();
    error InvalidAmount();
    error Permit2612AmountMismatch();

    constructor(address permit2) {
        if (permit2 == address(0)) revert InvalidPermit2Address();
        PERMIT2 = ISignatureTransfer(permit2);
    }

    /// @dev Validates the common fields, then asks Permit2 to move `amount`
    ///      from `owner` to `to`. Permit2 checks the signature, the nonce,
    ///      the deadline and `amount <= permit.permitted.amount`.
    function _settle(
        ISignatureTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        address to,
        uint256 validAfter,
        bytes32 witnessHash,
        string memory witnessTypeString,
        bytes calldata signature
    ) internal {
        if (amount == 0) revert InvalidAmount();
        if (owner == address(0)) revert InvalidOwner();
        if (to == address(0)) revert InvalidDestination();
        if (block.timestamp < validAfter) revert PaymentTooEarly();

        PERMIT2.permitWitnessTransferFrom(
            permit,
            ISignatureTransfer.SignatureTransferDetails({to: to, requestedAmount: amount}),
            owner,
            witnessHash,
            witnessTypeString,
            signature
        );
    }

    /// @dev Best-effort EIP-2612 approval of Permit2 by `owner`. A failing
    ///      permit() only emits an event: an existing allowance is enough.
    function _tryPermit2612(address token, address owner, EIP2612Permit calldata p, uint256 permittedAmount)
        internal
    {
        if (p.value != permittedAmount) revert Permit2612AmountMismatch();
        try IERC20Permit(token).permit(owner, address(PERMIT2), p.value, p.deadline, p.v, p.r, p.s) {}
        catch Error(string memory reason) {
            emit EIP2612PermitFailedWithReason(token, owner, reason);
        } catch Panic(uint256 errorCode) {
            emit EIP2612PermitFailedWithPanic(token, owner, errorCode);
        } catch (bytes memory data) {
            emit EIP2612PermitFailedWithData(token, owner, data);
        }
    }
}
