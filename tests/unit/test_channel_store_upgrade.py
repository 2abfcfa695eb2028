"""A SQLite channel store written before calls had holders (no `holder` column) is opened,
upgraded in place, and serves its channels with what they had charged."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from gateway.batch_channels import HoldOutcome, SQLiteChannelStore

_OLD = """
CREATE TABLE batch_channels (
    id TEXT PRIMARY KEY, network TEXT, asset TEXT, payer TEXT, route TEXT, config TEXT, requirement TEXT,
    charged TEXT, signed_max TEXT, signature TEXT, balance TEXT, total_claimed TEXT, withdraw_at INTEGER,
    refund_nonce TEXT, held TEXT, hold_until REAL, synced_at REAL);
"""


async def test_a_file_from_before_holders_is_upgraded_and_keeps_its_channels(tmp_path: Path) -> None:
    path = str(tmp_path / "old-channels.sqlite3")
    db = sqlite3.connect(path)
    db.executescript(_OLD)
    db.execute("INSERT INTO batch_channels VALUES ('0xc1', 'eip155:84532', '0xt', '0xp', 'POST /x', '{}', '{}', '5', '5',"
               " '0xv', '100', '0', 0, '0', '0', 0, 0)")
    db.commit()
    db.close()
    store = SQLiteChannelStore(path)
    again = SQLiteChannelStore(path)  # a second process opening it: nothing to add any more
    now = time.time()
    outcome, channel = await store.hold("0xc1", charged=5, voucher_max=10, signature="0xw", amount=5, now=now,
                                        lease_s=15, holder="call-1")
    assert outcome == HoldOutcome.OK and channel is not None and channel.holder == "call-1"
    done = await again.commit("0xc1", charge=5, holder="call-1")
    assert done is not None and (done.charged, done.held, done.holder) == (10, 0, "")
    await store.close()
    await again.close()
