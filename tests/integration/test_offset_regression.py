"""A source topic deleted and created again reuses offsets: never skip its events silently."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.cimpl import NewTopic

from dedupe_consumer import DedupeConsumer, OffsetRegressionError
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import admin, produce_raw, settings_for
from .test_consumer import Recorder, run_until

pytestmark = pytest.mark.kafka


def events(ids: list[str]) -> list[dict[str, object]]:
    return [
        {"key": i.encode(), "value": i.encode(), "headers": [("event-id", i.encode())]} for i in ids
    ]


def recreate(bootstrap: str, topic: str) -> None:
    """Delete ``topic`` and create it again under the same name (a new topic ID)."""
    client = admin(bootstrap)
    client.delete_topics([topic], operation_timeout=30)[topic].result()
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_topics([NewTopic(topic, 1, 1)], operation_timeout=30)[topic].result()
            break
        except KafkaException:  # still being deleted
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the leader is elected
        metadata = client.list_topics(topic, timeout=10).topics[topic]
        if metadata.error is None and metadata.partitions[0].leader >= 0:
            return
        time.sleep(0.2)


@pytest.mark.parametrize("policy", ["fail", "reset"])
def test_recreated_topic_stops_with_fail_and_is_handled_once_with_reset(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path, policy: str
) -> None:
    topic = kafka_topic(partitions=1)
    old = [f"old-{i}" for i in range(20)]
    produce_raw(kafka_bootstrap, topic, events(old))
    group = f"{topic}-g"

    def consumer(handler: Recorder, store: str) -> DedupeConsumer:
        return DedupeConsumer(
            handler,
            settings_for(
                kafka_bootstrap,
                topic,
                tmp_path / store,
                group=group,
                processing={"on_offset_regression": policy, "batch_size": 7},
            ),
        )

    first = Recorder()
    run_until(consumer(first, "a"), 20)
    assert first.ids == old  # watermark 19

    recreate(kafka_bootstrap, topic)
    new = [f"new-{i}" for i in range(5)]
    produce_raw(kafka_bootstrap, topic, events([*new[:3], "old-3", *new[3:]]))  # offsets 0..5

    second = Recorder()
    if policy == "fail":
        with pytest.raises(OffsetRegressionError) as stopped:
            run_until(consumer(second, "a"), 6, timeout_s=30)
        message = str(stopped.value)
        assert "deleted and created again" in message
        assert "processing.on_offset_regression = 'reset'" in message
        assert second.ids == []
        return

    running = consumer(second, "a")
    run_until(running, 6)
    assert second.ids == new  # each new event once; the re-sent old ID stays a duplicate
    assert running.totals.duplicates == 1
    assert running.totals.replays == 0

    # The reset travels with the partition: an instance with an empty store restores
    # the new epoch's watermark from the changelog, not the old topic's 19.
    later = [f"later-{i}" for i in range(20)]
    produce_raw(kafka_bootstrap, topic, events(later))  # offsets 6..25: past the old watermark
    third = Recorder()
    moved = consumer(third, "b")
    run_until(moved, 20)
    assert third.ids == later
    assert moved.totals.replays == 0
