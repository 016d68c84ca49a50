"""The world fails, not the consumer: the broker goes away, the disk turns read-only."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from dedupe_consumer.config import KafkaConnection
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import RocksStore
from dedupe_consumer.testing import LocalKafka

from ..kafka_helpers import committed_offsets, end_offsets, produce_events, wait_for
from .consumer_process import effects_of, log_tail, start_consumer, stop_consumer, write_config

pytestmark = pytest.mark.kafka


@pytest.fixture
def own_broker() -> Iterator[LocalKafka]:
    """A broker of this test's own, since the test stops it."""
    with LocalKafka() as broker:
        yield broker


def create_topic(bootstrap: str, name: str, partitions: int) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap})  # must outlive the future
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(timeout=60)
    return name


def test_broker_stopped_and_restarted_mid_run_loses_nothing(
    own_broker: LocalKafka, tmp_path: Path
) -> None:
    bootstrap = own_broker.bootstrap_servers
    topic = create_topic(bootstrap, "outage", 2)
    ids: list[str] = []
    sent = produce_events(bootstrap, topic, 3000, duplicates=0.1, seed=31, ids=ids)
    config, effects = write_config(tmp_path, bootstrap, topic), tmp_path / "effects"
    proc = start_consumer(config, effects)
    try:
        wait_for(lambda: sum(effects_of(effects).values()) > 300, 60, "progress")
        own_broker.stop_process(graceful=False)  # the broker machine dies
        time.sleep(6)
        assert proc.poll() is None, "the consumer must ride out the outage, not exit"
        own_broker.start_process()
        sent += produce_events(bootstrap, topic, 1000, duplicates=0.1, seed=32, ids=ids)
        wait_for(lambda: set(effects_of(effects)) >= set(sent), 120, "every ID to take effect")
        wait_for(
            lambda: (
                committed_offsets(bootstrap, f"{topic}-group", topic, 2)
                == end_offsets(bootstrap, topic, 2)
            ),
            90,
            "offsets committed to the end",
        )
    finally:
        stop_consumer(proc)
    assert proc.returncode == 0, log_tail(config)
    calls = effects_of(effects)
    assert set(calls) == set(sent)
    assert [i for i, n in calls.items() if n > 1] == []  # no crash: no repeated call


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem of its own for the store (tmpfs), so we can fill it up."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs and needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem says ENOSPC: from now on nothing can be written."""
    filler = directory / "filler"
    chunk = b"\0" * (1 << 20)
    with filler.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError:
            pass
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_store_that_cannot_be_written_stops_with_a_clear_error_and_commits_nothing_unpersisted(
    kafka_bootstrap: str, kafka_topic: object, tmp_path: Path, small_disk: Path
) -> None:
    assert callable(kafka_topic)
    topic = kafka_topic(partitions=2)
    produce_events(kafka_bootstrap, topic, 20000, duplicates=0.1, seed=33)
    config = write_config(tmp_path, kafka_bootstrap, topic, store=small_disk / "s")
    effects = tmp_path / "effects"  # not on the small disk
    proc = start_consumer(config, effects)
    try:
        wait_for(lambda: sum(effects_of(effects).values()) > 200, 60, "progress")
        filler = fill(small_disk)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    stderr = log_tail(config, 20_000)
    assert code == 1, stderr[-3000:]
    assert "cannot write to store" in stderr, stderr[-3000:]
    assert "No space left on device" in stderr, stderr[-3000:]

    filler.unlink()
    # The offsets commit inside the changelog transaction, which precedes the local
    # write: what was committed must be durable there, and the next assignment's
    # restore (from the store's changelog position) brings it back into the store.
    store = RocksStore(small_disk / "s", retention_ms=10**12)
    changelog = Changelog(
        KafkaConnection(bootstrap_servers=kafka_bootstrap),
        f"{topic}-group",
        timedelta(days=7),
        f"check-{topic}",
    )
    try:
        for p in range(2):
            changelog.restore(TopicPartition(topic, p), store)
        watermarks = {p: store.watermark(TopicPartition(topic, p)) for p in range(2)}
    finally:
        store.close()
        changelog.close()
    committed = committed_offsets(kafka_bootstrap, f"{topic}-group", topic, 2)
    for p in range(2):
        wm = watermarks[p]
        durable = -1 if wm is None else wm
        assert committed[p] <= durable + 1, (p, committed, watermarks)
    assert any(c > 0 for c in committed.values()), "progress was committed before the failure"
    assert sum(effects_of(effects).values()) < 20000, "it should have stopped mid-stream"
