"""`x402-budgets`: the operator's command line over the budgets admin API.

Tables by default, `--json` for the API's own JSON. Exit codes: 0 ok, 1 the API (or the network)
refused, 2 a usage error. The token comes from --token, BUDGETS_ADMIN_TOKEN or
BUDGETS_ADMIN_TOKEN_FILE and is never printed.

  parser.py    the arguments and their values (amounts, times, rates)
  commands.py  one function per command: the API calls through AdminClient
  render.py    tables and lines from the API's JSON
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from typing import TextIO

from budgets.admin_client import AdminApiError, AdminClient
from budgets.cli.commands import COMMANDS
from budgets.cli.parser import UsageError, build_parser, check, parse_amount, parse_rate, parse_when
from budgets.cli.render import table

__all__ = ["main", "parse_amount", "parse_rate", "parse_when", "table"]


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    parser = build_parser()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
            check(parser, args)
    except SystemExit as exc:  # argparse: 2 for usage errors, 0 for --help
        return int(exc.code or 0)
    token = args.token
    if token is None:
        from budgets.settings import admin_token

        try:
            secret = admin_token()
        except OSError as exc:
            err.write(f"x402-budgets: error: cannot read BUDGETS_ADMIN_TOKEN_FILE: {exc.strerror}\n")
            return 2
        token = secret.get_secret_value() if secret else None
    try:
        asyncio.run(_run(args, token, out))
    except UsageError as exc:
        err.write(f"x402-budgets: error: {exc}\n")
        return 2
    except AdminApiError as exc:
        message = f"{exc} (set BUDGETS_ADMIN_TOKEN or pass --token)" if exc.status == 401 and not token else str(exc)
        err.write(f"error: {message}\n" + "".join(f"  {e.get('loc')}: {e.get('msg')}\n" for e in exc.errors))
        return 1
    return 0


async def _run(args: argparse.Namespace, token: str | None, out: TextIO) -> None:
    async with AdminClient(args.url, token) as client:
        await COMMANDS[args.command](client, args, out)
