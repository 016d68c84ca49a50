"""The dead-letter topic, created explicitly at start-up.

Left to the broker's ``auto.create.topics.enable``, the first dead letter
creates the topic with the broker's default partition count (often 1), and
nobody is told. Instead, a missing ``processing.dead_letter_topic`` is created
with as many partitions as the largest source topic (so a redrive keeps each
letter's original partition available) and three replicas (fewer on a smaller
cluster; :mod:`dedupe_consumer.kafka.replication`), and the creation is
logged. Where this client may not create topics (ACLs, a create policy),
start-up stops with a message that names the setting and the fix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # admin re-exports it without __all__

from dedupe_consumer.config import Settings
from dedupe_consumer.errors import ConfigError
from dedupe_consumer.kafka.logs import kafka_error_fields, kafka_log_config
from dedupe_consumer.kafka.replication import replication_factor, warn_if_under_replicated

log = structlog.get_logger("dedupe_consumer.dead_letters")

_NOT_ALLOWED = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.POLICY_VIOLATION,
        KafkaError.INVALID_REPLICATION_FACTOR,
        KafkaError.INVALID_PARTITIONS,
        KafkaError.INVALID_CONFIG,
        KafkaError.TOPIC_EXCEPTION,
    }
)
"""CreateTopics answers that will not change by waiting: a person must act."""


def controller_known(metadata: Any) -> bool:
    """Whether cluster metadata names a live controller (admin requests wait for one).

    librdkafka's mock cluster, for one, reports a controller that is not among its
    brokers: every CreateTopics or DescribeTopics would wait out its whole timeout.
    """
    return bool(metadata.controller_id in metadata.brokers)


def ensure_dead_letter_topic(
    settings: Settings,
    timeout_s: float = 30.0,
    admin: Any = None,
    stopping: Callable[[], bool] | None = None,
) -> None:
    """Create ``processing.dead_letter_topic`` if it is missing; raise ConfigError if we may not.

    A broker that does not answer within ``timeout_s`` is logged and left to the
    dead-letter producer (which reports its own errors); so is one that has not
    answered when ``stopping()`` turns true (a stop during start-up is not held up
    for ``timeout_s``: the brokers are asked again every second).
    """
    name = settings.processing.dead_letter_topic
    if admin is None:
        admin = AdminClient({**settings.kafka.connection().config("admin"), **kafka_log_config()})
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                # All topics, not list_topics(topic=name): asking for one can auto-create it.
                metadata = admin.list_topics(
                    timeout=max(0.1, min(1.0, deadline - time.monotonic()))
                )
                break
            except KafkaException:
                if (stopping is not None and stopping()) or time.monotonic() >= deadline:
                    raise
        topics = metadata.topics
    except KafkaException as exc:
        log.warning(
            "dead_letter_topic_unchecked",
            topic=name,
            **kafka_error_fields(exc),
            consequence="if it does not exist, the first dead letter may create it with the "
            "broker's defaults",
        )
        return
    if name in topics:
        warn_if_under_replicated(metadata, name, "processing.dead_letter_topic")
        return
    if not controller_known(metadata):
        log.warning(
            "dead_letter_topic_unchecked",
            topic=name,
            error="the cluster names no live controller, so no topic can be created now",
            consequence="if it does not exist, the first dead letter may create it with the "
            "broker's defaults",
        )
        return
    sources = {
        t: len(topics[t].partitions)
        for t in settings.kafka.topics
        if t in topics and topics[t].error is None and topics[t].partitions
    }
    partitions = max(sources.values(), default=-1)  # -1: the broker's num.partitions
    replicas = replication_factor(metadata)  # min(3, brokers), not Kafka's default of 1
    new = NewTopic(name, num_partitions=partitions, replication_factor=replicas)
    future = admin.create_topics([new], request_timeout=timeout_s)[name]
    try:
        future.result(timeout=timeout_s + 5)
    except KafkaException as exc:
        error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        code = error.code() if error is not None else None
        if code == KafkaError.TOPIC_ALREADY_EXISTS:
            return  # another instance created it first
        if code in _NOT_ALLOWED:
            sized = f"--partitions {partitions} " if partitions > 0 else ""
            fields = kafka_error_fields(exc)
            raise ConfigError(
                f"processing.dead_letter_topic = {name!r} does not exist and cannot be created "
                f"by this consumer ({fields['error_code']}: {fields['error']}). Create it "
                f"before starting, e.g. kafka-topics.sh --create --topic {name} {sized}"
                "(as many partitions as the largest source topic), or grant this principal "
                "CREATE on the topic, or set processing.dead_letter_topic to an existing topic"
            ) from None
        log.warning(
            "dead_letter_topic_not_created",
            topic=name,
            **kafka_error_fields(exc),
            consequence="the first dead letter may create it with the broker's defaults",
        )
        return
    log.info(
        "dead_letter_topic_created",
        topic=name,
        setting="processing.dead_letter_topic",
        partitions=partitions if partitions > 0 else "broker default",
        replication_factor=replicas if replicas > 0 else "broker default",
        sized_like=sources or "no source topic exists yet",
    )
