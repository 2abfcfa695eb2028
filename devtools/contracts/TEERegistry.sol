// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// Our own TEE registry for the dev chain, with the read ABI of OpenGradient's TEERegistry
/// (getActiveTEEs / getTEE / TEEInfo, x402-protocol.md §7.6). Registration is by the owner, who
/// gives the enclave's key and certificate (no attestation precompile here); an enclave (or the
/// owner) sends heartbeats. Active = enabled, approved PCR, heartbeat younger than heartbeatMaxAge.
contract TEERegistry {
    struct OHTTPConfig {
        uint8 keyId;
        uint16 kemId;
        uint16 kdfId;
        uint16 aeadId;
        bytes publicKey;
        bytes keyConfig;
        uint256 registeredAt;
    }

    struct TEEInfo {
        address owner;
        address paymentAddress;
        string endpoint;
        bytes publicKey; // DER SubjectPublicKeyInfo (RSA)
        bytes tlsCertificate; // DER
        bytes32 pcrHash;
        uint8 teeType;
        bool enabled;
        uint256 registeredAt;
        uint256 lastHeartbeatAt;
        OHTTPConfig ohttpConfig;
    }

    address public owner;
    uint256 public heartbeatMaxAge = 1800;
    mapping(bytes32 => TEEInfo) private tees;
    mapping(bytes32 => bool) public approvedPCRs;
    bytes32[] private teeIds;

    event TEERegistered(bytes32 indexed teeId, address indexed owner, string endpoint, uint8 teeType);
    event TEEEnabled(bytes32 indexed teeId, bool enabled);
    event Heartbeat(bytes32 indexed teeId, uint256 timestamp);
    event PCRApproved(bytes32 indexed pcrHash, bool approved);

    error NotOwner();
    error UnknownTEE(bytes32 teeId);
    error AlreadyRegistered(bytes32 teeId);

    constructor() {
        owner = msg.sender;
    }

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner();
        _;
    }

    function setPCRApproved(bytes32 pcrHash, bool approved) external onlyOwner {
        approvedPCRs[pcrHash] = approved;
        emit PCRApproved(pcrHash, approved);
    }

    function setHeartbeatMaxAge(uint256 maxAge) external onlyOwner {
        heartbeatMaxAge = maxAge;
    }

    /// teeId = keccak256(publicKey), as OpenGradient's clients compute it.
    function registerTEE(
        address teeOwner,
        address paymentAddress,
        string calldata endpoint,
        bytes calldata publicKey,
        bytes calldata tlsCertificate,
        bytes32 pcrHash,
        uint8 teeType
    ) external onlyOwner returns (bytes32 teeId) {
        teeId = keccak256(publicKey);
        if (tees[teeId].registeredAt != 0) revert AlreadyRegistered(teeId);
        TEEInfo storage t = tees[teeId];
        t.owner = teeOwner;
        t.paymentAddress = paymentAddress;
        t.endpoint = endpoint;
        t.publicKey = publicKey;
        t.tlsCertificate = tlsCertificate;
        t.pcrHash = pcrHash;
        t.teeType = teeType;
        t.enabled = true;
        t.registeredAt = block.timestamp;
        t.lastHeartbeatAt = block.timestamp;
        teeIds.push(teeId);
        emit TEERegistered(teeId, teeOwner, endpoint, teeType);
    }

    function setTEEEnabled(bytes32 teeId, bool enabled) external onlyOwner {
        if (tees[teeId].registeredAt == 0) revert UnknownTEE(teeId);
        tees[teeId].enabled = enabled;
        emit TEEEnabled(teeId, enabled);
    }

    function heartbeat(bytes32 teeId) external {
        TEEInfo storage t = tees[teeId];
        if (t.registeredAt == 0) revert UnknownTEE(teeId);
        if (msg.sender != t.owner && msg.sender != owner) revert NotOwner();
        t.lastHeartbeatAt = block.timestamp;
        emit Heartbeat(teeId, block.timestamp);
    }

    function isTEEEnabled(bytes32 teeId) public view returns (bool) {
        return tees[teeId].enabled;
    }

    function isTEEActive(bytes32 teeId) public view returns (bool) {
        TEEInfo storage t = tees[teeId];
        return t.enabled && approvedPCRs[t.pcrHash] && block.timestamp <= t.lastHeartbeatAt + heartbeatMaxAge;
    }

    function getTEE(bytes32 teeId) external view returns (TEEInfo memory) {
        if (tees[teeId].registeredAt == 0) revert UnknownTEE(teeId);
        return tees[teeId];
    }

    function getTEEsByType(uint8 teeType) external view returns (bytes32[] memory ids) {
        return _select(teeType, 0);
    }

    function getEnabledTEEs(uint8 teeType) external view returns (TEEInfo[] memory) {
        return _infos(_select(teeType, 1));
    }

    function getActiveTEEs(uint8 teeType) external view returns (TEEInfo[] memory) {
        return _infos(_select(teeType, 2));
    }

    /// filter 0: all of the type, 1: enabled, 2: active.
    function _select(uint8 teeType, uint8 filter) private view returns (bytes32[] memory ids) {
        uint256 n;
        bytes32[] memory all = new bytes32[](teeIds.length);
        for (uint256 i = 0; i < teeIds.length; i++) {
            bytes32 id = teeIds[i];
            if (tees[id].teeType != teeType) continue;
            if (filter == 1 && !tees[id].enabled) continue;
            if (filter == 2 && !isTEEActive(id)) continue;
            all[n++] = id;
        }
        ids = new bytes32[](n);
        for (uint256 i = 0; i < n; i++) ids[i] = all[i];
    }

    function _infos(bytes32[] memory ids) private view returns (TEEInfo[] memory out) {
        out = new TEEInfo[](ids.length);
        for (uint256 i = 0; i < ids.length; i++) out[i] = tees[ids[i]];
    }
}
