"""The console's Settlements page on a gateway app in process (Starlette's test client, a
logged-in session): payment channels (those with a pending withdrawal or unclaimed charges
first, amounts in token units) and proofs of inference (the queue, the recent anchoring
transactions with explorer links), put into the gateway's own stores directly; and "not offered"
on a gateway without them."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from gateway.app import GatewayState, create_app
from gateway.batch_channels import Channel
from gateway.console import views
from gateway.settings import GatewaySettings
from gateway.tee.proofs import AnchoredBatch, ProofItem

pytestmark = pytest.mark.integration

TOKEN = "console-settlements-token"
OPG = "0x" + "22" * 20
NETWORK = "eip155:8453"
UNIT = 10**18
KEY = "0x" + "0f" * 32  # a throwaway key: nothing is signed or sent here
IDS = {name: "0x" + ch * 64 for name, ch in (("idle", "a"), ("unclaimed", "b"), ("withdrawing", "c"))}


class NoCalls:
    """No paid call is made here: a facilitator that is ready and never asked."""

    trusted = False

    async def ready(self) -> bool:
        return True

    async def upto_signers(self) -> dict[str, str]:
        return {}

    def can_sign(self, address: str) -> bool:
        return False

    async def close(self) -> None:
        return None


def settings(tmp: Path, *, extras: bool) -> GatewaySettings:
    route: dict[str, Any] = {"path": "/v1/chat/completions", "upstream": "llm", "price": "0.005"}
    doc: dict[str, Any] = {
        "pay_to": "0x" + "11" * 20, "store_url": f"sqlite://{tmp / 'records.sqlite3'}",
        "accepts": [{"network": NETWORK, "asset": OPG, "symbol": "OPG", "decimals": 18, "transfer_method": "permit2",
                     "eip712_name": "OpenGradient", "eip712_version": "1"}],
        "upstreams": {"llm": {"urls": ["http://127.0.0.1:9"]}}, "routes": [route], "quote": {"rates": {"OPG": "1"}},
        "budgets": {}, "explorer_tx_url": "https://explorer.test/tx/{tx}"}
    if extras:  # long intervals: the manager and the batcher leave what the test puts in alone
        route["batch"] = {"receiver_authorizer_key": KEY, "claim_interval_s": 3600, "settle_interval_s": 3600,
                          "sync_interval_s": 3600}
        doc["proofs"] = {"relay": "0x" + "33" * 20, "rpc_url": "http://127.0.0.1:9", "chain_id": 8453,
                         "signer_key": KEY, "interval_s": 3600, "blob_dir": str(tmp / "blobs")}
    return GatewaySettings.model_validate(doc)


@pytest.fixture
def console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    monkeypatch.setenv("BUDGETS_ADMIN_TOKEN", TOKEN)
    app = create_app(settings(tmp_path, extras=request.param), facilitator=NoCalls())
    with TestClient(app) as client:
        r = client.post("/admin/console/login", data={"token": TOKEN}, headers={"Origin": "http://testserver"},
                        follow_redirects=False)
        assert r.status_code == 303
        yield client


async def fill(state: GatewayState, now: float) -> None:
    assert state.channels is not None and state.proofs is not None
    for name, cid in IDS.items():
        await state.channels.mirror(Channel(
            id=cid, network=NETWORK, asset=OPG, payer="0x" + "ab" * 20, route="POST /v1/chat/completions",
            config="{}", requirement="{}", balance=10 * UNIT, total_claimed=UNIT,
            withdraw_at=int(now) - 60 if name == "withdrawing" else 0), now=now)
    unclaimed = IDS["unclaimed"]
    outcome, _ = await state.channels.hold(unclaimed, charged=UNIT, voucher_max=UNIT * 7 // 2, signature="0xsig",
                                           amount=UNIT * 5 // 2, now=now, lease_s=60)
    assert outcome.value == "ok"
    await state.channels.commit(unclaimed, charge=UNIT * 5 // 2)  # charged 3.5, claimed 1: 2.5 unclaimed
    for age in (120, 30):
        await state.proofs.add(ProofItem("0x" + f"{age:064x}", "0x" + "01" * 32, "c2ln", "0x" + "02" * 32, 1, "batch",
                                         "0x" + "ab" * 20, queued_at=now - age))
    await state.proofs.anchored([], [AnchoredBatch("batch", "0x" + "d" * 64, 5, "blob-older", "0x" + "e" * 64, now - 600),
                                     AnchoredBatch("individual", "", 1, "blob-newer", "0x" + "f" * 64, now - 300)])


@pytest.mark.parametrize("console", [True], indirect=True)
def test_settlements_page_shows_channels_and_proofs(console: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    state = console.app.state.gateway  # type: ignore[attr-defined]
    console.portal.call(fill, state, time.time())  # type: ignore[union-attr]
    page = console.get("/admin/console/settlements")
    assert page.status_code == 200
    html = page.text
    rows = re.findall(r'<tr class="channel"><td class="mono" title="(0x[0-9a-f]+)">(.*?)</tr>', html)
    assert [cid for cid, _ in rows] == [IDS["unclaimed"], IDS["withdrawing"], IDS["idle"]]  # attention first
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", cols) for _, cols in rows]  # the columns after the id
    assert cells[0][2:6] == ["10 OPG", "3.5 OPG", "1 OPG", "2.5 OPG"]  # balance, charged, claimed, unclaimed
    assert cells[0][6] == "none" and cells[1][6].startswith("<strong>pending</strong> since ")
    assert cells[2][5] == "0 OPG"
    assert re.search(r'id="proofs-waiting">2 waiting to be anchored; the oldest for 1[2-9]\d s', html)
    batches = re.findall(r'<tr class="proof-batch"><td>[^<]+</td><td>(\w+)</td>.*?href="([^"]+)".*?</tr>', html)
    assert batches == [("individual", "https://explorer.test/tx/0x" + "f" * 64),
                       ("batch", "https://explorer.test/tx/0x" + "e" * 64)]  # newest first, explorer links
    assert "Not offered" not in html
    monkeypatch.setattr(views, "CHANNELS_SHOWN", 2)  # the cap, and its note
    html = console.get("/admin/console/settlements").text
    assert "Showing 2 of 3 channels." in html and html.count('<tr class="channel">') == 2


@pytest.mark.parametrize("console", [False], indirect=True)
def test_settlements_page_without_channels_or_proofs(console: TestClient) -> None:
    html = console.get("/admin/console/settlements").text
    assert "Not offered: no route offers batch-settlement channels." in html
    assert "Not offered: this gateway anchors no proofs of inference." in html
