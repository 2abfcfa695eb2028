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
        self.verify_seconds = Histogram(
            "x402_gateway_verify_seconds", "Facilitator verify latency", ["route"], buckets=_BUCKETS, registry=r
        )
        self.upstream_seconds = Histogram(
            "x402_gateway_upstream_seconds", "Upstream latency to the full body (non-streaming) or first byte",
            ["route", "upstream"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self.settle_seconds = Histogram(
            "x402_gateway_settle_seconds", "Facilitator settle latency", ["route"], buckets=_BUCKETS, registry=r
        )
        # Worker pools (gateway/workers/): labels are the pool's name, a worker's base URL (from
        # configuration or DNS) and a model some worker serves (unknown models are refused first).
        self.worker_in_flight = Gauge("x402_gateway_worker_in_flight", "Calls in flight per worker",
                                      ["upstream", "worker"], registry=r)
        self.worker_queue = Gauge("x402_gateway_worker_queue", "Requests waiting inside the worker (its own gauge)",
                                  ["upstream", "worker"], registry=r)
        self.worker_ready = Gauge("x402_gateway_worker_ready", "1 if the worker is ready and admitted",
                                  ["upstream", "worker"], registry=r)
        self.worker_ejections = Counter("x402_gateway_worker_ejections_total", "Outlier ejections",
                                        ["upstream", "worker"], registry=r)
        self.worker_seconds = Histogram(
            "x402_gateway_worker_seconds", "Worker call latency, first byte sent to last byte read",
            ["upstream", "worker", "model"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self.model_waiting = Gauge("x402_gateway_model_waiting", "Calls waiting in the gateway for a worker",
                                   ["upstream", "model"], registry=r)
        self.backpressure = Counter("x402_gateway_backpressure_total", "Calls refused before payment (503/404)",
                                    ["upstream", "model", "reason"], registry=r)
        self.reconcile_difference = Gauge(
            "x402_gateway_reconcile_difference_atomic",
            "The last reconciliation's on-chain transfers to the payee minus the ledger, in base units",
            ["network", "asset"], registry=r,
        )  # fmt: skip
        self.open_intents = Gauge(
            "x402_gateway_settlement_intents_open", "Settlement intents not finished yet (seen by this replica's recovery)",
            registry=r,
        )  # fmt: skip
        # upto sessions whose funds stopped covering them (gateway/session_funds.py), and what a
        # failed session settlement left unpaid (bounded by sessions.max_exposure)
        self.session_drains = Counter("x402_gateway_session_drains_total", "Sessions settled early: funds no longer cover them",
                                      ["network", "reason"], registry=r)
        self.session_losses = Counter("x402_gateway_session_loss_atomic_total",
                                      "Accrued amounts of upto sessions whose settlement failed, in base units",
                                      ["network", "asset"], registry=r)
        # TEE upstreams (gateway/tee/): labels are the upstream's name and an enclave's tee_id (from
        # the registry); fault reasons are a fixed set (gateway/tee/proof.py, gateway/tee/pool.py).
        self.tee_calls = Counter("x402_gateway_tee_calls_total", "Enclave answers by outcome (verified, fault)",
                                 ["upstream", "tee_id", "outcome"], registry=r)
        self.tee_faults = Counter("x402_gateway_tee_faults_total", "Enclave faults by reason",
                                  ["upstream", "tee_id", "reason"], registry=r)
        self.tee_in_rotation = Gauge("x402_gateway_tee_in_rotation", "1 if the enclave is active and not ejected",
                                     ["upstream", "tee_id"], registry=r)
        self.tee_enclaves = Gauge("x402_gateway_tee_enclaves", "Active enclaves from the registry", ["upstream"],
                                  registry=r)
        self.tee_proofs_pending = Gauge("x402_gateway_tee_proofs_pending", "Proofs of inference waiting to be anchored"
                                        " (as the batcher last saw them)", registry=r)
        self.tee_proofs_anchored = Counter("x402_gateway_tee_proofs_anchored_total", "Proofs anchored on the relay",
                                           ["tee_id", "kind"], registry=r)
        self.tee_proof_lag = Histogram("x402_gateway_tee_proof_batch_lag_seconds",
                                       "From a proof queued to its anchoring transaction mined", ["tee_id"],
                                       buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600), registry=r)
