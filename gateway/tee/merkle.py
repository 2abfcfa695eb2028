"""OpenZeppelin's StandardMerkleTree (`@openzeppelin/merkle-tree`, format "standard-v1"), written
from its specification: the tree OpenGradient's settlement batches are anchored with.

- leaf = keccak256(keccak256(abi.encode(values)))  (double hashed: no second-preimage with a node)
- nodes hash their two children sorted: keccak256(min(a, b) ‖ max(a, b))
- the leaves are sorted by hash, laid out at the end of the array in reverse (tree[n-1-i]);
  tree[i] = hash(tree[2i+1], tree[2i+2]); the root is tree[0]
- a proof is the siblings from the leaf up; OpenZeppelin's `MerkleProof.verify` checks it on chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_abi import encode as abi_encode
from eth_utils import keccak

LEAF_ENCODING = ["bytes32", "bytes32", "bytes32"]  # (inputHash, outputHash, teeSignature digest)


def leaf_hash(values: list[Any], encoding: list[str] = LEAF_ENCODING) -> bytes:
    return keccak(keccak(abi_encode(encoding, values)))


def hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(min(a, b) + max(a, b))


def verify(proof: list[bytes], root: bytes, leaf: bytes) -> bool:
    node = leaf
    for sibling in proof:
        node = hash_pair(node, sibling)
    return node == root


@dataclass(frozen=True)
class StandardMerkleTree:
    tree: list[bytes]
    values: list[tuple[list[Any], int]]  # (value, tree index), in the order given
    encoding: list[str]

    @classmethod
    def of(cls, values: list[list[Any]], encoding: list[str] = LEAF_ENCODING) -> StandardMerkleTree:
        if not values:
            raise ValueError("a Merkle tree needs at least one leaf")
        hashed = sorted(((leaf_hash(v, encoding), i) for i, v in enumerate(values)), key=lambda t: t[0])
        n = len(hashed)
        tree: list[bytes] = [b""] * (2 * n - 1)
        index_of: dict[int, int] = {}
        for i, (h, value_index) in enumerate(hashed):
            tree[len(tree) - 1 - i] = h
            index_of[value_index] = len(tree) - 1 - i
        for i in range(len(tree) - 1 - n, -1, -1):
            tree[i] = hash_pair(tree[2 * i + 1], tree[2 * i + 2])
        return cls(tree, [(v, index_of[i]) for i, v in enumerate(values)], encoding)

    @property
    def root(self) -> bytes:
        return self.tree[0]

    def proof(self, value_index: int) -> list[bytes]:
        i = self.values[value_index][1]
        path: list[bytes] = []
        while i > 0:
            path.append(self.tree[i + 1 if i % 2 == 1 else i - 1])
            i = (i - 1) // 2
        return path

    def dump(self) -> dict[str, Any]:
        """OpenZeppelin's `tree.dump()` shape, hex-encoded: `StandardMerkleTree.load` reads it."""
        return {"format": "standard-v1", "leafEncoding": self.encoding,
                "tree": ["0x" + h.hex() for h in self.tree],
                "values": [{"value": ["0x" + bytes(x).hex() if isinstance(x, bytes) else x for x in v], "treeIndex": i}
                           for v, i in self.values]}
