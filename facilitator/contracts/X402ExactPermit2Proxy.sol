// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

import {X402BasePermit2Proxy} from "./X402BasePermit2Proxy.sol";
import {ISignatureTransfer} from "./ISignatureTransfer.sol";

/// @title x402 exact-amount Permit2 proxy (ABI-compatible with x402ExactPermit2Proxy)
/// @notice Always transfers exactly `permit.permitted.amount`. Anyone may submit.
contract X402ExactPermit2Proxy is X402BasePermit2Proxy {
    struct Witness {
        address to;
        uint256 validAfter;
    }

    /// @dev Byte-exact: Permit2 appends this to its PermitWitnessTransferFrom stub.
    string public constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,uint256 validAfter)";

    bytes32 public constant WITNESS_TYPEHASH = keccak256("Witness(address to,uint256 validAfter)");

    constructor(address permit2) X402BasePermit2Proxy(permit2) {}

    function settle(
        ISignatureTransfer.PermitTransferFrom calldata permit,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external nonReentrant {
        _settleExact(permit, owner, witness, signature);
        emit Settled();
    }

    function settleWithPermit(
        EIP2612Permit calldata permit2612,
        ISignatureTransfer.PermitTransferFrom calldata permit,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external nonReentrant {
        _tryPermit2612(permit.permitted.token, owner, permit2612, permit.permitted.amount);
        _settleExact(permit, owner, witness, signature);
        emit SettledWithPermit();
    }

    function _settleExact(
        ISignatureTransfer.PermitTransferFrom calldata permit,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) private {
        bytes32 witnessHash = keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.validAfter));
        _settle(
            permit,
            permit.permitted.amount,
            owner,
            witness.to,
            witness.validAfter,
            witnessHash,
            WITNESS_TYPE_STRING,
            signature
        );
    }
}
