"""The library's own writes survive a broker: acks=all, idempotence, three replicas.

A dead letter or a changelog record acknowledged by the partition leader alone is
lost when that broker dies before a follower copied it (issue 17). Every producer
of the library's writes with ``acks=all`` and ``enable.idempotence=true``, and a
``[kafka.producer]`` that would weaken either is refused at load; every topic the
library creates asks for ``min(3, brokers)`` replicas, not the broker default
(Kafka's own is 1).
"""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from dedupe_consumer import ConfigError, Settings
from dedupe_consumer.kafka import KafkaDeadLetters
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.kafka.replication import replication_factor
from dedupe_consumer.librdkafka import weakened_durability

from ..log_capture import captured_logs


def _settings(producer: dict[str, Any], consumer: dict[str, Any] | None = None) -> Settings:
    return Settings.load(
        kafka={
            "bootstrap_servers": "127.0.0.1:1",
            "group_id": "g",
            "topics": ["t"],
            "consumer": consumer or {},
            "producer": producer,
        },
        processing={"dead_letter_topic": "t.dlq"},
    )


@pytest.mark.parametrize(
    "producer, named",
    [
        ({"acks": 1}, "acks = 1"),
        ({"acks": "0"}, "acks = '0'"),
        ({"request.required.acks": 1}, "request.required.acks = 1"),
        ({"enable.idempotence": False}, "enable.idempotence = False"),
        ({"enable.idempotence": "false"}, "enable.idempotence = 'false'"),
    ],
)
def test_a_producer_setting_that_weakens_durability_is_a_config_error_naming_it(
    producer: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _settings(producer)
    message = str(info.value)
    assert "kafka.producer" in message
    assert named in message
    assert "acks=all and enable.idempotence=true" in message


@pytest.mark.parametrize(
    "producer",
    [
        {"acks": "all"},
        {"acks": -1},
        {"request.required.acks": "-1"},
        {"enable.idempotence": True},
        {"enable.idempotence": "true", "linger.ms": 20},
        {},
    ],
)
def test_settings_that_keep_durability_are_accepted(producer: dict[str, Any]) -> None:
    assert _settings(producer).kafka.producer == producer
    assert weakened_durability(producer) == []


def _producer_configurations(logs: list[dict[str, Any]]) -> list[str]:
    """Each producer's configuration as librdkafka logged it (``debug = conf``)."""
    by_client: dict[str, str] = {}
    for line in logs:
        if line.get("event") == "librdkafka" and line.get("facility") == "CONF":
            client = str(line["client"])
            if "#producer-" in client:
                by_client[client] = by_client.get(client, "") + str(line["message"]) + "\n"
    return list(by_client.values())


def test_dead_letter_and_changelog_producers_run_with_acks_all_and_idempotence() -> None:
    """As librdkafka itself reports the two producers' configuration; the changelog is
    given a producer config asking for acks=1 directly (no settings validation in the
    way), and still writes with acks=all."""
    settings = _settings(
        {"linger.ms": 3},
        # librdkafka's mock cluster stands in for a broker; each client logs its config.
        consumer={"debug": "conf", "test.mock.num.brokers": 1},
    )
    with captured_logs() as logs:
        letters = KafkaDeadLetters(settings, flush_timeout_s=5, topic_timeout_s=5)
        letters.close()
        changelog = Changelog(
            settings.kafka.connection(),
            "g",
            timedelta(days=1),
            "tx-durable",
            {"acks": 1, "linger.ms": 3},
        )
        changelog.close()
    producers = _producer_configurations(logs)
    dead_letters = [c for c in producers if "transactional.id" not in c]
    changelogs = [c for c in producers if "transactional.id = tx-durable" in c]
    assert len(dead_letters) == 1 and len(changelogs) == 1, producers
    for configuration in (*dead_letters, *changelogs):
        assert "enable.idempotence = true" in configuration, configuration
        assert "request.required.acks = -1" in configuration, configuration


@pytest.mark.parametrize(("brokers", "replicas"), [(0, -1), (1, 1), (2, 2), (3, 3), (6, 3)])
def test_library_topics_get_three_replicas_or_as_many_as_there_are_brokers(
    brokers: int, replicas: int
) -> None:
    metadata = SimpleNamespace(brokers={n: object() for n in range(1, brokers + 1)})
    assert replication_factor(metadata) == replicas


def test_a_broker_that_is_down_still_counts_toward_the_replicas() -> None:
    """Metadata lists only live brokers: with one of three SIGKILLed, it names two. The
    dead one still holds replicas of existing topics, and KRaft places a new topic's
    third replica on it (it catches up when it returns; checked on a real cluster in
    tests/faults/test_cluster.py). A changelog created during the outage must not be
    left with two replicas for good."""
    partition = SimpleNamespace(replicas=[2, 3, 1])
    metadata = SimpleNamespace(
        brokers={1: object(), 2: object()},
        topics={"__consumer_offsets": SimpleNamespace(partitions={0: partition})},
    )
    assert replication_factor(metadata) == 3


def test_a_transactional_id_in_the_producer_settings_is_refused() -> None:
    """``[kafka.producer]`` goes to the dead-letter producer as it is: a
    ``transactional.id`` there makes it transactional, and its first dead letter, sent
    outside a transaction, fails (``_STATE``) -- at run time, maybe days after the
    start. The changelog and hop producers set their own id per store anyway."""
    with pytest.raises(ConfigError) as info:
        _settings({"transactional.id": "orders"})
    message = str(info.value)
    assert "kafka.producer" in message and "transactional.id" in message


class _Future:
    def __init__(self, value: Any) -> None:
        self._value = value

    def result(self, timeout: float | None = None) -> Any:
        return self._value


class _Admin:
    """An AdminClient answering with fixed metadata; topic configs say ``compact``."""

    def __init__(self, metadata: Any) -> None:
        self._metadata = metadata

    def list_topics(self, timeout: float = -1) -> Any:
        return self._metadata

    def describe_configs(self, resources: list[Any], **_: Any) -> dict[Any, _Future]:
        return {r: _Future({"cleanup.policy": SimpleNamespace(value="compact")}) for r in resources}


def _three_brokers_and(topics: dict[str, int]) -> Any:
    """Metadata of a three-broker cluster with ``topics`` (name → replicas), 2 partitions."""
    return SimpleNamespace(
        brokers={1: object(), 2: object(), 3: object()},
        controller_id=1,
        topics={
            name: SimpleNamespace(
                error=None,
                partitions={
                    p: SimpleNamespace(replicas=[1, 2, 3][:replicas], leader=1) for p in (0, 1)
                },
            )
            for name, replicas in topics.items()
        },
    )


def _under_replicated(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == "library_topic_under_replicated"]


def test_an_existing_dead_letter_topic_with_one_replica_is_named_in_a_warning() -> None:
    """Made by an older version (the broker default: one replica) or by hand, it is used
    as it is: say so, with the fix, instead of letting the README's "three replicas"
    stand unchecked."""
    from dedupe_consumer.kafka.topics import ensure_dead_letter_topic

    with captured_logs() as logs:
        ensure_dead_letter_topic(
            _settings({}), 5, admin=_Admin(_three_brokers_and({"t": 3, "t.dlq": 1}))
        )
    [warning] = _under_replicated(logs)
    assert warning["topic"] == "t.dlq" and warning["replicas"] == 1 and warning["wanted"] == 3
    assert "kafka-reassign-partitions" in warning["fix"]
    with captured_logs() as logs:
        ensure_dead_letter_topic(
            _settings({}), 5, admin=_Admin(_three_brokers_and({"t": 3, "t.dlq": 3}))
        )
    assert _under_replicated(logs) == []


def test_an_existing_changelog_topic_with_one_replica_is_named_in_a_warning() -> None:
    from dedupe_consumer.store import changelog_topic

    settings = _settings({}, consumer={"test.mock.num.brokers": 1})
    changelog = Changelog(settings.kafka.connection(), "g", timedelta(days=1), "tx-replicas")
    try:
        name = changelog_topic("g", "t")
        changelog._admin = _Admin(_three_brokers_and({"t": 3, name: 1}))  # type: ignore[assignment]
        with captured_logs() as logs:
            changelog.ensure_topics(["t"])
        [warning] = _under_replicated(logs)
        assert warning["topic"] == name and warning["replicas"] == 1 and warning["wanted"] == 3
    finally:
        changelog.close()


@pytest.mark.parametrize("key", ["acks", "request.required.acks", "enable.idempotence"])
def test_redrive_and_replay_producers_refuse_acks_by_either_name(key: str) -> None:
    """``dlq redrive`` and ``replay --to-topic -X`` pass their properties to the
    recording producer, which owns ``acks``: its librdkafka alias
    ``request.required.acks`` is refused as plainly as ``acks`` is."""
    from dedupe_consumer.kafka.recording import RecordingProducer

    with pytest.raises(ValueError, match=rf"{key} cannot be set"):
        RecordingProducer("127.0.0.1:1", {key: "0"})
