"""Topic scope: one success per ID across a topic's partitions, whatever the producers did.

Two producers send the same IDs as keys, one partitioning like Java (murmur2),
one like librdkafka's default (CRC32): an ID the two rules put on different
partitions reaches the topic twice, on two partitions. Partition scope handles
it twice (asserted: the documentation says so) and says the topic's producers
disagree; topic scope handles each ID once, and so after the topic grows.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.cimpl import NewPartitions  # admin re-exports it without __all__

from dedupe_consumer import DedupeConsumer, Event, Handler
from dedupe_consumer.errors import ConfigError
from dedupe_consumer.kafka.repartition import ensure_by_id_topics
from dedupe_consumer.kafka.scope_migration import migrate_to_topic_scope
from dedupe_consumer.models import BatchStats
from dedupe_consumer.partitioners import java_partition, librdkafka_partition
from dedupe_consumer.scope import ORIGIN_HEADER, by_id_topic
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import admin, settings_for
from ..log_capture import captured_logs

pytestmark = pytest.mark.kafka

PARTITIONS = 8


def send(bootstrap: str, topic: str, ids: Sequence[str], partitioner: str) -> None:
    """Each ID as key, value and ``event-id`` header, placed by ``partitioner``
    (librdkafka's ``murmur2_random`` is the Java client's rule)."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "partitioner": partitioner}
    )
    for event_id in ids:
        producer.produce(
            topic,
            key=event_id.encode(),
            value=json.dumps({"id": event_id}).encode(),
            headers=[("event-id", event_id.encode()), ("sent-by", partitioner.encode())],
        )
        producer.poll(0)
    assert producer.flush(30) == 0


class Seen(Handler):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[Event] = []

    def handle(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)

    def ids(self) -> list[str]:
        with self.lock:
            return [e.id for e in self.events]


def run_until(consumer: DedupeConsumer, done: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    settled: list[float] = []

    def until(totals: BatchStats) -> bool:
        if time.monotonic() > deadline:
            return True
        if not done():
            settled.clear()
            return False
        settled.append(time.monotonic())  # and nothing more for a moment: no late repeat
        return settled[-1] - settled[0] > 3.0

    consumer.run(until=until, install_signal_handlers=False)


def ids_apart(ids: Sequence[str], partitions: int) -> set[str]:
    """The IDs that the two rules put on different partitions."""
    return {
        i
        for i in ids
        if java_partition(i.encode(), partitions) != librdkafka_partition(i.encode(), partitions)
    }


def test_partition_scope_handles_an_id_twice_when_two_partitioners_put_it_apart(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=PARTITIONS)
    ids = [str(uuid.uuid4()) for _ in range(10_000)]
    send(kafka_bootstrap, topic, ids, "murmur2_random")
    send(kafka_bootstrap, topic, ids, "consistent_random")
    apart = ids_apart(ids, PARTITIONS)
    assert len(apart) > len(ids) // 2  # 7 in 8 for 8 partitions
    handler = Seen()
    consumer = DedupeConsumer(handler, settings_for(kafka_bootstrap, topic, tmp_path / "state"))
    with captured_logs() as logs:
        run_until(consumer, lambda: len(handler.ids()) >= len(ids) + len(apart), 120)
    handled = handler.ids()
    # Partition scope: an ID on two partitions is handled on each.
    assert len(handled) == len(ids) + len(apart)
    assert {i for i in set(handled) if handled.count(i) == 2} == apart
    # ...and the consumer says why: both rules are at work on one topic.
    sample = consumer.metrics.registry.get_sample_value
    for rule in ("murmur2", "crc32"):
        assert (
            sample("dedupe_partitioner_placed_total", {"topic": topic, "partitioner": rule}) or 0
        ) > 0
    assert [e for e in logs if e.get("event") == "partitioners_mixed"]


def test_topic_scope_handles_each_id_once_across_partitioners_resends_and_growth(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=4)
    ids = [str(uuid.uuid4()) for _ in range(10_000)]
    send(kafka_bootstrap, topic, ids, "murmur2_random")
    send(kafka_bootstrap, topic, ids, "consistent_random")
    handler = Seen()
    settings = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "state",
        dedupe={"scope": "topic"},
        kafka={"consumer": {"topic.metadata.refresh.interval.ms": 1000}},
    )
    consumer = DedupeConsumer(handler, settings)
    grown = threading.Event()

    def grow_and_resend() -> None:
        # Mid-run: the topic goes from 4 to 8 partitions, and old IDs are sent again,
        # which now land on other partitions than their first copies.
        while len(handler.ids()) < len(ids) // 2:
            time.sleep(0.05)
        client = admin(kafka_bootstrap)  # referenced until the result is in
        client.create_partitions([NewPartitions(topic, 8)])[topic].result(30)
        time.sleep(3)  # the producer's metadata sees 8 partitions
        send(kafka_bootstrap, topic, ids[::2], "consistent_random")
        send(kafka_bootstrap, topic, ids[1::2], "murmur2_random")
        grown.set()

    side = threading.Thread(target=grow_and_resend)
    side.start()
    run_until(consumer, lambda: grown.is_set() and len(handler.ids()) >= len(ids), 180)
    side.join(30)
    handled = handler.ids()
    assert sorted(handled) == sorted(ids), "an ID handled twice, or not at all"
    # The handler sees where the message was sent and its own headers, not the hop's.
    first = handler.events[0]
    assert first.topic == topic and 0 <= first.partition < 8
    names = [name for name, _ in first.headers]
    assert ORIGIN_HEADER not in names and "event-id" in names and "sent-by" in names
    # The by-id topic exists with the source's partition count at the start (4), fixed.
    group = settings.kafka.group_id
    metadata = admin(kafka_bootstrap).list_topics(timeout=10).topics
    assert len(metadata[by_id_topic(group, topic)].partitions) == 4
    moved = consumer.metrics.registry.get_sample_value(
        "dedupe_repartitioned_total", {"topic": topic}
    )
    assert moved == len(ids) * 3  # every message moved, once


