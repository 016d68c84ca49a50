"""``event.emit``: an output exists if and only if its event's decision is committed.

Outputs are produced in the changelog transaction that persists the decision
(with the source offsets), so a read_committed reader of the output topic sees
exactly one output per unique input ID: a duplicate emits nothing, a failed
attempt's outputs are dropped with it, and an output that cannot be produced
fails its attempt (retried, then dead-lettered) instead of the batch.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from dedupe_consumer import DedupeConsumer, Event, Handler
from dedupe_consumer.kafka.recording import read_to_end
from dedupe_consumer.models import BatchStats
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import headers_of, produce_events, read_all, settings_for

pytestmark = pytest.mark.kafka


class Emitting(Handler):
    """Emits one output per call, keyed like its input; fails the first attempt of the
    IDs in ``flaky`` after emitting (that output must vanish with the attempt)."""

    def __init__(self, out: str, flaky: frozenset[str] = frozenset()) -> None:
        self.out = out
        self.flaky = flaky
        self.lock = threading.Lock()
        self.calls: list[str] = []

    def handle(self, event: Event) -> None:
        event.emit(self.out, f"done:{event.id}", key=event.key, headers={"in-reply-to": event.id})
        with self.lock:
            self.calls.append(event.id)
        if event.id in self.flaky and event.attempt == 1:
            raise RuntimeError("downstream blinked")


def read_committed(
    bootstrap: str, topic: str
) -> list[tuple[bytes | None, bytes | None, dict[str, bytes]]]:
    """Every committed message of ``topic``, from its start to its end as of now."""
    return [
        (as_bytes(message.key()), as_bytes(message.value()), headers_of(message))
        for message in read_to_end(bootstrap, {}, topic)
    ]


def as_bytes(data: bytes | str | None) -> bytes | None:
    return data.encode() if isinstance(data, str) else data


def run_to_end(consumer: DedupeConsumer, expect: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s

    def until(totals: BatchStats) -> bool:
        return totals.consumed >= expect or time.monotonic() > deadline

    consumer.run(until=until, install_signal_handlers=False)


def test_one_output_per_unique_id_and_none_from_a_failed_attempt(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=4)
    out = kafka_topic(partitions=2)
    sent = produce_events(kafka_bootstrap, topic, 600, duplicates=0.2, seed=21)
    unique = set(sent)
    flaky = frozenset(sorted(unique)[:30])
    handler = Emitting(out, flaky)
    settings = settings_for(
        kafka_bootstrap, topic, tmp_path / "state", processing={"concurrency": 4}
    )
    run_to_end(DedupeConsumer(handler, settings), len(sent))
    outputs = read_committed(kafka_bootstrap, out)
    ids = Counter((value or b"").decode().removeprefix("done:") for _, value, _ in outputs)
    assert set(ids) == unique, "an input without its output, or an output without input"
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1][:5]
    # The failed first attempts did emit: their outputs were dropped with them.
    assert sum(1 for i in handler.calls if i in flaky) == 2 * len(flaky)
    key, value, headers = outputs[0]
    assert headers["in-reply-to"] == (value or b"").removeprefix(b"done:")
    assert key == headers["in-reply-to"]  # produce_events keys each event by its ID


def test_an_output_to_a_missing_topic_dead_letters_its_event_and_emits_nothing(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    sent = produce_events(kafka_bootstrap, topic, 3, duplicates=0.0, seed=22)
    missing = f"no-such-topic-{uuid.uuid4().hex[:8]}"
    settings = settings_for(
        kafka_bootstrap, topic, tmp_path / "state", processing={"max_retries": 1}
    )
    consumer = DedupeConsumer(Emitting(missing), settings)
    run_to_end(consumer, len(sent))
    assert consumer.totals.dead_lettered == 3 and consumer.totals.handled == 0
    letters = read_all(kafka_bootstrap, settings.processing.dead_letter_topic, 3)
    reason = headers_of(letters[0])
    assert reason["dlq.reason"] == b"output-failed"
    assert missing.encode() in reason["dlq.error.message"]
    assert b"does not exist" in reason["dlq.error.message"]


def test_emit_without_the_changelog_is_refused_with_the_fix(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    out = kafka_topic(partitions=1)
    sent = produce_events(kafka_bootstrap, topic, 2, duplicates=0.0, seed=23)
    with_changelog = settings_for(
        kafka_bootstrap, topic, tmp_path / "state", processing={"max_retries": 0}
    )
    store = with_changelog.store.model_copy(update={"changelog": False})
    settings = with_changelog.model_copy(update={"store": store})
    consumer = DedupeConsumer(Emitting(out), settings)
    run_to_end(consumer, len(sent))
    assert consumer.totals.dead_lettered == 2
    letters = read_all(kafka_bootstrap, settings.processing.dead_letter_topic, 2)
    assert b"store.changelog = true" in headers_of(letters[0])["dlq.error.message"]
    assert read_committed(kafka_bootstrap, out) == []
