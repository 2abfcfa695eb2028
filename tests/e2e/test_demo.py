"""The README's first command: the demo runs end to end and exits 0."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("module", ["gateway.cli", "facilitator.cli"])
def test_demo_exits_zero(module: str) -> None:
    proc = subprocess.run([sys.executable, "-m", module, "demo"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo passed" in proc.stdout
    assert "FAIL" not in proc.stdout
