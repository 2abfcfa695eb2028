"""`x402-gateway` command line: serve, demo, upstream (the local stand-in provider).

The dev pieces (`serve --devchain` without a config, demo, upstream) live in the devtools package,
imported only inside the subcommand that needs them."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

if TYPE_CHECKING:
    from gateway.settings import GatewaySettings


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="gateway TOML (or GATEWAY_CONFIG_FILE)")
    p.add_argument("--devchain", help="local use: accept the dev chain's tokens, pay its payee, facilitator in-process")
    p.add_argument("--upstream", default="http://127.0.0.1:8000",
                   help="with --devchain and no --config: the stand-in upstream's URL (default %(default)s);"
                        " its key comes from GATEWAY_DEV_UPSTREAM_KEY")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8402)")
    p.add_argument("--store", help="payment records: redis://… , sqlite:///path or memory://")
    p.add_argument("--facilitator-url", help="use a remote facilitator instead of the in-process one")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")


SERVE_ARGS_ENV = "GATEWAY_SERVE_ARGS"
_SOURCE_ARGS = ("config", "devchain", "upstream", "host", "port", "store", "facilitator_url")



def load_serve_settings(source: dict[str, Any]) -> GatewaySettings:
    """The settings `serve` runs with, from its command-line options (`_SOURCE_ARGS`), the files
    they name and the environment ("$VAR" secrets are resolved here, in each process)."""
    from gateway.settings import GatewaySettings, env_tunables, load_gateway_settings

    config, devchain, host, port, store = (source[k] for k in ("config", "devchain", "host", "port", "store"))
    overrides: dict[str, Any] = {}
    if host:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if store:
        overrides["store_url"] = store
    if config or os.environ.get("GATEWAY_CONFIG_FILE"):
        settings = load_gateway_settings(config, overrides=overrides)
        if devchain and settings.facilitator.mode == "local":
            settings.facilitator.devchain_file = devchain
    elif devchain:
        from devtools.devchain import load_description
        from devtools.devconfig import dev_settings

        settings = dev_settings(load_description(devchain), devchain_file=devchain,
                                upstream_urls=[source["upstream"]], store_url=store or "sqlite://.x402-state/gateway.sqlite3",
                                port=port if port is not None else 8402,
                                upstream_auth=os.environ.get("GATEWAY_DEV_UPSTREAM_KEY"))
        settings = GatewaySettings.model_validate(settings.model_dump() | env_tunables(os.environ) | (
            {"host": host} if host else {}) | _dev_budgets(settings.store_url))
    else:
        raise ValueError("give --config FILE (or GATEWAY_CONFIG_FILE), or --devchain FILE for local use")
    if source["facilitator_url"]:
        settings.facilitator.mode, settings.facilitator.url = "remote", source["facilitator_url"]
    return settings


def _dev_budgets(store_url: str) -> dict[str, Any]:
    """On the dev chain, with an admin token set: budgets on (the admin API and the console need
    them), generous for unlisted wallets (1000 of each asset a day, no rate limit), kept in memory
    when the records are."""
    from budgets.settings import admin_token

    if admin_token() is None:
        return {}
    store = {"store_url": "memory://"} if store_url == "memory://" else {}
    return {"budgets": {"default": "budget", "default_daily": "1000", "default_rate_per_minute": None, **store}}


def _run_serve(args: argparse.Namespace) -> int:
    from facilitator.logs import configure_logging
    from facilitator.serving import serve
    from gateway.app import create_app

    source = {k: getattr(args, k) for k in _SOURCE_ARGS}
    try:
        settings = load_serve_settings(source)
    except (OSError, ValueError, ValidationError) as exc:
        print(f"error: invalid gateway settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    serve(lambda: create_app(settings), factory="gateway.app:app_from_env", env_name=SERVE_ARGS_ENV, source=source,
          workers=args.workers, host=settings.host, port=settings.port, log_level=settings.log_level,
          shutdown_grace_s=settings.shutdown_grace_s)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from devtools.demo import main

    return main()


def _upstream_arguments(p: argparse.ArgumentParser) -> None:
    from devtools.upstream import add_arguments

    add_arguments(p)


def _run_upstream(args: argparse.Namespace) -> int:
    from devtools.upstream import serve

    return serve(args)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "serve": ("run the paid gateway", _serve_arguments, _run_serve),
    "demo": ("dev chain + facilitator + stand-in upstream + an agent paying with the official x402 client",
             lambda p: None, _run_demo),
    "upstream": ("run the local stand-in AI provider (OpenAI, Anthropic, KServe protocols)",
                 _upstream_arguments, _run_upstream),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="x402-gateway", description="x402 agent payment gateway")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
