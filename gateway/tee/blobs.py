"""Where anchored proof batches are kept (OpenGradient keeps them on Walrus): a blob store keyed
by the content's hash, so the id names the bytes and anyone holding them can check it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from pathlib import Path
from typing import Protocol

_BLOB_ID = re.compile(r"^[0-9a-f]{64}$")


def blob_id_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore(Protocol):
    async def put(self, data: bytes) -> str:
        """Store `data`; returns its blob id (sha256 hex of the bytes)."""
        ...

    async def get(self, blob_id: str) -> bytes | None: ...


class LocalBlobStore:
    """Files in a directory, one per blob, named by the blob id (written atomically)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def _put(self, data: bytes) -> str:
        blob_id = blob_id_of(data)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / blob_id
        if not path.exists():
            tmp = path.with_name(f".{blob_id}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return blob_id

    def _get(self, blob_id: str) -> bytes | None:
        if not _BLOB_ID.match(blob_id):
            return None
        path = self.directory / blob_id
        return path.read_bytes() if path.is_file() else None

    async def put(self, data: bytes) -> str:
        return await asyncio.to_thread(self._put, data)

    async def get(self, blob_id: str) -> bytes | None:
        return await asyncio.to_thread(self._get, blob_id)
