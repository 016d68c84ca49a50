"""The Avro example against a real broker and a real Schema Registry (Apicurio, started
by the ``schema_registry`` fixture): one effect per order, bad records dead-lettered."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.serialization import MessageField, SerializationContext

from dedupe_consumer import DedupeConsumer, Settings
from dedupe_consumer.testing import LocalSchemaRegistry
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from .handlers import OrderTotals
from .produce import order, produce_orders, serializer

ORDERS = 30


@pytest.mark.kafka
def test_each_order_counts_once_and_bad_records_are_dead_lettered(
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
    schema_registry: LocalSchemaRegistry,
    tmp_path: Path,
) -> None:
    topic = kafka_topic(partitions=2)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    serialize = serializer(schema_registry.url)
    sent = produce_orders(producer, serialize, topic, ORDERS)
    context = SerializationContext(topic, MessageField.VALUE)
    bad = [
        b'{"order_id": "plain-json"}',  # not the wire format
        b"\x00\x7f\xff\xff\xf0\x02\x06abc",  # a schema ID the registry never issued
        serialize({"order_id": "refund", "amount_cents": -5, "customer": None}, context),
    ]
    for value in bad:
        producer.produce(topic, key=b"bad", value=value)
    assert producer.flush(30) == 0

    settings = Settings.load(
        kafka={"bootstrap_servers": kafka_bootstrap, "group_id": topic, "topics": [topic]},
        payload={"format": "avro", "schema_registry_url": schema_registry.url},
        dedupe={"id_source": "field:/order_id"},
        store={"path": str(tmp_path / "state")},
        processing={"dead_letter_topic": f"{topic}.dlq", "poll_timeout": "200ms"},
    )
    handler = OrderTotals()
    consumer = DedupeConsumer(handler, settings)
    deadline = time.monotonic() + 90
    total = sent + len(bad)
    consumer.run(
        until=lambda t: t.consumed >= total or time.monotonic() > deadline,
        install_signal_handlers=False,
    )
    totals = consumer.totals
    assert totals.consumed == total
    assert totals.handled == ORDERS
    assert totals.duplicates == sent - ORDERS
    assert totals.by_reason == {"invalid-payload": 1, "unknown-schema": 1, "permanent-error": 1}
    expected: dict[str, int] = {}
    for n in range(ORDERS):
        record = order(n)
        country = record["customer"]["country"] if record["customer"] else "unknown"
        expected[country] = expected.get(country, 0) + record["amount_cents"]
    assert handler.totals == expected
    assert sorted(handler.orders) == sorted(f"order-{n}" for n in range(ORDERS))
