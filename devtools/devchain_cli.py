"""`x402-facilitator devchain`: run the dev chain until SIGINT/SIGTERM, its description in a file."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from eth_abi import decode as abi_decode

from devtools import tee_registry
from devtools.devchain import (
    DEFAULT_CHAIN_ID,
    TEE_OPERATORS,
    DevChain,
    DevChainError,
    calldata,
    write_description,
)
from devtools.tee_enclave import EnclaveIdentity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8545, help="RPC port (default 8545; 0 = any free port)")
    parser.add_argument("--chain-id", type=int, default=DEFAULT_CHAIN_ID,
                        help=f"chain id (default {DEFAULT_CHAIN_ID}; 8453 also works; never 31337)")
    parser.add_argument("--agents", type=int, default=3, help="number of funded agent accounts (default 3)")
    parser.add_argument("--facilitators", type=int, default=3, help="number of facilitator signers (default 3)")
    parser.add_argument("--out", required=True, help="write the chain description (JSON, with private keys) here")
    parser.add_argument("--tee-enclave", action="append", default=[], metavar="DIR=URL",
                        help="register a stand-in enclave (identity in DIR, created when missing; served at the https "
                             "URL by `python -m devtools.upstream --tee-dir DIR`) in the TEE registry; repeatable")


def _format_units(value: int, decimals: int) -> str:
    whole, frac = divmod(value, 10**decimals)
    return f"{whole:,}" + (f".{frac:0{decimals}d}".rstrip("0") if frac else "")


def _summary(chain: DevChain, out: str) -> str:
    d = chain.description
    accounts = d["accounts"]
    rows = ([("facilitator", a["address"]) for a in accounts["facilitator"]]
            + [("payee", accounts["payee"]["address"])]
            + [("agent", a["address"]) for a in accounts["agents"]])
    tokens = list(d["tokens"].items())
    calls: list[tuple[str, list[Any]]] = []
    for _, address in rows:
        calls.append(("eth_getBalance", [address, "latest"]))
        for _, token in tokens:
            data = "0x" + calldata("balanceOf(address)", ["address"], [address]).hex()
            calls.append(("eth_call", [{"to": token["address"], "data": data}, "latest"]))
    results = iter(chain.rpc.batch(calls))

    lines = [
        "x402 dev chain is running",
        f"  RPC URL     {d['rpc_url']}",
        f"  chain id    {d['chain_id']} ({d['network']})",
        f"  Permit2     {d['contracts']['permit2']}",
        f"  exact proxy {d['contracts']['exact_proxy']}",
        f"  upto proxy  {d['contracts']['upto_proxy']}",
        f"  TEE registry {d['contracts']['tee_registry']}, settlement relay {d['contracts']['settlement_relay']}",
    ]
    for symbol, token in tokens:
        lines.append(f"  {symbol:<11} {token['address']} ({token['decimals']} decimals, "
                     f"{token['transfer_method']}, EIP-712 {token['eip712_name']!r} v{token['eip712_version']})")
    lines.append("  accounts:")
    for role, address in rows:
        balances = [f"{_format_units(int(next(results), 16), 18)} ETH"]
        for symbol, token in tokens:
            (raw,) = abi_decode(["uint256"], bytes.fromhex(next(results)[2:]))
            balances.append(f"{_format_units(raw, token['decimals'])} {symbol}")
        lines.append(f"    {role:<11} {address}  " + ", ".join(balances))
    lines.append(f"  private keys are in {out}")
    lines.append("  stop with Ctrl-C (SIGINT) or SIGTERM")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        chain = DevChain(port=args.port or None, chain_id=args.chain_id, agents=args.agents,
                         facilitators=args.facilitators)
        with chain:
            write_description(chain.description, args.out)
            print(_summary(chain, args.out), flush=True)
            for i, spec in enumerate(args.tee_enclave):
                directory, _, url = spec.partition("=")
                if not url.startswith("https://"):
                    raise DevChainError(f"--tee-enclave {spec!r}: expected DIR=https://host:port")
                identity = EnclaveIdentity.load_or_create(directory)
                tee_id = tee_registry.register(chain.description, identity, url, operator_index=i % TEE_OPERATORS)
                print(f"  TEE enclave {tee_id} at {url} (identity in {directory}, TEE registry "
                      f"{chain.tee_registry})", flush=True)
            while not stop.wait(0.5):
                if not chain.running:
                    print("anvil exited unexpectedly", file=sys.stderr)
                    return 1
        print("dev chain stopped", flush=True)
        return 0
    except DevChainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
