"""`x402-gateway` command line: serve, demo, upstream (the local stand-in provider)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import SecretStr, ValidationError


def _reveal(obj: Any) -> Any:
    """Settings as plain JSON with secrets in clear: only for handing them to worker processes
    through the environment of this same process tree."""
    if isinstance(obj, SecretStr):
        return obj.get_secret_value()
    if isinstance(obj, dict):
        return {k: _reveal(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_reveal(v) for v in obj]
    return obj


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


def _load(args: argparse.Namespace):
    from gateway.settings import GatewaySettings, env_tunables, load_gateway_settings

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.store:
        overrides["store_url"] = args.store
    if args.config or os.environ.get("GATEWAY_CONFIG_FILE"):
        settings = load_gateway_settings(args.config, overrides=overrides)
        if args.devchain and settings.facilitator.mode == "local":
            settings.facilitator.devchain_file = args.devchain
    elif args.devchain:
        from facilitator.devchain import load_description
        from gateway.devconfig import dev_settings

        settings = dev_settings(load_description(args.devchain), devchain_file=args.devchain,
                                upstream_urls=[args.upstream], store_url=args.store or "sqlite://.x402-state/gateway.sqlite3",
                                port=args.port if args.port is not None else 8402,
                                upstream_auth=os.environ.get("GATEWAY_DEV_UPSTREAM_KEY"))
        settings = GatewaySettings.model_validate(settings.model_dump() | env_tunables(os.environ) | (
            {"host": args.host} if args.host else {}))
    else:
        raise ValueError("give --config FILE (or GATEWAY_CONFIG_FILE), or --devchain FILE for local use")
    if args.facilitator_url:
        settings.facilitator.mode, settings.facilitator.url = "remote", args.facilitator_url
    return settings


def _run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from facilitator.logs import configure_logging
    from gateway.app import create_app

    try:
        settings = _load(args)
    except (OSError, ValueError, ValidationError) as exc:
        print(f"error: invalid gateway settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    common = dict(host=settings.host, port=settings.port, loop="uvloop", http="httptools",
                  log_level=settings.log_level, access_log=False,
                  timeout_graceful_shutdown=int(settings.shutdown_grace_s))
    if args.workers > 1:
        os.environ["GATEWAY_RESOLVED_SETTINGS"] = json.dumps(_reveal(settings.model_dump(mode="python")), default=str)
        uvicorn.run("gateway.app:app_from_env", factory=True, workers=args.workers, **common)
    else:
        uvicorn.run(create_app(settings), **common)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from gateway.demo import main

    return main()


def _upstream_arguments(p: argparse.ArgumentParser) -> None:
    from gateway.devupstream import add_arguments

    add_arguments(p)


def _run_upstream(args: argparse.Namespace) -> int:
    from gateway.devupstream import serve

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
