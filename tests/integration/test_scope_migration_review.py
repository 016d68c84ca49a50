"""Review of issue 14: migrate-scope with an ID decided on several source partitions."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from dedupe_consumer import DedupeConsumer
from dedupe_consumer.engine import payload_digest
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.kafka.scope_migration import _read_decisions, migrate_to_topic_scope
from dedupe_consumer.models import BatchStats, TopicPartition
from dedupe_consumer.scope import by_id_topic, stage_group
from dedupe_consumer.store.base import IdRecord, RecordStatus, WriteSet
from dedupe_consumer.store.changelog_codec import changelog_topic
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import settings_for
from .test_topic_scope import Seen

pytestmark = pytest.mark.kafka


def test_rev14_migration_keeps_a_handled_decision_over_an_older_claim(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """ID X was claimed on source partition 0 (claim mode; the instance stopped before
    it decided, so the claim stayed) and handled on partition 1 (another copy, another
    partitioner). ``_read_decisions`` keeps the record with the smallest
    ``decided_at_ms`` whatever its status, i.e. the claim: after the switch, a copy
    of X finds an in-progress claim, ``on_uncertain = "retry"`` calls the handler
    again, though X's handler had completed. A HANDLED (or DEAD_LETTERED) record
    should win over an IN_PROGRESS one."""
    topic = kafka_topic(partitions=2)
    group = f"g-{topic}"
    settings = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "state",
        group=group,
        dedupe={"scope": "topic", "id_source": "key"},
        processing={"mode": "claim", "on_uncertain": "retry", "claim_lease": "1s"},
    )
    now = int(time.time() * 1000)
    digest = payload_digest(b"pay")
    old = Changelog(
        settings.kafka.connection(), group, settings.dedupe.retention, f"rev14-{uuid.uuid4()}"
    )
    try:
        old.ensure_topics([topic])
        old.write(
            WriteSet(
                records={
                    TopicPartition(topic, 0): [
                        ("X", IdRecord(RecordStatus.IN_PROGRESS, 5, now - 60_000, digest))
                    ],
                    TopicPartition(topic, 1): [
                        ("X", IdRecord(RecordStatus.HANDLED, 9, now - 30_000, digest))
                    ],
                }
            )
        )
    finally:
        old.close()
    report = migrate_to_topic_scope(settings)
    assert report.ids == {topic: 1} and report.on_several_partitions == {topic: 1}
    moved, _ = _read_decisions(
        settings, changelog_topic(stage_group(group), by_id_topic(group, topic)), 30
    )
    # After the switch: X is sent again; it must be a duplicate.
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(topic, key=b"X", value=b"pay", partition=0)
    assert producer.flush(30) == 0
    handler = Seen()
    consumer = DedupeConsumer(handler, settings)
    deadline = time.monotonic() + 40

    def until(totals: BatchStats) -> bool:
        return totals.consumed >= 1 or time.monotonic() > deadline

    consumer.run(until=until, install_signal_handlers=False)
    assert handler.ids() == [], (
        f"X's handler completed before the switch and ran again after it (migrated as "
        f"{moved['X'].status.name})"
    )
