"""Revoked partitions do not keep their local state for ever (invariant 5: bounded)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Message
from confluent_kafka import TopicPartition as KafkaTopicPartition
from rocksdict import Rdict

from dedupe_consumer.dead_letters import MemoryDeadLetters
from dedupe_consumer.engine import Engine
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import RocksStore
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import produce_raw, settings_for
from ..unit.conftest import Clock, Recorder

pytestmark = pytest.mark.kafka


def events(ids: list[str]) -> list[dict[str, object]]:
    return [
        {"key": i.encode(), "value": i.encode(), "headers": [("event-id", i.encode())]} for i in ids
    ]


def read(bootstrap: str, topic: str, start: int, count: int) -> list[Message]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r-{uuid.uuid4()}"})
    consumer.assign([KafkaTopicPartition(topic, 0, start)])
    out: list[Message] = []
    try:
        while len(out) < count:
            out += [m for m in consumer.consume(count - len(out), 10) if m.error() is None]
        return out
    finally:
        consumer.close()


@contextmanager
def engine_on(
    bootstrap: str, topic: str, path: Path, handler: Recorder, clock: Clock
) -> Iterator[Engine]:
    settings = settings_for(bootstrap, topic, path)  # store.revoked_state_grace: 1 h
    store = RocksStore(path, retention_ms=int(settings.dedupe.retention.total_seconds() * 1000))
    changelog = Changelog(
        settings.kafka.connection(),
        settings.kafka.group_id,
        settings.dedupe.retention,
        f"test-{uuid.uuid4()}",
    )
    try:
        yield Engine(
            handler,
            settings.dedupe,
            settings.processing,
            store,
            MemoryDeadLetters(),
            sweep_keys=settings.store.sweep_keys,
            revoked_state_grace=settings.store.revoked_state_grace,
            changelog=changelog,
            clock=clock,
        )
    finally:
        changelog.close()
        store.close()


def test_revoked_partition_is_dropped_after_the_grace_and_restored_when_it_returns(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    tp = TopicPartition(topic, 0)
    first = [f"id-{i}" for i in range(10)]
    produce_raw(kafka_bootstrap, topic, events(first))
    handler, clock, path = Recorder(), Clock(), tmp_path / "state"
    with engine_on(kafka_bootstrap, topic, path, handler, clock) as engine:
        engine.assign([tp])
        engine.process(read(kafka_bootstrap, topic, 0, 10))
        assert handler.ids == first
        store = engine.store
        assert tp in store.partitions()

        engine.release([tp])
        clock.now += 3599
        engine.idle()
        assert tp in store.partitions(), "dropped before the grace period ended"
        clock.now += 2
        engine.idle()
        assert tp not in store.partitions()
        assert f"p:{topic}:0" not in Rdict.list_cf(str(path))
        assert (store.watermark(tp), store.changelog_position(tp)) == (None, None)

        # It comes back: restored from the changelog's start, old IDs still duplicates.
        assert engine.assign([tp]) == {tp: 10}
        produce_raw(kafka_bootstrap, topic, events(["id-2", "fresh-1", "id-7", "fresh-2"]))
        result = engine.process(read(kafka_bootstrap, topic, 0, 14))
        assert result.stats.replays == 10
        assert result.stats.duplicates == 2
        assert handler.ids == [*first, "fresh-1", "fresh-2"]


def test_partitions_left_in_the_store_from_before_a_restart_are_dropped_too(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    tp = TopicPartition(topic, 0)
    produce_raw(kafka_bootstrap, topic, events(["a", "b"]))
    clock, path = Clock(), tmp_path / "state"
    with engine_on(kafka_bootstrap, topic, path, Recorder(), clock) as engine:
        engine.assign([tp])
        engine.process(read(kafka_bootstrap, topic, 0, 2))
    # Restarted, and the partition went to another instance meanwhile: never assigned.
    with engine_on(kafka_bootstrap, topic, path, Recorder(), clock) as engine:
        engine.idle()
        assert tp in engine.store.partitions()
        clock.now += 3601
        engine.idle()
        assert tp not in engine.store.partitions()
