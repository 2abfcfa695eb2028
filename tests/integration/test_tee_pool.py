"""A tee pool (gateway/tee/pool.py) over real stand-in enclaves (HTTPS) registered in a registry of
its own on the dev chain: discovery, spread over the active enclaves, and a forging enclave
(every answer's signature bad) taken out of rotation after `eject_after` faults in a row while the
honest one carries on. The paid end-to-end cases are in tests/e2e/test_gateway_tee.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from devtools import tee_registry
from devtools.tee_enclave import EnclaveIdentity
from gateway.settings import Upstream
from gateway.tee.pool import TeePool
from gateway.tee.proof import ProofError
from gateway.tee.verify import verify_body
from tests.conftest import _port
from tests.tee_helpers import Enclave

pytestmark = pytest.mark.integration

BODY = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "who signed this"}]})


async def test_a_forging_enclave_leaves_rotation_the_honest_one_carries_on(devchain: dict[str, Any], tmp_path: Path) -> None:
    registry = tee_registry.deploy_registry(devchain)
    procs: list[Any] = []
    ids: dict[str, str] = {}
    try:
        for name, fault in (("honest", None), ("forger", "bad-signature")):
            port = _port()
            identity = EnclaveIdentity.load_or_create(tmp_path / name)
            ids[name] = tee_registry.register(devchain, identity, f"https://127.0.0.1:{port}", registry=registry)
            argv = [sys.executable, "-m", "devtools.upstream", "--port", str(port), "--tee-dir", str(tmp_path / name)]
            argv += ["--tee-fault", fault] if fault else []
            proc = Enclave(argv, port, dict(os.environ), tmp_path / f"{name}.log")
            procs.append(proc)
            proc.start()
        pool = TeePool("og", Upstream.model_validate({"kind": "tee", "tee": {
            "registry": registry, "rpc_url": devchain["rpc_url"], "eject_after": 2, "eject_s": 600}}))
        async with aiohttp.ClientSession() as session:
            await pool.start(session)
            try:
                assert set(pool.enclaves) == set(ids.values())
                outcomes: list[tuple[str, str]] = []
                for _ in range(8):
                    resp, enclave = await pool.open(session, "POST", "/v1/chat/completions",
                                                    {"content-type": "application/json"}, BODY)
                    content = await resp.read()
                    try:
                        verify_body(enclave, pool.settings, BODY, content)
                        pool.verified(enclave)
                        outcomes.append((enclave.tee_id, "ok"))
                    except ProofError as exc:
                        pool.fault(enclave, exc.reason)
                        outcomes.append((enclave.tee_id, exc.reason))
                forged = [o for o in outcomes if o[0] == ids["forger"]]
                assert forged == [(ids["forger"], "bad_signature")] * 2  # then out of rotation
                assert all(o == (ids["honest"], "ok") for o in outcomes if o[0] == ids["honest"])
                assert len(outcomes) - len(forged) == 6
                assert [e.tee_id for e in pool.eligible()] == [ids["honest"]]
            finally:
                await pool.close()
    finally:
        for proc in procs:
            proc.stop()
