"""A dead letter that stays too large without its value goes with only our headers."""

from __future__ import annotations

import pytest

from dedupe_consumer.config import Settings
from dedupe_consumer.dead_letters import DeadLetter
from dedupe_consumer.kafka.dead_letters import KafkaDeadLetters
from dedupe_consumer.models import DeadLetterReason, RawHeaders
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import headers_of, read_all

pytestmark = pytest.mark.kafka


class HugeHeaders:
    """A message the source topic accepted (4 MB limit) with a 1.2 MB header."""

    def __init__(self, topic: str) -> None:
        self._topic = topic

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 7

    def key(self) -> bytes:
        return b"k" * 10

    def value(self) -> bytes:
        return b"v" * 10

    def headers(self) -> RawHeaders:
        return [("trace", b"x" * 1_200_000)]

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)


def test_a_letter_too_large_even_without_its_value_goes_with_only_dlq_headers(
    kafka_bootstrap: str, kafka_topic: TopicFactory
) -> None:
    source = kafka_topic(partitions=1, config={"max.message.bytes": "4000000"})
    dlq = kafka_topic(partitions=1, name=f"{source}.dlq")
    settings = Settings.load(
        kafka={"bootstrap_servers": kafka_bootstrap, "group_id": "g", "topics": [source]},
        processing={"dead_letter_topic": dlq},
    )
    letters = KafkaDeadLetters(settings)
    try:
        letters.send(
            HugeHeaders(source),
            DeadLetter(DeadLetterReason.PERMANENT_ERROR, "id-1", "E", "boom", 1),
        )
        letters.flush()  # raised DeadLetterError before: the partition could never move on
    finally:
        letters.close()
    [letter] = read_all(kafka_bootstrap, dlq, 1)
    headers = headers_of(letter)
    assert letter.value() is None and letter.key() is None
    assert "trace" not in headers
    assert headers["dlq.value.omitted"] == b"too-large"
    assert headers["dlq.key.omitted"] == b"too-large"
    assert headers["dlq.headers.omitted"] == b"too-large"
    assert int(headers["dlq.headers.size"]) >= 1_200_000
    assert headers["dlq.original.offset"] == b"7"
    assert headers["dlq.event.id"] == b"id-1"
