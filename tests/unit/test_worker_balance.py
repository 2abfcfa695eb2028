"""Worker pools' pure parts: the choice of a worker, the queue gauge parser, the settings."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from pydantic import ValidationError

from gateway.settings import Upstream
from gateway.workers.balance import Chooser, Worker
from gateway.workers.probe import waiting_from_metrics


def ready(url: str, models: set[str], in_flight: int = 0, waiting: float = 0.0) -> Worker:
    return Worker(url, models=frozenset(models), ready=True, reachable=True, in_flight=in_flight, waiting=waiting)


def test_p2c_prefers_the_less_loaded_worker() -> None:
    workers = [ready("a", {"m"}, in_flight=10), ready("b", {"m"}, in_flight=0), ready("c", {"m"}, in_flight=0, waiting=5)]
    chooser = Chooser("least_request", max_concurrency=32, rng=random.Random(7))
    picks = Counter(chooser.choose(workers, "m", now=0.0).url for _ in range(300))  # type: ignore[union-attr]
    # b is never the loser of a draw; a loses every draw (the worst worker is never chosen).
    assert picks["a"] == 0 and picks["b"] > picks["c"] > 0


def test_only_ready_admitted_workers_serving_the_model_with_a_free_slot() -> None:
    workers = [ready("full", {"m"}, in_flight=2), ready("other", {"x"}), Worker("loading", frozenset({"m"})),
               ready("ejected", {"m"}), ready("draining", {"m"}), ready("ok", {"m"})]
    workers[3].ejected_until = 100.0
    workers[4].draining = True
    chooser = Chooser("least_request", max_concurrency=2)
    assert {chooser.choose(workers, "m", now=50.0).url for _ in range(50)} == {"ok"}  # type: ignore[union-attr]
    assert chooser.choose(workers, "m", now=50.0, exclude=frozenset({"ok"})) is None
    assert chooser.choose(workers, "nobody-serves-this", now=50.0) is None


def test_round_robin_ignores_load() -> None:
    workers = [ready("a", {"m"}, in_flight=10), ready("b", {"m"})]
    chooser = Chooser("round_robin", max_concurrency=32)
    assert Counter(chooser.choose(workers, "m", now=0.0).url for _ in range(10)) == {"a": 5, "b": 5}  # type: ignore[union-attr]


def test_vllm_waiting_gauge_is_summed_over_models() -> None:
    text = ("# HELP vllm:num_requests_waiting Number of requests waiting.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            'vllm:num_requests_waiting{model_name="a"} 3.0\n'
            'vllm:num_requests_waiting{model_name="b"} 2.0\n'
            'vllm:num_requests_waiting_total{model_name="b"} 99\n'
            'vllm:num_requests_running{model_name="a"} 7.0\n')
    assert waiting_from_metrics(text) == 5.0
    assert waiting_from_metrics("up 1\n") is None


def test_worker_pool_settings() -> None:
    pool = Upstream.model_validate({"kind": "workers", "workers": {"dns": "vllm.ns.svc.cluster.local"}})
    assert pool.workers is not None and pool.workers.protocol == "openai" and pool.urls == []
    assert Upstream.model_validate({"kind": "workers", "urls": ["http://w:8000/"]}).workers is not None
    with pytest.raises(ValidationError, match="urls or workers.dns"):
        Upstream.model_validate({"kind": "workers"})
    with pytest.raises(ValidationError, match="at least one URL"):
        Upstream.model_validate({"urls": []})
    with pytest.raises(ValidationError, match="kind"):
        Upstream.model_validate({"urls": ["http://a"], "workers": {}})
