"""Switching a group from partition scope to topic scope without repeats.

A group that ran with ``dedupe.scope = "partition"`` remembers its IDs per
source partition, in its changelog topics (and in each instance's store). After
the switch, the dedupe stage looks IDs up per by-id partition: an ID decided
before the switch would not be found there, and a later copy of it would be
handled again. :func:`migrate_to_topic_scope` moves them first: it reads every
ID record of the old changelog topics (the records that decide; staged effects
are not moved) and writes each to the changelog of its by-id partition, where
the dedupe stage restores it from when it is assigned the partition. The hop
keeps the group's own name, so it starts where the partition-scope consumer
committed. Run it with every consumer of the group stopped, then start them with
``dedupe.scope = "topic"`` (``dedupe-consumer migrate-scope --config ...``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import structlog
from confluent_kafka import Consumer, KafkaError
from confluent_kafka import TopicPartition as KafkaTopicPartition

from dedupe_consumer.config import Settings
from dedupe_consumer.errors import ConfigError, StoreError
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.kafka.logs import kafka_log_config
from dedupe_consumer.kafka.repartition import ensure_by_id_topics
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.scope import by_id_topic, id_partition, stage_group
from dedupe_consumer.store.base import IdRecord, RecordStatus, WriteSet
from dedupe_consumer.store.changelog_codec import RestoredState, changelog_topic

log = structlog.get_logger("dedupe_consumer.scope")

_CHUNK = 20_000
"""ID records per changelog transaction."""


@dataclass
class Migrated:
    """What :func:`migrate_to_topic_scope` moved, per source topic."""

    ids: dict[str, int] = field(default_factory=dict)
    """IDs written to the topic's by-id changelog."""
    expired: dict[str, int] = field(default_factory=dict)
    """IDs past ``dedupe.retention``, left behind."""
    on_several_partitions: dict[str, int] = field(default_factory=dict)
    """IDs decided on more than one source partition (the first decision is kept)."""


def migrate_to_topic_scope(settings: Settings, timeout_s: float = 60.0) -> Migrated:
    """Move the ID records of ``settings``' group from its partition-scope changelog to
    its topic-scope one. Idempotent: running it twice writes the same records again."""
    if settings.dedupe.scope != "topic":
        raise ConfigError(
            "dedupe.scope must be 'topic' in the settings given to the migration (the "
            "settings the consumers will run with after it)"
        )
    if not settings.store.changelog:
        raise ConfigError(
            "store.changelog = false: a partition-scope group without a changelog keeps its "
            "IDs only in each instance's store, which no migration can gather; keep "
            "dedupe.scope = 'partition' until dedupe.retention has passed, or enable the "
            "changelog and let it fill first"
        )
    kafka = settings.kafka
    stage = stage_group(kafka.group_id)
    counts = ensure_by_id_topics(settings)
    changelog = Changelog(
        kafka.connection(),
        stage,
        settings.dedupe.retention,
        f"dedupe-consumer.{stage}.migrate.{uuid.uuid4().hex[:8]}",
        kafka.producer,
    )
    report = Migrated()
    oldest = int(time.time() * 1000) - int(settings.dedupe.retention.total_seconds() * 1000)
    try:
        for topic in kafka.topics:
            target = by_id_topic(kafka.group_id, topic)
            changelog.ensure_topics([target])
            decided, several = _read_decisions(
                settings, changelog_topic(kafka.group_id, topic), timeout_s
            )
            keep = {i: r for i, r in decided.items() if r.decided_at_ms >= oldest}
            report.expired[topic] = len(decided) - len(keep)
            report.on_several_partitions[topic] = len(several & keep.keys())
            by_partition: dict[TopicPartition, list[tuple[str, IdRecord]]] = {}
            for event_id, record in keep.items():
                tp = TopicPartition(target, id_partition(event_id, counts[topic]))
                by_partition.setdefault(tp, []).append((event_id, record))
            items = [(tp, pair) for tp, pairs in by_partition.items() for pair in pairs]
            for start in range(0, len(items), _CHUNK):
                write = WriteSet()
                for tp, pair in items[start : start + _CHUNK]:
                    write.records.setdefault(tp, []).append(pair)
                changelog.write(write)
            report.ids[topic] = len(keep)
            log.info(
                "scope_migrated",
                topic=topic,
                by_id_topic=target,
                ids=len(keep),
                expired=report.expired[topic],
                on_several_partitions=report.on_several_partitions[topic],
            )
    finally:
        changelog.close()
    return report


def _read_decisions(
    settings: Settings, name: str, timeout_s: float
) -> tuple[dict[str, IdRecord], set[str]]:
    """The live ID records of changelog topic ``name``, all partitions, and the IDs found
    on several partitions (each keeps its first decision)."""
    consumer = Consumer(
        {
            **settings.kafka.connection().config("consumer"),
            **kafka_log_config(),
            "group.id": f"{settings.kafka.group_id}.migrate.{uuid.uuid4()}",  # never commits
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )
    decided: dict[str, IdRecord] = {}
    several: set[str] = set()
    try:
        metadata = consumer.list_topics(name, timeout=timeout_s).topics.get(name)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            log.warning("scope_migration_no_changelog", changelog_topic=name)
            return decided, several
        partitions = sorted(metadata.partitions)
        consumer.assign([KafkaTopicPartition(name, p, -2) for p in partitions])  # beginning
        states = {
            p: RestoredState(TopicPartition(name, p), TopicPartition(name, p)) for p in partitions
        }
        open_partitions = set(partitions)
        idle_until = time.monotonic() + timeout_s
        while open_partitions:
            if time.monotonic() > idle_until:
                raise StoreError(
                    f"reading changelog topic {name!r}: no progress for {timeout_s:.0f}s on "
                    f"partitions {sorted(open_partitions)}"
                )
            for message in consumer.consume(1000, 1.0):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        open_partitions.discard(message.partition() or 0)
                        continue
                    raise StoreError(f"reading changelog topic {name!r}: {error}")
                idle_until = time.monotonic() + timeout_s
                key = message.key()
                if key is not None:
                    states[message.partition() or 0].add(key, message.value())
        for state in states.values():
            for event_id, record in state.records.items():
                if record is None:
                    continue
                known = decided.get(event_id)
                if known is not None:
                    several.add(event_id)
                    if _rank(known) <= _rank(record):
                        continue
                decided[event_id] = record
    finally:
        consumer.close()
    return decided, several


def _rank(record: IdRecord) -> tuple[int, int]:
    """Which of an ID's records on several partitions is kept (the lowest): a decision
    over a claim still in progress (that one may never have run), then the first."""
    return (1 if record.status is RecordStatus.IN_PROGRESS else 0, record.decided_at_ms)
