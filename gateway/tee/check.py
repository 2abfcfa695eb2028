"""A metered (`upto`) stream from an enclave: its tokens flow as they come (the signed permit
backs them, as for any metered stream), and it is settled only once its final frame's proof holds
(gateway/paywall/settle.py `metered_stream`). A proof that fails, or a stream that ends without
one (cut, or the client left), is not settled at all."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.tee.pool import Enclave, TeePool
from gateway.tee.proof import ProofError, TeeProof
from gateway.tee.verify import StreamProofReader


@dataclass
class TeeStreamCheck:
    pool: TeePool
    enclave: Enclave
    forwarded: bytes
    settled: Callable[[TeeProof, str], Awaitable[None]]  # the stream was settled: anchor its proof (payer)
    reader: StreamProofReader = field(default_factory=StreamProofReader)

    def feed(self, chunk: bytes) -> None:
        self.reader.feed(chunk)

    def verify(self) -> TeeProof | ProofError:
        """The proof, or the error (the enclave is counted faulty)."""
        try:
            proof = self.reader.verify(self.enclave, self.pool.settings, self.forwarded)
        except ProofError as exc:
            self.pool.fault(self.enclave, exc.reason)
            return exc
        self.pool.verified(self.enclave)
        return proof
