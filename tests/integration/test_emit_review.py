"""Review of issue 15 (``event.emit``): failing tests for the defects found.

Each output that cannot be produced must fail its own attempt (retried, then
dead-lettered), as ``Event.emit`` documents, never the batch's changelog
transaction (which stops the consumer and, on restart, stops it again).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from dedupe_consumer import DedupeConsumer, Event, Handler
from dedupe_consumer.models import BatchStats
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import admin, produce_events, settings_for, wait_for
from .test_changelog import changelog_for
from .test_emit import read_committed

pytestmark = pytest.mark.kafka


class EmitsThis(Handler):
    def __init__(self, out: str, value: Any = b"x", key: Any = None, headers: Any = None) -> None:
        self.out, self.value, self.key, self.headers = out, value, key, headers

    def handle(self, event: Event) -> None:
        event.emit(self.out, self.value, key=self.key, headers=self.headers)


def run_to_end(consumer: DedupeConsumer, expect: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s

    def until(totals: BatchStats) -> bool:
        return totals.consumed >= expect or time.monotonic() > deadline

    consumer.run(until=until, install_signal_handlers=False)


@pytest.mark.parametrize(
    "how",
    [
        {"value": {"amount": 1}},  # forgot json.dumps: len() works, produce() refuses
        {"value": bytearray(b"abc")},  # not read-only: produce() refuses
        {"value": b"ok", "headers": {"n": {"x": 1}}},
        {"value": b"ok", "key": ["k"]},
    ],
    ids=["dict-value", "bytearray-value", "dict-header", "list-key"],
)
def test_an_output_of_a_type_produce_refuses_dead_letters_its_event_not_the_consumer(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path, how: dict[str, Any]
) -> None:
    """Effects.emit checks only len(): a dict, list or bytearray passes, then
    Producer.produce raises TypeError inside Changelog._transaction (no abort, the
    transaction stays open), the persister's error breaks the engine and run() raises.
    A restart handles the same event again: a crash loop on one bad output."""
    topic = kafka_topic(partitions=1)
    out = kafka_topic(partitions=1)
    sent = produce_events(kafka_bootstrap, topic, 2, duplicates=0.0, seed=151)
    settings = settings_for(
        kafka_bootstrap, topic, tmp_path / "state", processing={"max_retries": 0}
    )
    consumer = DedupeConsumer(EmitsThis(out, **how), settings)
    run_to_end(consumer, len(sent))  # raises TypeError today
    assert consumer.totals.dead_lettered == 2
    assert read_committed(kafka_bootstrap, out) == []


def test_an_output_over_its_topics_max_message_bytes_dead_letters_its_event(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """The size check is against the producer's message.max.bytes only; an output
    topic with a smaller max.message.bytes (a per-topic setting, common) rejects the
    record at the broker, which fails the whole changelog transaction: StoreError,
    the consumer stops, and on restart the same handler emits the same output."""
    topic = kafka_topic(partitions=1)
    out = kafka_topic(partitions=1, config={"max.message.bytes": "2000"})
    sent = produce_events(kafka_bootstrap, topic, 2, duplicates=0.0, seed=152)
    settings = settings_for(
        kafka_bootstrap, topic, tmp_path / "state", processing={"max_retries": 0}
    )
    consumer = DedupeConsumer(EmitsThis(out, value=b"v" * 20_000), settings)
    run_to_end(consumer, len(sent))  # raises StoreError today
    assert consumer.totals.dead_lettered == 2 and consumer.totals.handled == 0


def test_the_output_topic_check_forgets_a_topic_deleted_since(
    kafka_bootstrap: str, kafka_topic: TopicFactory
) -> None:
    """Changelog._existing caches a topic forever. Once the output topic is deleted,
    emit still passes; the producer's metadata request then re-creates the topic with
    the broker's defaults (auto.create.topics.enable, the default) -- the very thing
    the check exists to prevent -- or, without auto-create, the transaction times
    out and the consumer stops, again on every restart."""
    out = kafka_topic(partitions=3)
    changelog = changelog_for(kafka_bootstrap, f"g-{uuid.uuid4().hex[:8]}")
    try:
        assert changelog.output_limit(out) is not None
        client = admin(kafka_bootstrap)
        client.delete_topics([out], operation_timeout=30)[out].result(timeout=30)
        wait_for(lambda: out not in client.list_topics(timeout=10).topics, 30, "the topic to go")
        time.sleep(6)  # past the 5 s re-ask interval of a missing topic
        assert changelog.output_limit(out) is None
    finally:
        changelog.close()


def test_an_output_to_the_dead_letter_topic_is_refused(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """_INTERNAL refuses the changelog and by-id topics, not the dead-letter topic: an
    output lands there without any dlq.* header, where it reads as a corrupt letter
    (and a redrive sends it to the source topic, where it is a new event)."""
    topic = kafka_topic(partitions=1)
    sent = produce_events(kafka_bootstrap, topic, 1, duplicates=0.0, seed=153)
    settings = settings_for(
        kafka_bootstrap, topic, tmp_path / "state", processing={"max_retries": 0}
    )
    dlq = settings.processing.dead_letter_topic
    kafka_topic(partitions=1, name=dlq)
    consumer = DedupeConsumer(EmitsThis(dlq), settings)
    run_to_end(consumer, len(sent))
    assert consumer.totals.handled == 0, "an output was written into the dead-letter topic"
