"""Recursive Length Prefix encoding of what a transaction holds: unsigned integers, byte strings
and lists of them.

pyrlp's `rlp.encode` infers a serializer per item and took as long as the signature itself
(~40 % of signing a settlement transaction); this does the same encoding by concatenation.
tests/unit/test_fast_signer.py checks it against pyrlp and against eth_account's transactions.
"""

from __future__ import annotations

from collections.abc import Sequence

Item = int | bytes | Sequence["Item"]


def _length_prefix(length: int, offset: int) -> bytes:
    if length < 56:
        return bytes((offset + length,))
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((offset + 55 + len(size),)) + size


def encode(item: Item) -> bytes:
    if isinstance(item, int):
        if item < 0:
            raise ValueError("RLP encodes unsigned integers only")
        # An integer is its minimal big-endian bytes (zero is the empty string).
        item = item.to_bytes((item.bit_length() + 7) // 8, "big")
    if isinstance(item, (bytes, bytearray)):
        if len(item) == 1 and item[0] < 0x80:
            return bytes(item)
        return _length_prefix(len(item), 0x80) + item
    payload = b"".join(encode(x) for x in item)
    return _length_prefix(len(payload), 0xC0) + payload
