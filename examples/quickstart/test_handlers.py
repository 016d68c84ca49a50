import json
import sqlite3
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from dedupe_consumer import DedupeConsumer, Settings
from dedupe_consumer.testing.pytest_plugin import TopicFactory
from examples.quickstart.handlers import ChargeHandler


@pytest.mark.kafka
def test_each_payment_is_charged_once(
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = kafka_topic(partitions=3)  # uniquely named, created, ready
    ids = [str(uuid.uuid4()) for _ in range(5)]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for event_id in ids + ids[:2]:  # the first two are sent twice, as a producer retry does
        value = json.dumps({"account": "acct-1", "amount_cents": 100})
        producer.produce(topic, key="acct-1", value=value, headers=[("event-id", event_id)])
    assert producer.flush(10) == 0

    monkeypatch.setenv("CHARGES_DB", str(tmp_path / "charges.sqlite3"))
    settings = Settings.load(
        kafka={"bootstrap_servers": kafka_bootstrap, "group_id": topic, "topics": [topic]},
        store={"path": str(tmp_path / "state")},
        processing={"dead_letter_topic": f"{topic}.dlq"},
    )
    consumer = DedupeConsumer(ChargeHandler(), settings)
    consumer.run(until=lambda totals: totals.consumed == 7, install_signal_handlers=False)

    with sqlite3.connect(tmp_path / "charges.sqlite3") as db:
        charged = [key for (key,) in db.execute("SELECT idempotency_key FROM charges")]
    assert sorted(charged) == sorted(ids)
