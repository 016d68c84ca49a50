"""The topic-scope hop: every copy of an event ID onto one partition, exactly once.

With ``dedupe.scope = "topic"`` (see :mod:`dedupe_consumer.scope`), a
:class:`Repartitioner` thread reads the source topics in the consumer group and
writes each message, byte for byte with its key, headers and timestamp, to its
topic's by-id topic on the partition :func:`~dedupe_consumer.scope.id_partition`
names, plus one header with where it was read. Each batch's messages and its
source offsets commit in one Kafka transaction, sent with the group's metadata:
a crash leaves nothing of the batch visible (the engine reads committed messages
only) and its offsets uncommitted, so the batch is moved again, once; an
instance that left the group is fenced by the broker. The engine consumes the
by-id topics in a group of its own (:class:`HoppedSource`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from dedupe_consumer.config import Settings
from dedupe_consumer.contracts import Source
from dedupe_consumer.errors import ConfigError, DedupeError
from dedupe_consumer.kafka.logs import kafka_error_fields, kafka_log_config
from dedupe_consumer.kafka.producing import produce_waiting
from dedupe_consumer.kafka.replication import replication_factor
from dedupe_consumer.librdkafka import DURABLE_PRODUCER
from dedupe_consumer.models import SourceMessage, TopicPartition, header_pairs
from dedupe_consumer.observability import Metrics
from dedupe_consumer.payloads import id_reader
from dedupe_consumer.scope import by_id_partition, by_id_topic, origin_header

log = structlog.get_logger("dedupe_consumer.scope")

_TIMEOUT_S = 30.0
_MIN_RETENTION_MS = 7 * 24 * 3600 * 1000
"""A by-id topic keeps messages at least this long: the dedupe stage may be down a while."""


_MAX_FAILURES_IN_A_ROW = 5
"""Aborted transactions in a row after which the hop stops the consumer."""


def _where(firsts: Mapping[tuple[str, int], int]) -> str:
    return ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(firsts.items()))


class RepartitionError(DedupeError):
    """The hop cannot go on (its producer was fenced or failed fatally, or it crashed)."""


def ensure_by_id_topics(settings: Settings, admin: Any = None) -> dict[str, int]:
    """Create each source topic's by-id topic if missing; return their partition counts.

    Raises :class:`ConfigError` when a by-id topic exists with another partition count
    than ``dedupe.scope_partitions`` (an ID's partition must never move), or when it
    cannot be created.
    """
    kafka = settings.kafka
    wanted = settings.dedupe.scope_partitions
    if admin is None:
        admin = AdminClient({**kafka.connection().config("admin"), **kafka_log_config()})
    metadata = admin.list_topics(timeout=_TIMEOUT_S)
    topics = metadata.topics
    counts: dict[str, int] = {}
    create: list[NewTopic] = []
    retention_ms = max(int(settings.dedupe.retention.total_seconds() * 1000), _MIN_RETENTION_MS)
    for source in kafka.topics:
        name = by_id_topic(kafka.group_id, source)
        found = topics.get(name)
        if found is not None and found.error is None and found.partitions:
            count = len(found.partitions)
            if wanted is not None and count != wanted:
                raise ConfigError(
                    f"dedupe.scope_partitions = {wanted}, but by-id topic {name!r} of "
                    f"{source!r} has {count} partitions. An ID's by-id partition must never "
                    f"change: set dedupe.scope_partitions = {count} (or remove the setting)"
                )
            counts[source] = count
            continue
        if wanted is not None:
            count = wanted
        else:
            known = topics.get(source)
            if known is None or known.error is not None or not known.partitions:
                raise ConfigError(
                    f"dedupe.scope = 'topic': source topic {source!r} does not exist, so its "
                    f"by-id topic {name!r} cannot be sized like it; create the topic first or "
                    "set dedupe.scope_partitions"
                )
            count = len(known.partitions)
        counts[source] = count
        create.append(
            NewTopic(
                name,
                num_partitions=count,
                replication_factor=replication_factor(metadata),
                config={
                    "cleanup.policy": "delete",
                    "retention.ms": str(retention_ms),
                    # Retention counts from the move, not from the source's timestamps (an
                    # old event would be deleted before the stage read it); the source's
                    # timestamp travels in the origin header.
                    "message.timestamp.type": "LogAppendTime",
                },
            )
        )
    if create:
        for name, future in admin.create_topics(create, request_timeout=_TIMEOUT_S).items():
            try:
                future.result(timeout=_TIMEOUT_S + 5)
            except KafkaException as exc:
                error = exc.args[0]
                if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue  # another instance was first
                raise ConfigError(
                    f"dedupe.scope = 'topic': cannot create by-id topic {name!r} "
                    f"({error.name()}: {error.str()}); create it (cleanup.policy=delete, "
                    "the source's partition count) or grant this principal CREATE on it"
                ) from None
            log.info(
                "by_id_topic_created",
                topic=name,
                retention_ms=retention_ms,
                replication_factor=replication_factor(metadata),
            )
        # Another instance may have created one first, with another count: read back.
        topics = admin.list_topics(timeout=_TIMEOUT_S).topics
        for source in kafka.topics:
            found = topics.get(by_id_topic(kafka.group_id, source))
            if found is not None and found.partitions:
                counts[source] = len(found.partitions)
    return counts


HOP_CLIENT_ID = "dedupe-hop"
"""The ``client.id`` prefix of every hop's consumer: how the group's members are told apart."""


def refuse_mixed_scopes(settings: Settings, admin: Any = None) -> None:
    """Stop start-up when the group's live members run the other scope.

    A partition-scope consumer still running in a group whose hops have started (or the
    reverse) shares the source partitions with them: an ID with copies on both sides
    is handled on each. Best effort (a member may join after the check); a group that
    cannot be described is logged and let through.
    """
    kafka = settings.kafka
    group = kafka.group_id
    if admin is None:
        admin = AdminClient({**kafka.connection().config("admin"), **kafka_log_config()})
    try:
        found = admin.describe_consumer_groups([group], request_timeout=10)[group].result(15)
    except Exception as exc:  # not permitted, no broker yet: the run reports its own errors
        log.warning("group_scope_unchecked", group=group, error=str(exc))
        return
    clients = [str(getattr(m, "client_id", "") or "") for m in found.members]
    hops = sum(1 for c in clients if c.startswith(HOP_CLIENT_ID))
    if settings.dedupe.scope == "topic" and len(clients) > hops:
        raise ConfigError(
            f"dedupe.scope = 'topic', but {len(clients) - hops} member(s) of group {group!r} "
            "consume the source topics without the hop: partition-scope consumers still "
            "running. Stop them first (docs/scope.md, switching an existing group), or both "
            "would handle an ID sent to two partitions"
        )
    if settings.dedupe.scope == "partition" and hops:
        raise ConfigError(
            f"dedupe.scope = 'partition', but {hops} member(s) of group {group!r} are "
            "topic-scope hops: set dedupe.scope = 'topic' like the rest of the group, or "
            "stop them first"
        )


class Repartitioner(threading.Thread):
    """Moves the source topics' messages to their by-id topics (see the module)."""

    def __init__(
        self,
        settings: Settings,
        partitions: Mapping[str, int],
        transactional_id: str,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(name="dedupe-repartition", daemon=True)
        self.settings = settings
        self.partitions = dict(partitions)
        self.transactional_id = transactional_id
        self.metrics = metrics or Metrics()
        self.error: BaseException | None = None
        self._failed_in_a_row = 0
        self._stop_requested = threading.Event()
        self._extract = id_reader(settings.dedupe.id_source, settings.payload)
        kafka = settings.kafka
        self._targets = {t: by_id_topic(kafka.group_id, t) for t in kafka.topics}
        conf: dict[str, Any] = {
            **kafka.connection().config("consumer"),
            "group.id": kafka.group_id,
            "auto.offset.reset": kafka.auto_offset_reset,
            "enable.partition.eof": False,
            "isolation.level": "read_committed",
        }
        conf.update(kafka.consumer)
        conf["enable.auto.commit"] = False
        conf["enable.auto.offset.store"] = False
        conf["client.id"] = f"{HOP_CLIENT_ID}.{conf.get('client.id', 'dedupe-consumer')}"
        self._consumer_conf = conf
        producer = kafka.connection().config("producer", {"linger.ms": 5})
        producer.update(kafka.producer)
        producer["transactional.id"] = transactional_id
        producer.update(DURABLE_PRODUCER)
        self._producer_conf = producer

    def stop(self) -> None:
        """Finish the transaction in progress, then leave the group (see :meth:`run`)."""
        self._stop_requested.set()

    def raise_error(self) -> None:
        """Raise what stopped the hop, if anything did."""
        if self.error is not None:
            raise RepartitionError(f"the topic-scope hop stopped: {self.error}") from self.error

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # told to the consuming thread (raise_error)
            log.exception("repartition_failed")
            self.error = exc

    def _run(self) -> None:
        producer = Producer({**self._producer_conf, **kafka_log_config()})
        deadline = time.monotonic() + 300
        while True:  # fences (and aborts the open transaction of) an earlier instance
            try:
                producer.init_transactions(_TIMEOUT_S)
                break
            except KafkaException as exc:
                if exc.args[0].fatal() or time.monotonic() > deadline:
                    raise
                log.warning("repartition_waiting_for_broker", error=str(exc))
                if self._stop_requested.wait(1.0):
                    return
        consumer = Consumer({**self._consumer_conf, **kafka_log_config()})
        try:
            consumer.subscribe(list(self._targets))
            processing = self.settings.processing
            timeout_s = processing.poll_timeout.total_seconds()
            while not self._stop_requested.is_set():
                messages = consumer.consume(processing.batch_size, timeout_s)
                good = [m for m in messages if self._usable(m)]
                if good:
                    self._move(consumer, producer, good)
        finally:
            consumer.close()

    def _usable(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return True
        # e.g. a fenced static member: this consumer cannot go on (the message carries
        # _FATAL, its error is not flagged fatal itself)
        if error.fatal() or error.code() == KafkaError._FATAL:
            raise RepartitionError(
                f"the topic-scope hop's consumer failed fatally ({error.name()}: {error.str()})"
            )
        log.warning("repartition_consume_error", **kafka_error_fields(KafkaException(error)))
        return False

    def _move(self, consumer: Consumer, producer: Producer, messages: Sequence[Message]) -> None:
        """One transaction: the messages to their by-id partitions, and their offsets."""
        firsts: dict[tuple[str, int], int] = {}
        nexts: dict[tuple[str, int], int] = {}
        counts: dict[str, int] = {}
        producer.begin_transaction()
        try:
            for message in messages:
                topic, partition = message.topic() or "", message.partition() or 0
                offset = message.offset() or 0
                firsts.setdefault((topic, partition), offset)
                nexts[(topic, partition)] = offset + 1
                counts[topic] = counts.get(topic, 0) + 1
                self._produce(producer, message, topic)
            offsets = [KafkaTopicPartition(t, p, o) for (t, p), o in nexts.items()]
            producer.send_offsets_to_transaction(
                offsets, consumer.consumer_group_metadata(), _TIMEOUT_S
            )
            self._commit(producer)
        except KafkaException as exc:
            self._abort(producer, exc)
            self._failed_in_a_row += 1
            if self._failed_in_a_row >= _MAX_FAILURES_IN_A_ROW:
                # The same batch, again and again (a message the by-id topic refuses, a
                # permission): stop loudly rather than hold every partition behind it.
                fields = kafka_error_fields(exc)
                raise RepartitionError(
                    f"the topic-scope hop failed {self._failed_in_a_row} times in a row on "
                    f"the batch starting at {_where(firsts)}: {fields['error_code']}: "
                    f"{fields['error']}. Nothing of it was moved or committed. A message "
                    "larger than the by-id topic's max.message.bytes (or the producer's "
                    "message.max.bytes, [kafka.producer]) needs both raised; see "
                    "docs/scope.md"
                ) from exc
            for (topic, partition), first in firsts.items():  # read them again
                # revoked meanwhile: its next owner reads it from the commit
                with contextlib.suppress(KafkaException):
                    consumer.seek(KafkaTopicPartition(topic, partition, first))
            # A broker restarting answers again soon: back off 1, 2, 4, 8 s before giving up.
            self._stop_requested.wait(2 ** (self._failed_in_a_row - 1))
            return
        self._failed_in_a_row = 0
        for topic, n in counts.items():
            self.metrics.repartitioned.labels(topic).inc(n)

    def _produce(self, producer: Producer, message: SourceMessage, topic: str) -> None:
        to = by_id_partition(
            self._extract, self.settings.dedupe.on_missing_id, message, self.partitions[topic]
        )
        headers: list[tuple[str, str | bytes | None]] = [
            *header_pairs(message),
            origin_header(message),
        ]
        produce_waiting(
            producer,
            self._targets[topic],
            value=message.value(),
            key=message.key(),
            partition=to,
            headers=headers,
        )

    def _commit(self, producer: Producer) -> None:
        for attempt in range(3):
            try:
                producer.commit_transaction(_TIMEOUT_S)
                return
            except KafkaException as exc:
                error = exc.args[0]
                if not error.retriable() or attempt == 2:
                    raise

    def _abort(self, producer: Producer, exc: KafkaException) -> None:
        error = exc.args[0]
        if error.fatal():
            raise RepartitionError(
                f"the topic-scope hop's producer failed fatally ({error.name()}: {error.str()}); "
                f"another instance may use transactional.id {self.transactional_id!r} (a "
                "copied store directory)"
            ) from exc
        self.metrics.repartition_aborts.inc()
        log.warning(
            "repartition_aborted",
            **kafka_error_fields(exc),
            consequence="the batch is read and moved again (nothing of it is visible)",
        )
        producer.abort_transaction(_TIMEOUT_S)


class HoppedSource:
    """The dedupe stage's Kafka source, with the hop that feeds it running alongside."""

    def __init__(self, source: Source, hop: Repartitioner) -> None:
        self._source = source
        self._hop = hop

    def poll(self, max_messages: int, timeout_s: float) -> Sequence[SourceMessage]:
        self._hop.raise_error()
        if not self._hop.is_alive():
            raise RepartitionError("the topic-scope hop is not running")
        return self._source.poll(max_messages, timeout_s)

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._source.commit(offsets)

    def seek(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._source.seek(offsets)

    def keep_alive(self) -> None:
        self._source.keep_alive()

    def close(self) -> None:
        self._hop.stop()
        try:
            self._hop.join(_TIMEOUT_S + 5)
        finally:
            self._source.close()
