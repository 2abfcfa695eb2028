"""Embedded settlement store on SQLite: the single-process default, durable across restarts.
BEGIN IMMEDIATE makes claim atomic even when several processes on one host share the file."""

from __future__ import annotations

import sqlite3

from facilitator.store.base import ClaimResult, SettlementRecord, SettlementState, StoreUnavailableError
from storage import BackendErrors, connect_sqlite, immediate

_errors = BackendErrors(StoreUnavailableError)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settlements (
    key TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    state TEXT NOT NULL,
    lease_until_ms INTEGER NOT NULL DEFAULT 0,
    tx_hash TEXT NOT NULL DEFAULT '',
    raw_tx TEXT NOT NULL DEFAULT '',
    signer TEXT NOT NULL DEFAULT '',
    response TEXT NOT NULL DEFAULT '',
    updated_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS settlements_state ON settlements (state, updated_ms);
"""

_COLUMNS = "key, digest, state, lease_until_ms, tx_hash, raw_tx, signer, response, updated_ms"


def _row(row: tuple) -> SettlementRecord:
    return SettlementRecord(
        key=row[0],
        digest=row[1],
        state=SettlementState(row[2]),
        lease_until_ms=row[3],
        tx_hash=row[4],
        raw_tx=row[5],
        signer=row[6],
        response=row[7],
        updated_ms=row[8],
    )


class SQLiteSettlementStore:
    def __init__(self, path: str) -> None:
        try:
            self._db = connect_sqlite(path, _SCHEMA)
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"cannot open settlement store: {exc}") from exc

    def _get(self, key: str) -> SettlementRecord | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM settlements WHERE key = ?", (key,)).fetchone()
        return _row(row) if row else None

    async def claim(self, key: str, digest: str, *, now_ms: int, lease_ms: int) -> ClaimResult:
        with immediate(self._db, StoreUnavailableError):
            existing = self._get(key)
            if existing is None or (
                existing.state == SettlementState.CLAIMED and existing.lease_until_ms < now_ms
            ):
                self._db.execute(
                    "INSERT OR REPLACE INTO settlements (key, digest, state, lease_until_ms, updated_ms)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (key, digest, SettlementState.CLAIMED.value, now_ms + lease_ms, now_ms),
                )
                return ClaimResult(won=True, record=None)
            return ClaimResult(won=False, record=existing)

    @_errors
    async def mark_submitted(
        self, key: str, digest: str, *, tx_hash: str, raw_tx: str, signer: str, response: str, now_ms: int
    ) -> None:
        cur = self._db.execute(
            "UPDATE settlements SET state = ?, tx_hash = ?, raw_tx = ?, signer = ?, response = ?, updated_ms = ?"
            " WHERE key = ? AND digest = ? AND state IN ('claimed', 'submitted')",
            (SettlementState.SUBMITTED.value, tx_hash, raw_tx, signer, response, now_ms, key, digest),
        )
        if cur.rowcount != 1:
            raise StoreUnavailableError(f"settlement record {key} was not in a submittable state")

    @_errors
    async def finish(self, key: str, digest: str, *, state: SettlementState, response: str, now_ms: int) -> None:
        self._db.execute(
            "UPDATE settlements SET state = ?, response = ?, updated_ms = ? WHERE key = ? AND digest = ?",
            (state.value, response, now_ms, key, digest),
        )

    @_errors
    async def release(self, key: str, digest: str) -> None:
        self._db.execute(
            "DELETE FROM settlements WHERE key = ? AND digest = ? AND state IN ('claimed', 'submitted')", (key, digest)
        )

    @_errors
    async def get(self, key: str) -> SettlementRecord | None:
        return self._get(key)

    @_errors
    async def unfinished(self, *, older_than_ms: int, limit: int = 100) -> list[SettlementRecord]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM settlements WHERE (state = 'submitted' AND updated_ms < ?)"
            " OR (state = 'claimed' AND lease_until_ms < ?) ORDER BY updated_ms LIMIT ?",
            (older_than_ms, older_than_ms, limit),
        ).fetchall()
        return [_row(r) for r in rows]

    @_errors
    async def ping(self) -> None:
        self._db.execute("SELECT 1").fetchone()

    async def close(self) -> None:
        self._db.close()
