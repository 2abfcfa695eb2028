// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";

/// Our own settlement relay for proofs of inference, with the function signatures of
/// OpenGradient's InferenceSettlementRelay (x402-protocol.md §7.3): a batch is anchored by its
/// Merkle root (an OpenZeppelin StandardMerkleTree over (inputHash, outputHash, teeSignature)
/// leaves), an individual proof by its fields; the blob id names where the data is kept.
contract InferenceSettlementRelay {
    address public owner;
    mapping(address => bool) public settlers;
    mapping(bytes32 => uint256) public batchSettledAt; // merkle root -> block timestamp

    event BatchSettlement(bytes32 indexed merkleRoot, uint256 batchSize, bytes walrusBlobId);
    event IndividualSettlement(
        bytes32 indexed teeId,
        bytes32 inputHash,
        bytes32 outputHash,
        uint256 timestamp,
        address indexed ethAddress,
        bytes walrusBlobId,
        bytes signature
    );

    error NotSettler();

    constructor() {
        owner = msg.sender;
        settlers[msg.sender] = true;
    }

    function setSettler(address settler, bool allowed) external {
        if (msg.sender != owner) revert NotSettler();
        settlers[settler] = allowed;
    }

    function batchSettle(bytes32 merkleRoot, uint256 batchSize, bytes calldata walrusBlobId) external {
        if (!settlers[msg.sender]) revert NotSettler();
        batchSettledAt[merkleRoot] = block.timestamp;
        emit BatchSettlement(merkleRoot, batchSize, walrusBlobId);
    }

    /// Whether (inputHash, outputHash, signatureHash) is a leaf of an anchored batch: the
    /// StandardMerkleTree leaf (double keccak of the ABI encoding) and OpenZeppelin's verifier.
    function verifyInclusion(bytes32[] calldata proof, bytes32 merkleRoot, bytes32 inputHash, bytes32 outputHash,
                             bytes32 signatureHash) external view returns (bool) {
        if (batchSettledAt[merkleRoot] == 0) return false;
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(inputHash, outputHash, signatureHash))));
        return MerkleProof.verify(proof, merkleRoot, leaf);
    }

    function settleIndividual(
        bytes32 teeId,
        bytes32 inputHash,
        bytes32 outputHash,
        uint256 timestamp,
        address ethAddress,
        bytes calldata walrusBlobId,
        bytes calldata signature
    ) external {
        if (!settlers[msg.sender]) revert NotSettler();
        emit IndividualSettlement(teeId, inputHash, outputHash, timestamp, ethAddress, walrusBlobId, signature);
    }
}
