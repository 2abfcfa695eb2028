"""`x402-facilitator` command line.

Each subcommand is a pair in `COMMANDS`: a function adding its arguments to a subparser and a
function running it (returning the exit code). Add a subcommand by adding one entry.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from eth_abi import decode as abi_decode


# ---------------------------------------------------------------------------------------------
# devchain


def _devchain_arguments(parser: argparse.ArgumentParser) -> None:
    from facilitator.devchain import DEFAULT_CHAIN_ID

    parser.add_argument("--port", type=int, default=8545, help="RPC port (default 8545; 0 = any free port)")
    parser.add_argument("--chain-id", type=int, default=DEFAULT_CHAIN_ID,
                        help=f"chain id (default {DEFAULT_CHAIN_ID}; 8453 also works; never 31337)")
    parser.add_argument("--agents", type=int, default=3, help="number of funded agent accounts (default 3)")
    parser.add_argument("--facilitators", type=int, default=3, help="number of facilitator signers (default 3)")
    parser.add_argument("--out", required=True, help="write the chain description (JSON, with private keys) here")


def _format_units(value: int, decimals: int) -> str:
    whole, frac = divmod(value, 10**decimals)
    return f"{whole:,}" + (f".{frac:0{decimals}d}".rstrip("0") if frac else "")


def _summary(chain: Any, out: str) -> str:
    from facilitator.devchain import calldata

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


def _run_devchain(args: argparse.Namespace) -> int:
    from facilitator.devchain import DevChain, DevChainError, write_description

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


# ---------------------------------------------------------------------------------------------
# serve


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML settings file (or FACILITATOR_CONFIG_FILE)")
    parser.add_argument("--devchain", help="take networks, tokens and signer keys from a devchain description")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 4020)")
    parser.add_argument("--store", help="settlement store URL: redis://… , sqlite:///path or memory://")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")


def _run_serve(args: argparse.Namespace) -> int:
    import json
    import os

    import uvicorn

    from facilitator.app import SERVE_ARGS_ENV, create_app
    from facilitator.settings import load_settings

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.store:
        overrides["store_url"] = args.store
    source = {"config": args.config, "devchain": args.devchain, "overrides": overrides}
    try:
        settings = load_settings(args.config, devchain_file=args.devchain, overrides=overrides)
    except (OSError, ValueError) as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    common: dict[str, Any] = dict(host=settings.host, port=settings.port, loop="uvloop", http="httptools",
                                  log_level=settings.log_level, access_log=False,
                                  timeout_graceful_shutdown=int(settings.shutdown_grace_s))
    if args.workers > 1:
        # Workers load the settings themselves from the same files and environment: only where to
        # find them goes into their environment, never a resolved secret (/proc/PID/environ).
        os.environ[SERVE_ARGS_ENV] = json.dumps(source)
        uvicorn.run("facilitator.app:app_from_env", factory=True, workers=args.workers, **common)
        return 0
    uvicorn.run(create_app(settings), **common)
    return 0


# ---------------------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "devchain": ("run a local anvil chain with Permit2, the x402 proxies and funded test accounts",
                 _devchain_arguments, _run_devchain),
    "demo": ("run the dev chain and the facilitator and settle real payments end to end",
             lambda parser: None, lambda args: __import__("facilitator.demo", fromlist=["main"]).main()),
    "serve": ("run the facilitator HTTP service (/verify, /settle, /supported, /metrics)",
              _serve_arguments, _run_serve),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x402-facilitator", description="x402 payment facilitator")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, _, run = COMMANDS[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
