"""The Kafka side of recordings: a bystander reader of a topic, and a re-producer.

:mod:`dedupe_consumer.replay` keeps the file format, the stopping rules and the
progress; this module only talks to the broker.

:class:`TopicReader` must leave no trace on the topic it reads: it uses
``assign`` (never ``subscribe``, so it joins no group and triggers no rebalance
of the real consumers), a throwaway ``group.id`` that librdkafka requires but
nobody else uses, ``enable.auto.commit = false``, and it never commits.

:class:`RecordingProducer` is idempotent with ``acks=all``: a retried send must
not become a duplicate the recording never had.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition

from dedupe_consumer.errors import DedupeError
from dedupe_consumer.kafka.logs import kafka_log_config
from dedupe_consumer.kafka.producing import produce_waiting
from dedupe_consumer.models import SourceMessage

log = structlog.get_logger("dedupe_consumer.replay")

_FATAL_CODES: Final = frozenset(
    {
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._UNKNOWN_TOPIC,
    }
)


class TopicUnavailableError(DedupeError):
    """The topic is missing, unreadable or has no partitions; ``reason`` says which."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"topic {topic!r} is unusable: {reason}")
        self.topic = topic
        self.reason = reason


def _partition_count(client: Consumer | Producer, topic: str, timeout_s: float) -> int:
    metadata = client.list_topics(topic, timeout=timeout_s)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        why = found.error if found is not None and found.error is not None else "not found"
        raise TopicUnavailableError(topic, str(why))
    return len(found.partitions)


@dataclass(frozen=True, slots=True)
class PartitionEnd:
    """librdkafka reached the end of ``partition`` (partition EOF)."""

    partition: int


class TopicReader:
    """Reads one topic with ``assign`` and a throwaway group; never commits."""

    OWNED_PROPERTIES: Final = frozenset(
        {
            "bootstrap.servers",
            "group.id",
            "enable.auto.commit",
            "enable.auto.offset.store",
            "enable.partition.eof",
        }
    )
    """Consumer properties the reader sets itself: they are what makes it leave no trace."""

    def __init__(self, bootstrap_servers: str, properties: Mapping[str, Any] | None = None) -> None:
        clash = sorted(self.OWNED_PROPERTIES & set(properties or {}))
        if clash:
            raise ValueError(
                f"{', '.join(clash)} cannot be set: the recorder sets them so that it never "
                "joins a group or commits offsets"
            )
        self.group_id = f"dedupe-consumer-recorder-{uuid.uuid4().hex}"
        """The throwaway group.id (never joined, never committed to)."""
        self._consumer = Consumer(
            {
                # What a consumer would see: no message of an aborted transaction (the
                # outputs of event.emit, a hop's copies); a property given overrides it.
                "isolation.level": "read_committed",
                **(properties or {}),
                **kafka_log_config(),
                "bootstrap.servers": bootstrap_servers,
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
            }
        )

    def partition_count(self, topic: str, timeout_s: float) -> int:
        """Raises :class:`TopicUnavailableError`."""
        return _partition_count(self._consumer, topic, timeout_s)

    def watermarks(self, topic: str, partition: int, timeout_s: float) -> tuple[int, int] | None:
        """``(low, high)`` asked of the broker now, or None on a timeout."""
        found = self._consumer.get_watermark_offsets(
            KafkaTopicPartition(topic, partition), timeout=timeout_s, cached=False
        )
        return None if found is None else (int(found[0]), int(found[1]))

    def offsets_at(
        self, topic: str, partitions: Iterable[int], ms: int, timeout_s: float
    ) -> list[tuple[int, int, str | None]]:
        """``(partition, offset, error)``: the first offset at or after ``ms`` (-1: none yet)."""
        found = self._consumer.offsets_for_times(
            [KafkaTopicPartition(topic, p, ms) for p in partitions], timeout=timeout_s
        )
        return [
            (tp.partition, tp.offset, None if tp.error is None else str(tp.error)) for tp in found
        ]

    def assign(self, topic: str, starts: Mapping[int, int]) -> None:
        self._consumer.assign([KafkaTopicPartition(topic, p, o) for p, o in starts.items()])

    def pause(self, topic: str, partition: int) -> None:
        """Stop fetching ``partition`` (past its end)."""
        self._consumer.pause([KafkaTopicPartition(topic, partition)])

    def read(self, max_messages: int, timeout_s: float) -> Iterator[SourceMessage | PartitionEnd]:
        """Up to ``max_messages`` messages and partition ends, in the order they came.

        A fatal error, or a topic or partition that does not exist, raises
        ``KafkaException`` where it comes; other errors are logged and skipped.
        """
        for message in self._consumer.consume(num_messages=max_messages, timeout=timeout_s):
            error = message.error()
            if error is None:
                yield message
            elif error.code() == KafkaError._PARTITION_EOF:
                yield PartitionEnd(message.partition() or 0)
            elif error.fatal() or error.code() in _FATAL_CODES:
                raise KafkaException(error)
            else:
                log.warning("consumer_error", error=str(error))

    def close(self) -> None:
        self._consumer.close()  # no group was joined and nothing is committed: nothing to leave


