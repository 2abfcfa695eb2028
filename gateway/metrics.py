"""Prometheus metrics of one gateway, on its own registry. Labels are bounded: the route id
comes from configuration, never from the request path."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("x402_gateway_requests_total", "Requests by route and status", ["route", "status"], registry=r)
        self.payments = Counter(
            "x402_gateway_payments_total", "Payment outcomes by reason", ["route", "outcome", "reason"], registry=r
        )
        self.revenue = Counter(
            "x402_gateway_revenue_atomic_total", "Settled amounts in the asset's base units",
            ["network", "asset"], registry=r,
        )  # fmt: skip
        self.verify_seconds = Histogram("x402_gateway_verify_seconds", "Facilitator verify latency", ["route"], buckets=_BUCKETS, registry=r)
        self.upstream_seconds = Histogram(
            "x402_gateway_upstream_seconds", "Upstream latency to the full body (non-streaming) or first byte",
            ["route", "upstream"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self.settle_seconds = Histogram("x402_gateway_settle_seconds", "Facilitator settle latency", ["route"], buckets=_BUCKETS, registry=r)
        self.reconcile_difference = Gauge(
            "x402_gateway_reconcile_difference_atomic",
            "The last reconciliation's on-chain transfers to the payee minus the ledger, in base units",
            ["network", "asset"], registry=r,
        )  # fmt: skip
        self.open_intents = Gauge(
            "x402_gateway_settlement_intents_open", "Settlement intents not finished yet (seen by this replica's recovery)",
            registry=r,
        )  # fmt: skip
