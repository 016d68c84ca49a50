"""The changelog: partition state that travels with the partition.

Each source topic ``T`` of group ``G`` has a compacted topic
``G.T.dedupe-changelog`` with the same partition count. Before a batch's
decisions reach the local store they are produced there (key ``d:<event id>``
= the 25-byte decision or claim, ``e:<key>`` = a staged effect, ``w`` = the
watermark; a ``None`` value deletes) and flushed with acks=all.
Whichever instance is assigned the partition next restores from it before
deciding anything, so a producer retry that lands after a rebalance is still
a duplicate and the new owner resumes at the old owner's watermark even when
the old owner's last commit failed.

Each changelog partition has one writer at a time (the source partition's
owner). The changelog also deletes by time (``retention.ms`` = dedupe
retention + 1 day), so it is bounded like the local store.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import timedelta

import structlog
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewPartitions, NewTopic  # admin re-exports it without __all__

from dedupe_consumer.errors import StoreError
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.observability.kafka_logs import kafka_log_config
from dedupe_consumer.store.base import ProcessedStore, StoredDecision, WriteSet

log = structlog.get_logger("dedupe_consumer.changelog")

_WATERMARK_KEY = b"w"
_DECISION_PREFIX = b"d:"
_EFFECT_PREFIX = b"e:"
_OFFSET = struct.Struct(">q")


def changelog_topic(group_id: str, topic: str) -> str:
    return f"{group_id}.{topic}.dedupe-changelog"


_RESTORE_CHUNK = 100_000
"""Records held in memory during a restore before they are applied to the store."""


class _Restored:
    """Changelog records read but not yet applied, latest value per key."""

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.records: dict[str, StoredDecision | None] = {}
        self.effects: dict[bytes, bytes | None] = {}
        self.watermark: int | None = None

    def __len__(self) -> int:
        return len(self.records) + len(self.effects)

    def add(self, key: bytes, value: bytes | None) -> None:
        """One changelog record; a ``None`` value is a tombstone."""
        if key == _WATERMARK_KEY and value is not None:
            self.watermark = max(self.watermark or -1, _OFFSET.unpack(value)[0])
        elif key.startswith(_DECISION_PREFIX):
            event_id = key[len(_DECISION_PREFIX) :].decode()
            self.records[event_id] = None if value is None else StoredDecision.decode(value)
        elif key.startswith(_EFFECT_PREFIX):
            self.effects[key[len(_EFFECT_PREFIX) :]] = value

    def apply(self, store: ProcessedStore, position: int) -> int:
        """Write what was read, and the changelog position it reaches; then forget it."""
        tp = self.tp
        write = WriteSet(changelog_positions={tp: position})
        local = store.watermark(tp)
        if self.watermark is not None and (local is None or local < self.watermark):
            write.watermarks[tp] = self.watermark
        write.decisions[tp] = [(i, d) for i, d in self.records.items() if d is not None]
        write.released[tp] = [i for i, d in self.records.items() if d is None]
        write.effects[tp] = list(self.effects.items())
        store.persist(write)
        count = len(self)
        self.records, self.effects, self.watermark = {}, {}, None
        return count


class Changelog:
    """Writes each batch's decisions to Kafka and restores a partition's state from it."""

    def __init__(
        self,
        connection: Mapping[str, str | int | float | bool],
        group_id: str,
        retention: timedelta,
        transactional_id: str,
        producer_config: Mapping[str, str | int | float | bool] | None = None,
        timeout_s: float = 30.0,
        startup_timeout_s: float = 300.0,
    ) -> None:
        self.connection = dict(connection)
        self.group_id = group_id
        self.retention = retention
        self.timeout_s = timeout_s
        conf: dict[str, str | int | float | bool] = {**self.connection, "linger.ms": 1}
        conf.update(producer_config or {})
        # One transaction per batch: a crash mid-batch leaves nothing visible. The id is
        # stable per store, so a restarted instance fences and aborts its own leftovers.
        conf["transactional.id"] = transactional_id
        self._producer = Producer({**conf, **kafka_log_config()})
        deadline = time.monotonic() + startup_timeout_s
        while True:  # the broker may not be up yet (a pod starting before Kafka): wait
            try:
                self._producer.init_transactions(timeout_s)
                break
            except KafkaException as exc:
                if exc.args[0].fatal() or time.monotonic() > deadline:
                    raise StoreError(
                        f"cannot start the changelog producer (transactional.id "
                        f"{transactional_id!r}): {exc}; the broker must be reachable and "
                        "support transactions (transaction.state.log.* set for its size), or "
                        "set store.changelog = false for a single-instance consumer"
                    ) from exc
                log.warning("changelog_waiting_for_broker", error=str(exc))
                time.sleep(1.0)
        self._ensured: set[str] = set()
        self._delivered: dict[TopicPartition, tuple[int, int]] = {}
        self._errors: list[str] = []

    # -- topics ----------------------------------------------------------------------------

    def ensure_topics(self, topics: Iterable[str]) -> None:
        """Create missing changelog topics (compacted, time-bounded), one per source topic."""
        todo = [t for t in topics if changelog_topic(self.group_id, t) not in self._ensured]
        if not todo:
            return
        admin = AdminClient({**self.connection, **kafka_log_config()})
        metadata = admin.list_topics(timeout=self.timeout_s)
        missing: dict[str, int] = {}
        grow: dict[str, int] = {}
        for topic in todo:
            source = metadata.topics.get(topic)
            if source is None or source.error is not None:
                raise StoreError(f"source topic {topic!r} is not known to the cluster")
            name = changelog_topic(self.group_id, topic)
            existing = metadata.topics.get(name)
            if existing is None:
                missing[name] = len(source.partitions)
            elif len(existing.partitions) < len(source.partitions):
                grow[name] = len(source.partitions)  # the source topic gained partitions
            else:
                self._ensured.add(name)
        if grow:
            grown = admin.create_partitions(
                [NewPartitions(name, n) for name, n in grow.items()],
                operation_timeout=self.timeout_s,
            )
            for name, future in grown.items():
                try:
                    future.result()
                except KafkaException as exc:
                    raise StoreError(
                        f"cannot add partitions to changelog topic {name!r}: {exc}"
                    ) from exc
                self._ensured.add(name)
        if not missing:
            return
        retention_ms = int((self.retention + timedelta(days=1)).total_seconds() * 1000)
        futures = admin.create_topics(
            [
                NewTopic(
                    name,
                    n,
                    config={"cleanup.policy": "compact,delete", "retention.ms": str(retention_ms)},
                )
                for name, n in missing.items()
            ],
            operation_timeout=self.timeout_s,
        )
        for name, future in futures.items():
            try:
                future.result()
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise StoreError(f"cannot create changelog topic {name!r}: {exc}") from exc
            self._ensured.add(name)

    # -- writing ---------------------------------------------------------------------------

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._errors.append(str(error))
            return
        topic = message.topic() or ""
        source = TopicPartition(
            topic.removeprefix(f"{self.group_id}.").removesuffix(".dedupe-changelog"),
            message.partition() or 0,
        )
        offset = message.offset() or 0
        low, high = self._delivered.get(source, (offset, offset))
        self._delivered[source] = (min(low, offset), max(high, offset))

    def write(self, write: WriteSet) -> dict[TopicPartition, tuple[int, int]]:
        """Produce ``write`` in one transaction; return the (first, last) offset per partition."""
        self._delivered = {}
        self._errors = []
        try:
            self._producer.begin_transaction()
            for tp, items in write.decisions.items():
                for event_id, decision in items:
                    self._send(tp, _DECISION_PREFIX + event_id.encode(), decision.encode())
            for tp, ids in write.released.items():
                for event_id in ids:
                    self._send(tp, _DECISION_PREFIX + event_id.encode(), None)
            for tp, changes in write.effects.items():
                for key, value in changes:
                    self._send(tp, _EFFECT_PREFIX + key, value)
            for tp, offset in write.watermarks.items():
                self._send(tp, _WATERMARK_KEY, _OFFSET.pack(offset))
            self._producer.commit_transaction(self.timeout_s)
        except KafkaException as exc:
            self._abort()
            raise StoreError(
                f"changelog transaction failed: {exc}; the batch is not persisted or committed "
                "and will be redelivered"
            ) from exc
        if self._errors:
            raise StoreError(f"changelog delivery failed: {self._errors[:3]}")
        return dict(self._delivered)

    def _abort(self) -> None:
        try:
            self._producer.abort_transaction(self.timeout_s)
        except KafkaException as exc:
            log.error("changelog_abort_failed", error=str(exc))

    def _send(self, tp: TopicPartition, key: bytes, value: bytes | None) -> None:
        while True:
            try:
                self._producer.produce(
                    changelog_topic(self.group_id, tp.topic),
                    key=key,
                    value=value,
                    partition=tp.partition,
                    on_delivery=self._on_delivery,
                )
                return
            except BufferError:  # local queue full on a huge batch: drain and go on
                self._producer.poll(0.1)

    # -- restoring -------------------------------------------------------------------------

    def restore(self, tp: TopicPartition, store: ProcessedStore, start: int | None) -> int:
        """Apply committed changelog records of ``tp`` from ``start`` to the end.

        Reads with ``isolation.level=read_committed`` up to the partition end that
        librdkafka reports (which is after any transaction marker): a batch whose
        transaction was cut short by a crash is invisible, so a decision is never
        restored without its effects and watermark. Returns the next offset.
        """
        name = changelog_topic(self.group_id, tp.topic)
        consumer = Consumer(
            {
                **self.connection,
                **kafka_log_config(),
                "group.id": f"{self.group_id}.restore.{uuid.uuid4()}",  # never used to commit
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "isolation.level": "read_committed",
            }
        )
        try:
            ktp = KafkaTopicPartition(name, tp.partition)
            low, high = self._offsets(consumer, ktp)
            begin = low if start is None else max(low, start)
            if begin >= high:
                return max(high, start or 0)
            consumer.assign([KafkaTopicPartition(name, tp.partition, begin)])
            pending = _Restored(tp)
            applied = 0
            position = begin
            end: int | None = None
            deadline = time.monotonic() + self.timeout_s
            while end is None:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"changelog restore of {tp} stalled (read from {begin}, end {high}): "
                        "an open transaction of a previous owner may still be pending"
                    )
                for m in consumer.consume(1000, 1.0):
                    error = m.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            end = m.offset() or 0
                        continue
                    deadline = time.monotonic() + self.timeout_s
                    pending.add(m.key() or b"", m.value())
                    position = (m.offset() or 0) + 1
                if len(pending) >= _RESTORE_CHUNK:
                    # Bounded memory: apply what was read so far. Re-reading from the
                    # recorded position after a crash is idempotent.
                    applied += pending.apply(store, position)
            applied += pending.apply(store, end)
            log.info(
                "changelog_restored",
                partition=str(tp),
                records=applied,
                changelog_offsets=(begin, end),
            )
            return end
        finally:
            consumer.close()

    def _offsets(self, consumer: Consumer, ktp: KafkaTopicPartition) -> tuple[int, int]:
        """Low/high offsets, waiting out a fresh topic's leader election."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                low, high = consumer.get_watermark_offsets(ktp, timeout=self.timeout_s)
                return int(low), int(high)
            except KafkaException as exc:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"cannot read changelog offsets of {ktp.topic}[{ktp.partition}]: {exc}"
                    ) from exc
                time.sleep(0.2)

    def close(self) -> None:
        self._producer.flush(self.timeout_s)
