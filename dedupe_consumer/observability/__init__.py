"""Logs (structlog) and metrics (Prometheus)."""

from dedupe_consumer.observability.logging import configure_logging
from dedupe_consumer.observability.metrics import Metrics

__all__ = ["Metrics", "configure_logging"]
