// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

/// @title What X402BatchSettlement asks of a deposit collector
/// @notice A collector pulls `amount` of `token` from `payer` into the
///         settlement contract (its caller); the settlement contract checks
///         its own token balance afterwards, so a collector cannot lie.
///         The selector is part of the canonical deployment's ABI.
interface IBatchDepositCollector {
    function collect(
        address payer,
        address token,
        uint256 amount,
        bytes32 channelId,
        bytes calldata collectorData
    ) external;
}
