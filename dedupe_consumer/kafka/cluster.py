"""Is a broker answering? One DescribeCluster request through a small admin client."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from dedupe_consumer.kafka.logs import kafka_log_config


class ClusterProbe:
    """Asks the cluster to describe itself; the admin client is made on first use.

    ``config`` is a connection config (``KafkaSettings.connection()``): reach and
    authenticate only, none of the consumer or producer behaviour properties.
    """

    def __init__(self, config: Mapping[str, str | int | float | bool]) -> None:
        self._config = dict(config)
        self._admin: Any = None

    def reachable(self, timeout_s: float) -> tuple[bool, str]:
        """``(True, "reachable")``, or ``(False, "unreachable: <why>")``; never raises for Kafka.

        A config librdkafka refuses is an answer too: its error names the property.
        """
        try:
            if self._admin is None:
                self._admin = AdminClient({**self._config, **kafka_log_config()})
            future = self._admin.describe_cluster(request_timeout=timeout_s)
            future.result(timeout=timeout_s + 1)
        except (KafkaException, FutureTimeout) as exc:
            return False, f"unreachable: {exc or type(exc).__name__}"
        return True, "reachable"

    def close(self) -> None:
        """Let the admin client go (it has no close(); its threads end when it is freed)."""
        self._admin = None
