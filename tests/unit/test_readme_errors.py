"""The README's table of errors an agent can get is the code's: every reason the gateway raises is
listed, and every name listed is one the code can answer with."""

from __future__ import annotations

import re
from pathlib import Path

from budgets.models import BudgetReason
from facilitator.x402.reasons import ErrorReason
from gateway.errors import GatewayReason

README = Path(__file__).resolve().parents[2] / "README.md"


def table_reasons() -> set[str]:
    text = README.read_text()
    section = text.split("### Errors an agent can get", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| status")]
    names: set[str] = set()
    for row in rows:
        cells = row.split("|")
        if len(cells) > 2:
            names |= set(re.findall(r"`([a-z0-9_]+)`", cells[2]))
    return names


def test_every_gateway_reason_is_in_the_readme() -> None:
    listed = table_reasons()
    missing = {r.value for r in GatewayReason} - listed
    assert not missing, f"README's table of errors lacks {sorted(missing)}"
    assert not {r.value for r in BudgetReason} - listed


def test_every_listed_reason_exists() -> None:
    known = {r.value for r in GatewayReason} | {r.value for r in BudgetReason} | {r.value for r in ErrorReason}
    unknown = table_reasons() - known
    assert not unknown, f"README lists errors the code never answers: {sorted(unknown)}"
