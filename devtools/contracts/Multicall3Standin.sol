// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

/// @title Dev-chain stand-in for Multicall3's read helpers
/// @notice The official x402 SDK batches its facilitator reads through
///         Multicall3 (`tryAggregate`, `aggregate3`), which every public chain
///         has at 0xcA11...CA11; the dev chain gets this at the same address.
///         Stateless, so its runtime code is copied there with anvil_setCode.
contract Multicall3Standin {
    struct Call {
        address target;
        bytes callData;
    }

    struct Call3 {
        address target;
        bool allowFailure;
        bytes callData;
    }

    struct Result {
        bool success;
        bytes returnData;
    }

    error CallFailed(uint256 index);

    function tryAggregate(bool requireSuccess, Call[] calldata calls) public returns (Result[] memory results) {
        results = new Result[](calls.length);
        for (uint256 i; i < calls.length; ++i) {
            (bool ok, bytes memory data) = calls[i].target.call(calls[i].callData);
            if (requireSuccess && !ok) revert CallFailed(i);
            results[i] = Result(ok, data);
        }
    }

    function aggregate3(Call3[] calldata calls) public returns (Result[] memory results) {
        results = new Result[](calls.length);
        for (uint256 i; i < calls.length; ++i) {
            (bool ok, bytes memory data) = calls[i].target.call(calls[i].callData);
            if (!calls[i].allowFailure && !ok) revert CallFailed(i);
            results[i] = Result(ok, data);
        }
    }
}
