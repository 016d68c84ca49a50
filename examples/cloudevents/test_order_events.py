"""The CloudEvents example against a real broker: both content modes, one effect each."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from dedupe_consumer import DedupeConsumer, Settings
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from .handlers import OrderEventsHandler
from .produce import kafka_message, order_event


@pytest.mark.kafka
def test_each_cloudevent_has_one_effect(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=2)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    sent = 0

    def send(**message: object) -> None:
        nonlocal sent
        producer.produce(topic, **message)  # type: ignore[arg-type]
        sent += 1

    for n in range(20):
        event = order_event(f"o-{n}", 100 + n)
        for _ in range(2):  # a producer retry: the same event twice
            send(**kafka_message(event, structured=n % 5 == 0))
    # the same id from another service: another event
    send(**kafka_message(order_event("o-0", 1, source="/pos/orders")))
    send(**kafka_message(order_event("o-3", 0, kind="cancelled")))
    send(**kafka_message(order_event("o-4", 0, kind="refunded")))  # unknown type: dead letter
    send(value=b"{}", headers=[("ce_id", b"x"), ("ce_specversion", b"1.0")])  # no source
    assert producer.flush(30) == 0

    settings = Settings.load(
        kafka={"bootstrap_servers": kafka_bootstrap, "group_id": topic, "topics": [topic]},
        dedupe={"id_source": "cloudevents"},
        store={"path": str(tmp_path / "state")},
        processing={"dead_letter_topic": f"{topic}.dlq", "poll_timeout": "200ms"},
    )
    handler = OrderEventsHandler()
    consumer = DedupeConsumer(handler, settings)
    deadline = time.monotonic() + 90
    consumer.run(
        until=lambda t: t.consumed >= sent or time.monotonic() > deadline,
        install_signal_handlers=False,
    )
    totals = consumer.totals
    assert totals.consumed == sent
    assert totals.duplicates == 20
    assert totals.handled == 22  # 20 orders, the other source's, the cancellation
    assert totals.by_reason == {"permanent-error": 1, "missing-id": 1}
    assert handler.created["o-0"] == 1  # the /pos/orders event came after /shop/orders'
    assert len(handler.created) == 20
    assert handler.cancelled == {"o-3"}
