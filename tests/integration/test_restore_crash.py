"""A restore killed half-way (SIGKILL) leaves a store the next restore completes (issue 17).

A restore's chunks are written without a WAL sync (only its last write syncs); each
chunk holds its records and the changelog position after them in one atomic write.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as KafkaTopicPartition

from dedupe_consumer.config import KafkaConnection
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import IdRecord, RocksStore, WriteSet
from dedupe_consumer.store.base import RecordStatus
from dedupe_consumer.testing.pytest_plugin import TopicFactory

pytestmark = pytest.mark.kafka

IDS = 20_000
RELEASED = 10

CHILD = """
import os, signal, sys
from datetime import timedelta
from dedupe_consumer.config import KafkaConnection
from dedupe_consumer.kafka import changelog as module
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import RocksStore

bootstrap, group, topic, path = sys.argv[1:5]
module._RESTORE_CHUNK, module._RESTORE_BATCH = 1000, 500
applied = []
original = RocksStore.apply_restored

def apply_restored(self, tp, decisions, write, *, sync):
    original(self, tp, decisions, write, sync=sync)
    applied.append(sync)
    if len(applied) == 8:  # half-way, right after an unsynced chunk
        assert applied == [False] * 8, applied
        os.kill(os.getpid(), signal.SIGKILL)

RocksStore.apply_restored = apply_restored
changelog = module.Changelog(
    KafkaConnection(bootstrap_servers=bootstrap), group, timedelta(days=7), "crash-" + path
)
store = RocksStore(path, retention_ms=10**12)
changelog.restore(TopicPartition(topic, 0), store)
sys.exit("the restore was not killed half-way")
"""


def changelog_keys_below(bootstrap: str, name: str, position: int) -> list[bytes]:
    """Keys of the committed changelog records below ``position``."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{time.monotonic_ns()}",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    keys: list[bytes] = []
    try:
        consumer.assign([KafkaTopicPartition(name, 0, 0)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for m in consumer.consume(1000, 1.0):
                if m.error() is not None:
                    return keys
                if (m.offset() or 0) >= position:
                    return keys
                keys.append(m.key() or b"")
        raise AssertionError("the changelog was not read to the position in 30 s")
    finally:
        consumer.close()


def test_a_restore_killed_half_way_is_completed_by_the_next(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    group = f"g-{topic}"
    changelog = Changelog(
        KafkaConnection(bootstrap_servers=kafka_bootstrap),
        group,
        timedelta(days=7),
        f"test-{group}-{time.monotonic_ns()}",
    )
    changelog.ensure_topics([topic])
    tp = TopicPartition(topic, 0)
    now_ms = int(time.time() * 1000)
    ids = [f"id-{i:06d}" for i in range(IDS)]
    for first in range(0, IDS, 5000):
        records = [
            (ids[i], IdRecord(RecordStatus.HANDLED, i, now_ms, b"\x02" * 8))
            for i in range(first, first + 5000)
        ]
        changelog.write(WriteSet({tp: records}, watermarks={tp: first + 4999}))
    changelog.write(WriteSet(released={tp: ids[:RELEASED]}))  # tombstones, read last
    name = changelog.topic(topic)
    changelog.close()

    path = tmp_path / "store"
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), kafka_bootstrap, group, topic, str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]

    # What the kill left: a position, and every record below it in the store.
    store = RocksStore(path, retention_ms=10**12)
    try:
        position = store.changelog_position(changelog.position_key(tp))
        assert position is not None and position > 0
        below = [k[2:].decode() for k in changelog_keys_below(kafka_bootstrap, name, position)]
        assert len(below) >= 8 * 1000  # 8 chunks of 1000 records (or a little more)
        found = store.lookup(tp, [i for i in below if i.startswith("id-")], now_ms)
        assert all(r is not None for r in found), "the position ran ahead of its records"

        # The next restore completes it (rebuilding: it cannot tell a crash from another
        # owner's writes past its position), and the result is the whole changelog's.
        again = Changelog(
            KafkaConnection(bootstrap_servers=kafka_bootstrap),
            group,
            timedelta(days=7),
            f"test-{group}-{time.monotonic_ns()}",
        )
        try:
            assert again.restore(tp, store) > 0
        finally:
            again.close()
        assert store.watermark(tp) == IDS - 1
        found = store.lookup(tp, ids, now_ms)
        assert all(r is None for r in found[:RELEASED])  # the tombstones were applied
        assert all(r is not None for r in found[RELEASED:])
        assert found[-1] is not None and found[-1].offset == IDS - 1
    finally:
        store.close()