class RecordingProducer:
    """An idempotent producer (``acks=all``) that keeps the first delivery failures."""

    OWNED_PROPERTIES: Final = frozenset(
        {"bootstrap.servers", "enable.idempotence", "acks", "request.required.acks"}
    )

    def __init__(self, bootstrap_servers: str, properties: Mapping[str, Any] | None = None) -> None:
        clash = sorted(self.OWNED_PROPERTIES & set(properties or {}))
        if clash:
            raise ValueError(
                f"{', '.join(clash)} cannot be set: re-producing must be idempotent with acks=all"
            )
        self._producer = Producer(
            {
                "partitioner": "murmur2_random",
                "linger.ms": 5,
                # Asking for the target's metadata must not create it with broker defaults.
                "allow.auto.create.topics": False,
                **kafka_log_config(),
                **(properties or {}),
                "bootstrap.servers": bootstrap_servers,
                "enable.idempotence": True,
                "acks": "all",
            }
        )
        self.failures: list[str] = []
        """Delivery errors reported so far."""

    def partition_count(self, topic: str, timeout_s: float) -> int:
        """Raises :class:`TopicUnavailableError`."""
        return _partition_count(self._producer, topic, timeout_s)

    def _on_delivery(self, error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            self.failures.append(str(error))

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, str | bytes | None]],
        *,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        """Queue one message (the partitioner chooses without ``partition``)."""
        extra: dict[str, Any] = {}
        if timestamp_ms is not None:
            extra["timestamp"] = timestamp_ms
        if partition is not None:
            extra["partition"] = partition
        produce_waiting(
            self._producer,
            topic,
            key=key,
            value=value,
            headers=headers,
            on_delivery=self._on_delivery,
            **extra,
        )
        self._producer.poll(0)

    def flush(self, timeout_s: float) -> int:
        """Wait for acknowledgements; the number of messages still unacknowledged."""
        return int(self._producer.flush(timeout_s))


class TopicReadError(DedupeError):
    """A topic could not be read to its end."""


def read_to_end(
    bootstrap_servers: str,
    properties: Mapping[str, Any],
    topic: str,
    update: Callable[[int, int | None], None] | None = None,
    *,
    timeout_s: float = 30.0,
    stall_s: float = 60.0,
) -> Iterator[SourceMessage]:
    """Every message of ``topic``, from its start to its end as of now (read_committed).

    A partition is done at the end seen at the start, even when its last offset is a
    transaction marker that never arrives; reading fails (:class:`TopicReadError`)
    only after ``stall_s`` without any progress. ``update(done, total)`` follows it.
    """
    reader = TopicReader(bootstrap_servers, properties)
    try:
        count = reader.partition_count(topic, timeout_s)
        ends: dict[int, int] = {}
        starts: dict[int, int] = {}
        for partition in range(count):
            marks = reader.watermarks(topic, partition, timeout_s)
            if marks is None:
                raise TopicReadError(f"no answer from the brokers about {topic!r}[{partition}]")
            if marks[1] > marks[0]:
                starts[partition], ends[partition] = marks
        if not ends:
            return
        total = sum(ends[p] - starts[p] for p in ends)
        done = 0
        reader.assign(topic, starts)
        open_parts = set(ends)
        stalled_since = time.monotonic()
        while open_parts:
            if time.monotonic() - stalled_since > stall_s:
                raise TopicReadError(
                    f"reading {topic!r} made no progress for {stall_s:.0f} s before its end"
                )
            for message in reader.read(500, 0.5):
                stalled_since = time.monotonic()
                if isinstance(message, PartitionEnd):
                    open_parts.discard(message.partition)
                    continue
                partition, offset = message.partition() or 0, message.offset() or 0
                if partition not in open_parts:
                    continue
                if offset >= ends[partition] - 1:
                    open_parts.discard(partition)  # the end seen at the start
                    if offset >= ends[partition]:
                        continue
                done += 1
                if update is not None:
                    update(done, total)
                yield message
    finally:
        reader.close()
