"""The read-ahead of ``KafkaSource.keep_alive`` stays bounded across a rebalance.

Past one batch read ahead, keep_alive pauses the assignment. A rebalance served
inside a later keep_alive resumes what it assigns (``_on_assign``: librdkafka keeps
pauses across an assignment), so keep_alive must pause again at every call, or the
rest of the walk reads ahead without bound (found by review: 50,000 messages kept
for a bound of 10). A fake consumer: an endless backlog on every unpaused partition.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from confluent_kafka import TopicPartition as KafkaTopicPartition

from dedupe_consumer.kafka.source import KafkaSource
from dedupe_consumer.observability import Metrics

from ..kafka_helpers import NullListener


class _Message:
    def __init__(self, partition: int, offset: int) -> None:
        self._partition, self._offset = partition, offset

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def error(self) -> None:
        return None

    def __len__(self) -> int:
        return 10


class _Consumer:
    def __init__(self, partitions: list[int]) -> None:
        self.assigned = set(partitions)
        self.paused: set[int] = set()
        self.position = dict.fromkeys(partitions, 0)
        self.before_next_consume: Callable[[], None] | None = None

    def assignment(self) -> list[KafkaTopicPartition]:
        return [KafkaTopicPartition("t", p) for p in sorted(self.assigned)]

    def pause(self, tps: list[KafkaTopicPartition]) -> None:
        self.paused |= {t.partition for t in tps}

    def resume(self, tps: list[KafkaTopicPartition]) -> None:
        self.paused -= {t.partition for t in tps}

    def assign(self, tps: list[KafkaTopicPartition]) -> None:
        self.assigned = {t.partition for t in tps}

    def commit(self, **_: Any) -> None:
        pass

    def consumer_group_metadata(self) -> object:
        return object()

    def consume(self, num_messages: int, timeout: float) -> list[_Message]:
        if self.before_next_consume is not None:  # a rebalance, served in consume()
            callback, self.before_next_consume = self.before_next_consume, None
            callback()
        out: list[_Message] = []
        for p in sorted(self.assigned - self.paused):
            while len(out) < num_messages:
                out.append(_Message(p, self.position[p]))
                self.position[p] += 1
        return out


def _source(consumer: _Consumer, batch_size: int) -> KafkaSource:
    source = object.__new__(KafkaSource)  # no broker: only what keep_alive and the
    source.settings = SimpleNamespace(processing=SimpleNamespace(batch_size=batch_size))  # type: ignore[assignment]
    source.listener = NullListener()  # rebalance callbacks touch
    source.metrics = Metrics()
    source.uncommitted = {}
    source._uncommitted_lock = threading.Lock()
    source._kept, source._kept_bytes, source._paused = [], 0, False
    source._restoring, source._restorer, source._unplaced = {}, None, {}
    source._parked, source._owned, source._stale = {}, set(), {}
    source._closing = False
    source._consumer = consumer  # type: ignore[assignment]
    source.cooperative = False
    source._recommit = False
    source._failed = None
    source._denied = None
    source._partition_logs = lambda partitions: {}  # type: ignore[method-assign]
    source._lag_at = float("inf")  # dedupe_consumer_lag is not measured here
    return source


def test_read_ahead_stays_bounded_after_a_rebalance_during_the_walk() -> None:
    consumer = _Consumer([0, 1])
    source = _source(consumer, batch_size=10)
    source.keep_alive()  # one batch ahead, then paused
    assert source._paused and consumer.paused == {0, 1}

    def eager_rebalance() -> None:  # another member joins: revoke all, assign all again
        parts = consumer.assignment()
        source._on_revoke(consumer, parts)  # type: ignore[arg-type]
        consumer.assigned = set()
        source._on_assign(consumer, [KafkaTopicPartition("t", p.partition) for p in parts])  # type: ignore[arg-type]

    consumer.before_next_consume = eager_rebalance
    for _ in range(50):  # a 10 s walk: keep_alive every 0.2 s
        source.keep_alive()
    assert len(source._kept) <= 10 + 1000  # one batch, and one consume after a rebalance
    assert consumer.paused == {0, 1}
    # The next poll resumes and serves what was kept, in order, once.
    offsets = [m.offset() or 0 for m in source.poll(10, 0)]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
