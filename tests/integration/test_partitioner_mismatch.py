"""Keys on a partition no common partitioner would choose are counted and warned about."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from structlog.testing import capture_logs

from dedupe_consumer import DedupeConsumer, Event, Handler
from dedupe_consumer.observability import Metrics
from dedupe_consumer.partitioners import java_partition, librdkafka_partition
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import settings_for

pytestmark = pytest.mark.kafka


class Nothing(Handler):
    def handle(self, event: Event) -> None:
        pass


def test_keys_placed_by_another_rule_are_counted_and_warned_once(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=4)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
    keys = [f"order-{n}".encode() for n in range(40)]
    for key in keys:  # librdkafka's default partitioner: never a mismatch
        producer.produce(topic, key=key, value=b"{}", headers=[("event-id", key + b"-a")])
    misplaced = 0
    for key in keys:  # a partition neither CRC32 nor murmur2 would choose for the key
        wrong = next(
            p for p in range(4) if p not in {java_partition(key, 4), librdkafka_partition(key, 4)}
        )
        producer.produce(
            topic, key=key, value=b"{}", partition=wrong, headers=[("event-id", key + b"-b")]
        )
        misplaced += 1
    for key in keys[:10]:  # Java's murmur2 placement: also not a mismatch
        producer.produce(
            topic,
            key=key,
            value=b"{}",
            partition=java_partition(key, 4),
            headers=[("event-id", key + b"-c")],
        )
    assert producer.flush(30) == 0
    total = len(keys) * 2 + 10
    metrics = Metrics()
    consumer = DedupeConsumer(
        Nothing(), settings_for(kafka_bootstrap, topic, tmp_path / "s"), metrics=metrics
    )
    deadline = time.monotonic() + 60
    with capture_logs() as logs:
        consumer.run(
            until=lambda t: t.consumed >= total or time.monotonic() > deadline,
            install_signal_handlers=False,
        )
    assert consumer.totals.consumed == total
    counted = metrics.registry.get_sample_value(
        "dedupe_partitioner_mismatch_total", {"topic": topic}
    )
    assert counted == misplaced
    checked = metrics.registry.get_sample_value(
        "dedupe_partitioner_checked_total", {"topic": topic}
    )
    assert checked == total  # under 1000 per partition: every keyed message is checked
    warnings = [e for e in logs if e["event"] == "partitioner_mismatch"]
    assert len(warnings) == 1 and warnings[0]["topic"] == topic
