// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";

/// @title Dev-chain stand-in for the OpenGradient OPG token
/// @notice 18 decimals, EIP-2612 (domain "OpenGradient", version "1"), no EIP-3009:
///         x402 pays with it through Permit2. `mint` is open: dev chain only.
contract OpgToken is ERC20, ERC20Permit {
    constructor() ERC20("OpenGradient", "OPG") ERC20Permit("OpenGradient") {}

    function version() external pure returns (string memory) {
        return "1";
    }

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }
}
