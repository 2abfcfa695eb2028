"""The gateway's command line as the README gives it, run as an operator would."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _port
from tests.gateway_client import call

pytestmark = pytest.mark.e2e

X402_GATEWAY = str(Path(sys.executable).with_name("x402-gateway"))  # the installed console script


async def test_readme_upstream_command_serves_the_stand_in_provider(spawn: Any) -> None:
    port = _port()  # README: `x402-gateway upstream --port 8000` (another free port here)
    upstream = spawn([X402_GATEWAY, "upstream", "--port", str(port), "--name", "readme", "--require-auth", "sk-readme"],
                     port)
    r = await call(upstream.url + "/v1/models", method="GET", headers={"Authorization": "Bearer sk-readme"})
    assert r.status == 200 and r.headers["X-Devupstream-Name"] == "readme"
    assert "gpt-4o-mini" in [m["id"] for m in r.json()["data"]]
    r = await call(upstream.url + "/v1/models", method="GET")
    assert r.status == 401  # --require-auth was taken too
