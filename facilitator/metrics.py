"""Prometheus metrics of one facilitator, on its own registry (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class FacilitatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.verify_total = Counter(
            "x402_facilitator_verify_total", "Verify outcomes", ["scheme", "network", "result", "reason"],
            registry=self.registry,
        )  # fmt: skip
        self.settle_total = Counter(
            "x402_facilitator_settle_total", "Settle outcomes", ["scheme", "network", "result", "reason"],
            registry=self.registry,
        )  # fmt: skip
        self.verify_seconds = Histogram(
            "x402_facilitator_verify_seconds", "Verify latency", ["scheme", "network"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.settle_seconds = Histogram(
            "x402_facilitator_settle_seconds", "Settle latency (to receipt)", ["scheme", "network"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.bad_requests_total = Counter(
            "x402_facilitator_bad_requests_total", "Malformed requests answered 400", ["endpoint"],
            registry=self.registry,
        )  # fmt: skip
        self.signer_balance = Gauge(
            "x402_facilitator_signer_balance_wei", "Native balance of each signer", ["network", "signer"],
            registry=self.registry,
        )  # fmt: skip
        self.signer_nonce_lag = Gauge(
            "x402_facilitator_signer_nonce_lag", "Pending minus mined transactions per signer", ["network", "signer"],
            registry=self.registry,
        )  # fmt: skip
        self.unfinished_settlements = Gauge(
            "x402_facilitator_unfinished_settlements", "Settlements the reconciler found unfinished",
            registry=self.registry,
        )  # fmt: skip
