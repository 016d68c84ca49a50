"""DedupeConsumer against a real Kafka broker and real RocksDB."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from dedupe_consumer import DedupeConsumer, Event, Handler, PermanentError, RetryableError
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import (
    committed_offsets,
    end_offsets,
    headers_of,
    produce_events,
    produce_raw,
    read_all,
    settings_for,
    wait_for,
)

pytestmark = pytest.mark.kafka


class Recorder(Handler):
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.lock = threading.Lock()

    def handle(self, event: Event) -> None:
        with self.lock:
            self.ids.append(event.id)


def run_until(consumer: DedupeConsumer, consumed: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    consumer.run(
        until=lambda t: t.consumed >= consumed or time.monotonic() > deadline,
        install_signal_handlers=False,
    )
    assert consumer.totals.consumed >= consumed, f"consumed only {consumer.totals.consumed}"


def test_each_unique_id_handled_once_and_offsets_committed(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=4)
    sent = produce_events(kafka_bootstrap, topic, 2000, duplicates=0.1)
    settings = settings_for(kafka_bootstrap, topic, tmp_path / "state")
    handler = Recorder()
    consumer = DedupeConsumer(handler, settings)
    run_until(consumer, len(sent))

    assert sorted(handler.ids) == sorted(set(sent))  # once each, none missing
    totals = consumer.totals
    assert totals.handled == len(set(sent))
    assert totals.duplicates == len(sent) - len(set(sent))
    assert committed_offsets(kafka_bootstrap, settings.kafka.group_id, topic, 4) == end_offsets(
        kafka_bootstrap, topic, 4
    )


def test_restart_skips_seen_ids_and_resumes_after_watermark(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=2)
    ids: list[str] = []
    first = produce_events(kafka_bootstrap, topic, 500, duplicates=0.0, seed=2, ids=ids)
    settings = settings_for(kafka_bootstrap, topic, tmp_path / "state")
    handler = Recorder()
    run_until(DedupeConsumer(handler, settings), len(first))

    # Redeliveries of old IDs (a producer retry) plus new events, read by a *new* group:
    # the group has no commit, so only the durable watermark keeps old offsets away.
    second = produce_events(kafka_bootstrap, topic, 500, duplicates=0.3, seed=3, ids=ids)
    fresh_group = settings_for(kafka_bootstrap, topic, tmp_path / "state", group=f"{topic}-b")
    again = Recorder()
    consumer = DedupeConsumer(again, fresh_group)
    run_until(consumer, len(second))

    assert consumer.totals.replays == 0  # resumed at watermark + 1, not at offset 0
    assert consumer.totals.consumed == len(second)
    assert not set(again.ids) & set(handler.ids)
    assert sorted(handler.ids + again.ids) == sorted(set(first + second))


class Payment(BaseModel):
    id: str
    amount_cents: int


class StrictHandler(Recorder):
    payload_model = Payment

    def handle(self, event: Event) -> None:
        if event.payload.amount_cents < 0:
            raise PermanentError("negative amount")
        super().handle(event)


def test_bad_input_goes_to_dead_letter_topic_with_reason_headers(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    produce_raw(
        kafka_bootstrap,
        topic,
        [
            {"key": b"k0", "value": b'{"id": "x", "amount_cents": 1}'},  # no event-id header
            {"key": b"k1", "value": b"not json", "headers": [("event-id", b"e1")]},
            {
                "key": b"k2",
                "value": b'{"id": "e2", "amount_cents": -5}',
                "headers": [("event-id", b"e2"), ("trace", b"t-2")],
            },
            {
                "key": b"k3",
                "value": b'{"id": "e3", "amount_cents": 5}',
                "headers": [("event-id", b"e3")],
            },
        ],
    )
    settings = settings_for(kafka_bootstrap, topic, tmp_path / "state")
    handler = StrictHandler()
    consumer = DedupeConsumer(handler, settings)
    run_until(consumer, 4)
    assert handler.ids == ["e3"]
    assert consumer.totals.dead_lettered == 3

    letters = read_all(kafka_bootstrap, settings.processing.dead_letter_topic, 3)
    assert len(letters) == 3
    by_offset: dict[int, dict[str, bytes]] = {}
    for m in letters:
        headers = headers_of(m)
        by_offset[int(headers["dlq.original.offset"])] = headers
    assert by_offset[0]["dlq.reason"] == b"missing-id"
    assert by_offset[1]["dlq.reason"] == b"invalid-payload"
    assert by_offset[1]["dlq.event.id"] == b"e1"
    assert by_offset[2]["dlq.reason"] == b"permanent-error"
    assert by_offset[2]["dlq.error.class"] == b"PermanentError"
    assert by_offset[2]["dlq.error.message"] == b"negative amount"
    assert by_offset[2]["dlq.attempts"] == b"1"
    assert by_offset[2]["trace"] == b"t-2"  # original headers kept
    for headers in by_offset.values():
        assert headers["dlq.original.topic"] == topic.encode()
        assert headers["dlq.original.partition"] == b"0"
        assert int(headers["dlq.original.timestamp"]) > 0
    values = {m.key(): m.value() for m in letters}
    assert values[b"k1"] == b"not json"  # payload kept byte for byte


class PoisonHandler(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.attempts: Counter[str] = Counter()

    def handle(self, event: Event) -> None:
        self.attempts[event.id] += 1
        if event.id == "poison":
            raise RetryableError("downstream 503")
        super().handle(event)


def test_poison_message_is_retried_then_dead_lettered_and_partition_keeps_flowing(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    items: list[dict[str, Any]] = [
        {"value": b"{}", "headers": [("event-id", b"poison")]},
        *({"value": b"{}", "headers": [("event-id", f"ok{i}".encode())]} for i in range(20)),
    ]
    produce_raw(kafka_bootstrap, topic, items)
    settings = settings_for(
        kafka_bootstrap, topic, tmp_path / "state", processing={"max_retries": 2}
    )
    handler = PoisonHandler()
    consumer = DedupeConsumer(handler, settings)
    run_until(consumer, 21)
    assert handler.attempts["poison"] == 3
    assert handler.ids == [f"ok{i}" for i in range(20)]
    [letter] = read_all(kafka_bootstrap, settings.processing.dead_letter_topic, 1)
    headers = headers_of(letter)
    assert headers["dlq.reason"] == b"retries-exhausted"
    assert headers["dlq.attempts"] == b"3"
    assert committed_offsets(kafka_bootstrap, settings.kafka.group_id, topic, 1) == {0: 21}


@pytest.mark.parametrize("strategy", ["range", "cooperative-sticky", "consumer-protocol"])
def test_two_consumers_with_a_rebalance_in_the_middle_lose_no_event(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path, strategy: str
) -> None:
    """Eager, cooperative (classic protocol) and the consumer group protocol (KIP-848)."""
    topic = kafka_topic(partitions=4)
    ids: list[str] = []
    sent = produce_events(kafka_bootstrap, topic, 3000, duplicates=0.1, seed=5, ids=ids)
    kafka = {
        "consumer": {"group.protocol": "consumer"}
        if strategy == "consumer-protocol"
        else {"partition.assignment.strategy": strategy}
    }
    group = f"{topic}-{strategy}"
    handlers = [Recorder(), Recorder()]
    consumers = [
        DedupeConsumer(
            handlers[i],
            settings_for(
                kafka_bootstrap,
                topic,
                tmp_path / f"s{i}",
                group=group,
                kafka=kafka,
                processing={"batch_size": 100},
            ),
        )
        for i in range(2)
    ]
    threads = [
        threading.Thread(target=c.run, kwargs={"install_signal_handlers": False}, daemon=True)
        for c in consumers
    ]
    threads[0].start()
    wait_for(lambda: len(handlers[0].ids) > 300, 60, "the first consumer to make progress")
    threads[1].start()  # joins the group: partitions move mid-stream
    wait_for(
        lambda: members_with_partitions(kafka_bootstrap, group) == 2,
        60,
        "both consumers to own partitions",
    )
    # The second wave repeats first-wave IDs too: the changelog has moved the old
    # owner's decisions to the new owner, so they are still duplicates.
    sent += produce_events(kafka_bootstrap, topic, 3000, duplicates=0.1, seed=6, ids=ids)
    unique = set(sent)
    wait_for(
        lambda: set(handlers[0].ids) | set(handlers[1].ids) >= unique,
        120,
        "every unique ID to be handled",
    )
    wait_for(
        lambda: (
            committed_offsets(kafka_bootstrap, group, topic, 4)
            == end_offsets(kafka_bootstrap, topic, 4)
        ),
        60,
        "offsets committed to the end",
    )
    for c in consumers:
        c.stop()
    for t in threads:
        t.join(30)
    assert handlers[1].ids, "the second consumer never got a partition"
    all_calls = handlers[0].ids + handlers[1].ids
    assert set(all_calls) == unique
    # A clean rebalance commits on revoke, so the new owner starts after the old one.
    assert len(all_calls) == len(unique)


def members_with_partitions(bootstrap: str, group: str) -> int:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    description = admin.describe_consumer_groups([group])[group].result(timeout=30)
    return sum(1 for m in description.members if m.assignment.topic_partitions)


class SlowFirstHandler(Recorder):
    def handle(self, event: Event) -> None:
        if not self.ids:
            time.sleep(9)  # longer than max.poll.interval.ms below
        super().handle(event)


def test_handler_slower_than_max_poll_interval_keeps_the_membership_and_loses_nothing(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    sent = produce_events(kafka_bootstrap, topic, 50, duplicates=0.0, seed=9)
    settings = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "state",
        kafka={"consumer": {"max.poll.interval.ms": 7000}},
        processing={"batch_size": 10},
    )
    handler = SlowFirstHandler()
    consumer = DedupeConsumer(handler, settings)
    deadline = time.monotonic() + 90
    consumer.run(
        until=lambda t: (
            (
                len(handler.ids) >= len(sent)
                and committed_offsets(kafka_bootstrap, settings.kafka.group_id, topic, 1)
                == {0: len(sent)}
            )
            or time.monotonic() > deadline
        ),
        install_signal_handlers=False,
    )
    # Issue 13: the call runs on a worker while the consuming thread keeps polling (its
    # partitions paused), so the group never sees the member as stuck.
    exceeded = consumer.metrics.registry.get_sample_value("dedupe_max_poll_interval_exceeded_total")
    assert not exceeded, "the membership was lost during a long handler call"
    assert sorted(handler.ids) == sorted(sent)  # each exactly once, none lost
    assert committed_offsets(kafka_bootstrap, settings.kafka.group_id, topic, 1) == {0: 50}


@pytest.mark.parametrize("chunk", [100_000, 37], ids=["one-chunk", "many-chunks"])
def test_partition_state_moves_to_a_new_instance_through_the_changelog(
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
    tmp_path: Path,
    chunk: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("dedupe_consumer.kafka.changelog._RESTORE_CHUNK", chunk)
    topic = kafka_topic(partitions=2)
    ids: list[str] = []
    first = produce_events(kafka_bootstrap, topic, 400, duplicates=0.0, seed=21, ids=ids)
    old = Recorder()
    run_until(DedupeConsumer(old, settings_for(kafka_bootstrap, topic, tmp_path / "a")), 400)

    # Producer retries of old IDs arrive after the partitions moved to an instance
    # with an empty local store (another machine): the changelog restores what it needs.
    second = produce_events(kafka_bootstrap, topic, 400, duplicates=0.5, seed=22, ids=ids)
    new = Recorder()
    moved = DedupeConsumer(new, settings_for(kafka_bootstrap, topic, tmp_path / "b"))
    run_until(moved, 400)
    assert not set(new.ids) & set(first)
    assert sorted(old.ids + new.ids) == sorted(set(first + second))
    assert moved.totals.duplicates == len(second) - len(set(second) - set(first))


def test_watermark_ahead_of_the_committed_offset_is_committed_without_new_traffic(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    from confluent_kafka import ConsumerGroupTopicPartitions
    from confluent_kafka import TopicPartition as KafkaTopicPartition
    from confluent_kafka.admin import AdminClient

    topic = kafka_topic(partitions=1)
    sent = produce_events(kafka_bootstrap, topic, 100, duplicates=0.0, seed=41)
    settings = settings_for(kafka_bootstrap, topic, tmp_path / "state")
    handler = Recorder()
    run_until(DedupeConsumer(handler, settings), 100)
    # As if the process died between persist and commit: the group is 60 offsets behind.
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    request = ConsumerGroupTopicPartitions(
        settings.kafka.group_id, [KafkaTopicPartition(topic, 0, 40)]
    )
    for future in admin.alter_consumer_group_offsets([request]).values():
        future.result(timeout=30)
    assert committed_offsets(kafka_bootstrap, settings.kafka.group_id, topic, 1) == {0: 40}

    again = Recorder()
    consumer = DedupeConsumer(again, settings)
    deadline = time.monotonic() + 60
    consumer.run(
        until=lambda t: (
            committed_offsets(kafka_bootstrap, settings.kafka.group_id, topic, 1) == {0: 100}
            or time.monotonic() > deadline
        ),
        install_signal_handlers=False,
    )
    assert committed_offsets(kafka_bootstrap, settings.kafka.group_id, topic, 1) == {0: 100}
    assert again.ids == []  # resumed after the watermark: nothing redelivered to the handler
    assert sorted(handler.ids) == sorted(sent)


def test_changelog_grows_with_the_source_topic(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewPartitions

    from dedupe_consumer.store import changelog_topic

    topic = kafka_topic(partitions=2)
    first = produce_events(kafka_bootstrap, topic, 100, duplicates=0.0, seed=51)
    settings = settings_for(kafka_bootstrap, topic, tmp_path / "state")
    handler = Recorder()
    run_until(DedupeConsumer(handler, settings), 100)

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_partitions([NewPartitions(topic, 4)])[topic].result(timeout=30)
    wait_for(
        lambda: len(admin.list_topics(topic, timeout=10).topics[topic].partitions) == 4,
        30,
        "the source topic to have 4 partitions",
    )
    second = produce_events(kafka_bootstrap, topic, 200, duplicates=0.0, seed=52)
    run_until(DedupeConsumer(handler, settings), 200)

    name = changelog_topic(settings.kafka.group_id, topic)
    assert len(admin.list_topics(name, timeout=10).topics[name].partitions) == 4
    assert sorted(handler.ids) == sorted(first + second)


class OneSecondHandler(Recorder):
    def handle(self, event: Event) -> None:
        time.sleep(1.0)
        super().handle(event)


def test_a_slow_batch_is_cut_before_max_poll_interval_and_keeps_the_membership(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    sent = produce_events(kafka_bootstrap, topic, 12, duplicates=0.0, seed=61)
    settings = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "state",
        kafka={"consumer": {"max.poll.interval.ms": 7000}},
        processing={"batch_size": 12},  # 12 s of handler time in one batch > 7 s
    )
    handler = OneSecondHandler()
    consumer = DedupeConsumer(handler, settings)
    run_until(consumer, 12, timeout_s=90)
    registry = consumer.metrics.registry
    assert (registry.get_sample_value("dedupe_batches_cut_total") or 0) >= 1
    assert (registry.get_sample_value("dedupe_max_poll_interval_exceeded_total") or 0) == 0
    assert sorted(handler.ids) == sorted(sent)  # each once
    wait_for(
        lambda: committed_offsets(kafka_bootstrap, settings.kafka.group_id, topic, 1) == {0: 12},
        30,
        "the offsets to be committed",
    )
