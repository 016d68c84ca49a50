"""The dead-letter topic is created explicitly, sized like the source (issue 11).

The broker auto-creates topics; without this, the first dead letter created the
topic with the broker's default of 1 partition, without a word.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from dedupe_consumer import Settings
from dedupe_consumer.errors import ConfigError
from dedupe_consumer.kafka import KafkaDeadLetters
from dedupe_consumer.kafka.topics import ensure_dead_letter_topic
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..log_capture import captured_logs

pytestmark = pytest.mark.kafka


@pytest.fixture
def dlq_name(kafka_admin: Any) -> Iterator[str]:
    name = f"dlq-{uuid.uuid4().hex[:12]}"
    yield name
    for future in kafka_admin.delete_topics([name], operation_timeout=10).values():
        with contextlib.suppress(Exception):
            future.result(timeout=15)


def _settings(bootstrap: str, topics: list[str], dlq: str) -> Settings:
    return Settings.load(
        kafka={"bootstrap_servers": bootstrap, "group_id": "g", "topics": topics},
        processing={"dead_letter_topic": dlq},
    )


def _partitions(admin: Any, name: str) -> int | None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        topic = admin.list_topics(timeout=5).topics.get(name)
        if topic is not None and topic.error is None and topic.partitions:
            return len(topic.partitions)
        time.sleep(0.1)
    return None


def test_missing_dead_letter_topic_is_created_with_the_largest_source_partition_count(
    kafka_bootstrap: str, kafka_admin: Any, kafka_topic: TopicFactory, dlq_name: str
) -> None:
    small, large = kafka_topic(partitions=2), kafka_topic(partitions=5)
    with captured_logs() as logs:
        letters = KafkaDeadLetters(_settings(kafka_bootstrap, [small, large], dlq_name))
        letters.close()
    assert _partitions(kafka_admin, dlq_name) == 5  # not the broker's auto-create default
    [created] = [e for e in logs if e["event"] == "dead_letter_topic_created"]
    assert created["topic"] == dlq_name
    assert created["partitions"] == 5
    assert created["replication_factor"] == 1  # min(3, brokers): the test broker is alone
    assert created["setting"] == "processing.dead_letter_topic"


def test_an_existing_dead_letter_topic_is_left_as_it_is(
    kafka_bootstrap: str, kafka_admin: Any, kafka_topic: TopicFactory
) -> None:
    source = kafka_topic(partitions=3)
    existing = kafka_topic(partitions=1)
    with captured_logs() as logs:
        ensure_dead_letter_topic(_settings(kafka_bootstrap, [source], existing))
    assert _partitions(kafka_admin, existing) == 1
    assert not [e for e in logs if e["event"] == "dead_letter_topic_created"]


class _DeniedFuture:
    def result(self, timeout: float | None = None) -> None:
        raise KafkaException(
            KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "Authorization failed.")
        )


class _NoCreateAcl:
    """The real broker's metadata; CreateTopics answered as an ACL-protected cluster would.

    The test broker runs without an authorizer, so the refusal is the one stand-in.
    """

    def __init__(self, admin: Any) -> None:
        self.admin = admin

    def list_topics(self, timeout: float) -> Any:
        return self.admin.list_topics(timeout=timeout)

    def create_topics(self, topics: list[Any], **kwargs: Any) -> dict[str, _DeniedFuture]:
        return {t.topic: _DeniedFuture() for t in topics}


def test_no_permission_to_create_stops_naming_the_setting_and_the_fix(
    kafka_bootstrap: str, kafka_admin: Any, kafka_topic: TopicFactory, dlq_name: str
) -> None:
    source = kafka_topic(partitions=4)
    with pytest.raises(ConfigError) as info:
        ensure_dead_letter_topic(
            _settings(kafka_bootstrap, [source], dlq_name), admin=_NoCreateAcl(kafka_admin)
        )
    message = str(info.value)
    assert f"processing.dead_letter_topic = {dlq_name!r}" in message
    assert "TOPIC_AUTHORIZATION_FAILED" in message
    assert "--partitions 4" in message  # the fix: create it by hand, sized like the source
    assert "CREATE" in message
