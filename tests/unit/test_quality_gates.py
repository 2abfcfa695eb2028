"""The quality gates, run by the suite so that `make test` (and so CI) fails when they fail: ruff
over the product packages, devtools, tests and loadtests, and mypy over the product packages and
devtools (strict on storage, facilitator.x402, gateway.paywall and gateway.tee). What they check, and where, is
configured in pyproject.toml ([tool.ruff], [tool.mypy]); mypy keeps its cache in .mypy_cache, so
runs after the first are incremental."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          check=False)


def test_ruff_is_clean() -> None:
    result = _run("ruff", "check", "--no-cache", "--output-format", "concise")
    assert result.returncode == 0, f"ruff check found problems:\n{result.stdout}{result.stderr}"


def test_mypy_is_clean() -> None:
    result = _run("mypy")
    assert result.returncode == 0, f"mypy found problems:\n{result.stdout}{result.stderr}"
