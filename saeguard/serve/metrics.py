"""The service's Prometheus metrics, in a registry of its own (one per app, so two apps in one
process never share counters). Each worker process exposes its own numbers at ``/metrics``:
scrape every worker, or sum them in the query (docs/serve.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from saeguard.serve.batching import BatchObserver

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServiceMetrics:
    """Requests, latency, batches, queue depth, texts and flags of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "saeguard_requests", "Requests answered, by route and status.", ["route", "status"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "saeguard_request_seconds", "Time to answer a request, by route.", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_texts = Histogram(
            "saeguard_batch_texts", "Texts per forward pass (micro-batch size).",
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "saeguard_batch_seconds", "Time to score one micro-batch.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "saeguard_queue_wait_seconds", "Time a request waited before its batch started.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_texts = Gauge("saeguard_queue_texts", "Texts waiting for the model.", registry=r)
        self.texts = Counter(
            "saeguard_texts", "Texts scored, by outcome (ok, error).", ["outcome"], registry=r
        )
        self.flags = Counter("saeguard_flags", "Texts flagged as out-of-distribution.", registry=r)

    def observer(self) -> BatchObserver:
        """The hooks the batcher reports to."""
        return BatchObserver(
            on_batch=self._batch, on_queue=self.queue_texts.set, on_wait=self.queue_wait.observe
        )

    def _batch(self, texts: int, seconds: float) -> None:
        self.batch_texts.observe(texts)
        self.batch_seconds.observe(seconds)

    def record_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def record_results(self, rows: Sequence[dict[str, Any]]) -> None:
        for row in rows:
            self.texts.labels("error" if row.get("error") else "ok").inc()
            if row.get("flagged"):
                self.flags.inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text format body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
