"""TEE-hosted providers (upstream kind "tee"): enclaves found in an on-chain registry, TLS pinned
to each one's registered certificate, every response's signature checked before anyone pays."""
