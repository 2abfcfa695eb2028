"""`x402-facilitator` command line.

Each subcommand is a pair in `COMMANDS`: a function adding its arguments to a subparser and a
function running it (returning the exit code). Add a subcommand by adding one entry. The dev
subcommands (devchain, demo) live in the devtools package, imported only when they run or build
their options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

# ---------------------------------------------------------------------------------------------
# devchain, demo (dev tooling)


def _devchain_arguments(parser: argparse.ArgumentParser) -> None:
    from devtools.devchain_cli import add_arguments

    add_arguments(parser)


def _run_devchain(args: argparse.Namespace) -> int:
    from devtools.devchain_cli import run

    return run(args)


def _run_demo(args: argparse.Namespace) -> int:
    from devtools.facilitator_demo import main

    return main()


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
    from facilitator.app import SERVE_ARGS_ENV, create_app
    from facilitator.serving import serve
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
    serve(lambda: create_app(settings), factory="facilitator.app:app_from_env", env_name=SERVE_ARGS_ENV,
          source=source, workers=args.workers, host=settings.host, port=settings.port, log_level=settings.log_level,
          shutdown_grace_s=settings.shutdown_grace_s)
    return 0


# ---------------------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "devchain": ("run a local anvil chain with Permit2, the x402 proxies and funded test accounts",
                 _devchain_arguments, _run_devchain),
    "demo": ("run the dev chain and the facilitator and settle real payments end to end",
             lambda parser: None, _run_demo),
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
