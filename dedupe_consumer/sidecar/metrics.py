"""Prometheus metrics of the HTTP deliveries, on the consumer's own registry.

They sit next to the ``dedupe_*`` consumer metrics so one ``/metrics`` scrape
shows both. Labels stay bounded: the HTTP status code, or ``error`` when no
answer came (connection refused, timeout).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "dedupe_sidecar_requests",
            "POSTs to the target by HTTP status ('error': no answer)",
            ["status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "dedupe_sidecar_request_seconds",
            "Time from sending a POST to its answer (or failure)",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
        )
