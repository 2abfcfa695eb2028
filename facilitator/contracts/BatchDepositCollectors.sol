// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";

import {IBatchDepositCollector} from "./IBatchDepositCollector.sol";
import {ISignatureTransfer} from "./ISignatureTransfer.sol";

/// @dev The one EIP-3009 entry point the ERC-3009 collector calls (`bytes signature` overload,
///      so ERC-1271 wallets can deposit too).
interface IReceiveWithAuthorization {
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external;
}

/// @title Shared guard of the batch-settlement deposit collectors
/// @notice Only the settlement contract may ask a collector to pull: the
///         signed authorisations bind the amount and the channel, and the
///         settlement contract credits exactly what arrives.
/// @dev SETTLEMENT is an immutable (part of the runtime code): deploy with the
///      canonical settlement address before copying the code to the canonical
///      collector address.
abstract contract BatchDepositCollector is IBatchDepositCollector {
    address public immutable SETTLEMENT;

    error InvalidSettlementAddress();
    error OnlySettlement();

    constructor(address settlement) {
        if (settlement == address(0)) revert InvalidSettlementAddress();
        SETTLEMENT = settlement;
    }

    modifier onlySettlement() {
        if (msg.sender != SETTLEMENT) revert OnlySettlement();
        _;
    }
}

/// @title ERC-3009 deposit collector (ABI-compatible with ERC3009DepositCollector)
/// @notice `collectorData = abi.encode(validAfter, validBefore, salt, signature)`.
///         The payer signs ReceiveWithAuthorization to this collector with
///         nonce `keccak256(abi.encode(channelId, salt))`, which ties the
///         authorisation to one channel; the tokens are forwarded to SETTLEMENT.
contract X402Erc3009DepositCollector is BatchDepositCollector {
    using SafeERC20 for IERC20;

    constructor(address settlement) BatchDepositCollector(settlement) {}

    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata collectorData)
        external
        onlySettlement
    {
        (uint256 validAfter, uint256 validBefore, uint256 salt, bytes memory signature) =
            abi.decode(collectorData, (uint256, uint256, uint256, bytes));
        IReceiveWithAuthorization(token).receiveWithAuthorization(
            payer, address(this), amount, validAfter, validBefore, keccak256(abi.encode(channelId, salt)), signature
        );
        IERC20(token).safeTransfer(SETTLEMENT, amount);
    }
}

/// @title Permit2 deposit collector (ABI-compatible with Permit2DepositCollector)
/// @notice `collectorData = abi.encode(nonce, deadline, permit2Signature, eip2612Permit)`.
///         The payer signs a Permit2 witness transfer with this collector as
///         spender and `DepositWitness(bytes32 channelId)` as witness; Permit2
///         moves the tokens straight to SETTLEMENT. A non-empty `eip2612Permit`
///         (`abi.encode(value, deadline, v, r, s)`) is tried first to approve Permit2.
contract X402Permit2DepositCollector is BatchDepositCollector {
    ISignatureTransfer public immutable PERMIT2;

    /// @dev Byte-exact: Permit2 appends it to its PermitWitnessTransferFrom stub; referenced
    ///      structs in alphabetical order as EIP-712 requires.
    string public constant DEPOSIT_WITNESS_TYPE_STRING =
        "DepositWitness witness)DepositWitness(bytes32 channelId)TokenPermissions(address token,uint256 amount)";
    bytes32 public constant DEPOSIT_WITNESS_TYPEHASH = keccak256("DepositWitness(bytes32 channelId)");

    error InvalidPermit2Address();
    error Permit2612AmountMismatch();

    event EIP2612PermitFailedWithReason(address indexed token, address indexed owner, string reason);
    event EIP2612PermitFailedWithPanic(address indexed token, address indexed owner, uint256 errorCode);
    event EIP2612PermitFailedWithData(address indexed token, address indexed owner, bytes data);

    constructor(address settlement, address permit2) BatchDepositCollector(settlement) {
        if (permit2 == address(0)) revert InvalidPermit2Address();
        PERMIT2 = ISignatureTransfer(permit2);
    }

    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata collectorData)
        external
        onlySettlement
    {
        (uint256 nonce, uint256 deadline, bytes memory signature, bytes memory permit2612) =
            abi.decode(collectorData, (uint256, uint256, bytes, bytes));
        if (permit2612.length != 0) _tryPermit2612(payer, token, amount, permit2612);
        PERMIT2.permitWitnessTransferFrom(
            ISignatureTransfer.PermitTransferFrom(ISignatureTransfer.TokenPermissions(token, amount), nonce, deadline),
            ISignatureTransfer.SignatureTransferDetails(SETTLEMENT, amount),
            payer,
            keccak256(abi.encode(DEPOSIT_WITNESS_TYPEHASH, channelId)),
            DEPOSIT_WITNESS_TYPE_STRING,
            signature
        );
    }

    /// @dev Best effort: the approval may already exist (or a front-runner used the permit);
    ///      Permit2's own transfer is what must succeed.
    function _tryPermit2612(address payer, address token, uint256 amount, bytes memory data) private {
        (uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s) =
            abi.decode(data, (uint256, uint256, uint8, bytes32, bytes32));
        if (value != amount) revert Permit2612AmountMismatch();
        try IERC20Permit(token).permit(payer, address(PERMIT2), value, deadline, v, r, s) {}
        catch Error(string memory reason) {
            emit EIP2612PermitFailedWithReason(token, payer, reason);
        } catch Panic(uint256 code) {
            emit EIP2612PermitFailedWithPanic(token, payer, code);
        } catch (bytes memory data_) {
            emit EIP2612PermitFailedWithData(token, payer, data_);
        }
    }
}
