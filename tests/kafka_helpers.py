"""Helpers shared by the integration and fault tests (real broker)."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from dedupe_consumer import DedupeConsumer, Settings, models
from dedupe_consumer.contracts import PartitionLog
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.models import SourceMessage, header_pairs
from dedupe_consumer.store.changelog_codec import changelog_topic


def produce_events(
    bootstrap: str,
    topic: str,
    count: int,
    duplicates: float = 0.1,
    seed: int = 1,
    ids: list[str] | None = None,
) -> list[str]:
    """Produce ``count`` events keyed and headed by event ID; returns the ID of each event."""
    rng = random.Random(seed)
    known = ids if ids is not None else []
    sent: list[str] = []
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for _ in range(count):
        if known and rng.random() < duplicates:
            event_id = rng.choice(known)
        else:
            event_id = str(uuid.UUID(int=rng.getrandbits(128)))
            known.append(event_id)
        sent.append(event_id)
        producer.produce(
            topic,
            key=event_id.encode(),
            value=json.dumps({"id": event_id, "amount_cents": len(event_id)}).encode(),
            headers=[("event-id", event_id.encode())],
        )
        producer.poll(0)
    assert producer.flush(30) == 0
    return sent


def produce_raw(bootstrap: str, topic: str, items: list[dict[str, Any]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for item in items:
        producer.produce(topic, **item)
    assert producer.flush(30) == 0


CLASSIC_ONLY = ("session.timeout.ms", "heartbeat.interval.ms", "partition.assignment.strategy")
"""Client-side group settings the consumer group protocol (KIP-848) does not take."""


def settings_for(
    bootstrap: str, topic: str, store: Path, group: str | None = None, **sections: dict[str, Any]
) -> Settings:
    values: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": group or f"g-{topic}",
            "topics": [topic],
            "consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
        },
        "store": {"path": str(store)},
        "processing": {
            "dead_letter_topic": f"{topic}.dlq",
            "poll_timeout": "200ms",
            "retry_backoff": "10ms",
            "retry_backoff_max": "50ms",
        },
    }
    for name, section in sections.items():
        merged = {**values.get(name, {}), **section}
        if name == "kafka" and "consumer" in section:
            merged["consumer"] = {**values["kafka"]["consumer"], **section["consumer"]}
            if merged["consumer"].get("group.protocol") == "consumer":
                # KIP-848: the broker owns session and heartbeat timing.
                for key in CLASSIC_ONLY:
                    merged["consumer"].pop(key, None)
        values[name] = merged
    return Settings.load(**values)


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        for attempt in range(20):  # the group coordinator may be moving or loading
            try:
                found = consumer.committed(
                    [TopicPartition(topic, p) for p in range(partitions)], timeout=30
                )
                return {tp.partition: tp.offset for tp in found}
            except KafkaException:
                if attempt == 19:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")
    finally:
        consumer.close()


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "end-offsets"})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            for p in range(partitions)
        }
    finally:
        consumer.close()


def read_all(bootstrap: str, topic: str, expect: int, timeout_s: float = 30) -> list[Message]:
    """Read ``expect`` messages from the start of ``topic`` (dead-letter inspection)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for m in consumer.consume(100, 0.5):
                if m.error() is None:
                    out.append(m)
        return out
    finally:
        consumer.close()


def headers_of(message: SourceMessage) -> dict[str, bytes]:
    """Headers as a dict (last one wins), ``None`` values as empty bytes."""
    return {k: v or b"" for k, v in header_pairs(message)}


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


def hung_changelog_transaction(
    bootstrap: str,
    group: str,
    topic: str,
    *partitions: int,
    offsets: Mapping[int, int] | None = None,
) -> Producer:
    """A previous owner of ``topic`` in ``group`` hung inside its transaction, which is
    left open: end it with the returned producer's ``abort_transaction``.

    The transaction holds a changelog record on each of ``partitions`` (the changelog
    topic is made first, as the library makes it: compacted, as many partitions as
    ``topic``) and ``offsets`` (partition -> source offset) sent to the group: until it
    ends, the group's committed offsets of those partitions are unstable (KIP-447).
    """
    if partitions:
        settings = settings_for(bootstrap, topic, Path("/nonexistent"), group=group)
        changelog = Changelog(
            settings.kafka.connection(), group, timedelta(days=1), f"setup-{uuid.uuid4()}"
        )
        try:
            changelog.ensure_topics([topic])
        finally:
            changelog.close()
    hung = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"hung-{uuid.uuid4()}"})
    hung.init_transactions(30)
    hung.begin_transaction()
    for partition in partitions:
        hung.produce(
            changelog_topic(group, topic), key=b"\x00junk", value=b"x", partition=partition
        )
    assert hung.flush(30) == 0
    if offsets:
        member = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        try:  # the group is empty: a commit without a generation is taken
            hung.send_offsets_to_transaction(
                [TopicPartition(topic, p, offset) for p, offset in offsets.items()],
                member.consumer_group_metadata(),
                30,
            )
        finally:
            member.close()
    return hung


class ConsumerThread:
    """``consumer.run()`` on a daemon thread, without signal handlers (``start()``).

    An exception ``run`` raises is kept in :attr:`failure` (and raised on, so pytest
    still reports the thread's exception).
    """

    def __init__(self, consumer: DedupeConsumer) -> None:
        self.consumer = consumer
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.consumer.run(install_signal_handlers=False)
        except BaseException as exc:
            self.failure.append(exc)
            raise

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout_s: float = 60) -> None:
        self.thread.join(timeout_s)

    def is_alive(self) -> bool:
        return self.thread.is_alive()


@contextlib.contextmanager
def running_consumer(consumer: DedupeConsumer) -> Iterator[ConsumerThread]:
    """``consumer`` running on a :class:`ConsumerThread` for the block; on leaving it,
    ``stop()`` and up to 60 s for ``run`` to return (``is_alive()`` says whether it did)."""
    running = ConsumerThread(consumer)
    running.start()
    try:
        yield running
    finally:
        consumer.stop()
        running.join(60)


class NullListener:
    """An assignment listener that owns nothing: no state to restore, no offsets to
    resume from, nothing to settle. Subclass it to watch one callback."""

    def prepare(self, tps: Sequence[models.TopicPartition]) -> Sequence[models.TopicPartition]:
        return []

    def restore(self, tp: models.TopicPartition, stopping: Callable[[], bool]) -> int:
        return 0

    def on_restore_cancelled(self, tps: Sequence[models.TopicPartition]) -> None:
        return None

    def on_assigned(
        self,
        tps: Sequence[models.TopicPartition],
        logs: Mapping[models.TopicPartition, PartitionLog] | None = None,
        restored: Mapping[models.TopicPartition, int] | None = None,
    ) -> Mapping[models.TopicPartition, int | None]:
        return {}

    def on_revoked(
        self, tps: Sequence[models.TopicPartition]
    ) -> Mapping[models.TopicPartition, int]:
        return {}

    def on_lost(self, tps: Sequence[models.TopicPartition]) -> None:
        return None
