"""The Kafka consumer as a source of batches.

The source owns the confluent-kafka ``Consumer`` and translates its rebalance
callbacks into the listener calls the runner understands. Offsets are never
auto-committed or auto-stored: the only commits are the ones the runner asks
for after the engine has persisted the decisions they cover.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import structlog
from confluent_kafka import (
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
)
from confluent_kafka import TopicPartition as KafkaTopicPartition

from dedupe_consumer.config import Settings
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.observability import Metrics
from dedupe_consumer.sources import AssignmentListener

log = structlog.get_logger("dedupe_consumer.kafka")


def _tps(partitions: Sequence[KafkaTopicPartition]) -> list[TopicPartition]:
    return [TopicPartition(p.topic, p.partition) for p in partitions]


class KafkaSource:
    """A subscribed consumer that returns batches and commits on request."""

    def __init__(
        self, settings: Settings, listener: AssignmentListener, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.listener = listener
        self.metrics = metrics or Metrics()
        kafka = settings.kafka
        conf: dict[str, str | int | float | bool] = {
            "bootstrap.servers": kafka.bootstrap_servers,
            "group.id": kafka.group_id,
            "auto.offset.reset": kafka.auto_offset_reset,
            "enable.partition.eof": False,
        }
        conf.update(kafka.consumer)
        conf["enable.auto.commit"] = False
        conf["enable.auto.offset.store"] = False
        strategy = str(conf.get("partition.assignment.strategy", ""))
        self.cooperative = "cooperative" in strategy
        self.max_poll_interval_ms = int(conf.get("max.poll.interval.ms", 300_000))
        self._consumer = Consumer(conf)
        self._consumer.subscribe(
            list(kafka.topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    # -- rebalance callbacks (run inside consume()) --------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        resume = self.listener.on_assigned(_tps(partitions))
        committed: list[KafkaTopicPartition] | None = None
        if any(v is not None for v in resume.values()):
            try:
                committed = consumer.committed(partitions, timeout=30)
            except KafkaException as exc:
                log.warning("committed_offsets_unavailable", error=str(exc))
        for i, p in enumerate(partitions):
            start = resume.get(TopicPartition(p.topic, p.partition))
            done = committed[i].offset if committed is not None else OFFSET_INVALID
            # max(committed, watermark + 1): another instance may have gone further.
            if start is not None and (done < 0 or start > done):
                p.offset = start
            else:
                p.offset = done if done >= 0 else OFFSET_INVALID
        log.info("assigned", partitions={f"{p.topic}[{p.partition}]": p.offset for p in partitions})
        if self.cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        pending = self.listener.on_revoked(_tps(partitions))
        if pending:
            self.commit(pending)
        log.info("revoked", partitions=[f"{p.topic}[{p.partition}]" for p in partitions])

    def _on_lost(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        self.listener.on_lost(_tps(partitions))
        log.warning("partitions_lost", partitions=[f"{p.topic}[{p.partition}]" for p in partitions])

    # -- batches and commits ---------------------------------------------------------------

    def poll(self, max_messages: int, timeout_s: float) -> list[Message]:
        messages = self._consumer.consume(num_messages=max_messages, timeout=timeout_s)
        if not any(m.error() for m in messages):
            return messages
        good: list[Message] = []
        for m in messages:
            error = m.error()
            if error is None:
                good.append(m)
            elif error.code() == KafkaError._MAX_POLL_EXCEEDED:
                self.metrics.poll_interval_exceeded.inc()
                log.error(
                    "max_poll_interval_exceeded",
                    max_poll_interval_ms=self.max_poll_interval_ms,
                    consequence="group membership lost; partitions are re-assigned and resume "
                    "after the durable watermark, so no event is lost or handled twice",
                    fix="lower processing.batch_size or raise max.poll.interval.ms",
                )
            elif error.fatal():
                raise KafkaException(error)
            else:
                log.warning("consumer_error", error=str(error))
        return good

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Synchronous commit; raises KafkaException on failure (the caller retries)."""
        self._consumer.commit(
            offsets=[KafkaTopicPartition(tp.topic, tp.partition, o) for tp, o in offsets.items()],
            asynchronous=False,
        )

    def close(self) -> None:
        self._consumer.close()