def test_switching_a_group_to_topic_scope_after_migrate_scope_repeats_nothing(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=PARTITIONS)
    before = [str(uuid.uuid4()) for _ in range(1000)]
    send(kafka_bootstrap, topic, before, "consistent_random")
    group = f"g-{topic}"
    # 1. The group runs with partition scope and decides every ID once.
    first = Seen()
    partition_scope = settings_for(kafka_bootstrap, topic, tmp_path / "old", group=group)
    run_until(DedupeConsumer(first, partition_scope), lambda: len(first.ids()) >= 1000, 120)
    assert sorted(first.ids()) == sorted(before)
    # 2. Stopped; its IDs are moved to topic scope.
    topic_scope = settings_for(
        kafka_bootstrap, topic, tmp_path / "new", group=group, dedupe={"scope": "topic"}
    )
    report = migrate_to_topic_scope(topic_scope)
    assert report.ids == {topic: 1000} and report.expired == {topic: 0}
    # 3. The group runs with topic scope, on another machine (a store of its own: the
    # IDs come from the changelog). Old IDs come again, placed by the other rule.
    after = [str(uuid.uuid4()) for _ in range(500)]
    send(kafka_bootstrap, topic, before, "murmur2_random")
    send(kafka_bootstrap, topic, after, "consistent_random")
    second = Seen()
    consumer = DedupeConsumer(second, topic_scope)
    sample = consumer.metrics.registry.get_sample_value

    def moved() -> float:
        return sample("dedupe_repartitioned_total", {"topic": topic}) or 0

    run_until(consumer, lambda: moved() >= 1500 and len(second.ids()) >= 500, 120)
    assert sorted(second.ids()) == sorted(after), "the switch repeated an ID decided before it"
    # The hop started where the partition-scope consumer had committed: only the
    # messages sent after it were moved.
    assert moved() == 1500
    assert (
        sample("dedupe_events_total", {"topic": by_id_topic(group, topic), "decision": "duplicate"})
        == 1000
    )


def test_a_by_id_topic_with_another_partition_count_than_configured_stops_at_start(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=4)
    settings = settings_for(kafka_bootstrap, topic, tmp_path / "state", dedupe={"scope": "topic"})
    assert ensure_by_id_topics(settings) == {topic: 4}  # created like the source
    assert ensure_by_id_topics(settings) == {topic: 4}  # found again, unchanged
    wrong = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "state",
        dedupe={"scope": "topic", "scope_partitions": 6},
    )
    with pytest.raises(ConfigError, match=r"dedupe.scope_partitions = 4"):
        ensure_by_id_topics(wrong)
