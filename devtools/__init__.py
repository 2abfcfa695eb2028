"""Dev tooling, kept out of the product packages (storage, facilitator, budgets, gateway).

- devchain: a local anvil chain with Permit2, the x402 proxies and OPG/USDC stand-ins
  (`x402-facilitator devchain`); solidity: its build inputs; rpc: blocking JSON-RPC over the
  facilitator's client.
- upstream: the stand-in AI provider (`x402-gateway upstream`); devconfig: the gateway's settings
  for local use (`x402-gateway serve --devchain FILE`).
- demo (`x402-gateway demo`, `make demo`) and facilitator_demo (`x402-facilitator demo`).

The product packages reach this package only through imports inside the dev subcommands of their
command lines; this package may import any of them.
"""
