// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

/// @title Minimal view of Uniswap Permit2's SignatureTransfer interface
/// @notice Only the types and the one function our x402 proxies call. The
///         struct layouts must match Permit2's exactly: they are part of the
///         ABI of `permitWitnessTransferFrom` and of the proxies' `settle`.
interface ISignatureTransfer {
    struct TokenPermissions {
        address token;
        uint256 amount;
    }

    struct PermitTransferFrom {
        TokenPermissions permitted;
        uint256 nonce;
        uint256 deadline;
    }

    struct SignatureTransferDetails {
        address to;
        uint256 requestedAmount;
    }

    function permitWitnessTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external;
}
