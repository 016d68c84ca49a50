"""Review of issue 17 (fast restore, --workers): defects found, as failing tests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer as RealConsumer

from dedupe_consumer.config import KafkaSettings
from dedupe_consumer.errors import StoreError
from dedupe_consumer.kafka import changelog as changelog_module
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import IdRecord, RocksStore
from dedupe_consumer.store.base import RecordStatus
from dedupe_consumer.store.changelog_codec import RestoredState


class _Built(Exception):
    """The restore consumer was created: its configuration is valid."""


def _bare_changelog(settings: KafkaSettings) -> Changelog:
    """A Changelog without its producer or admin client (the restore consumer is all we need)."""
    changelog = Changelog.__new__(Changelog)
    changelog.connection = settings.connection()
    changelog.group_id = settings.group_id
    changelog.timeout_s = 1.0
    changelog._topics = {}
    changelog._sources = {}
    return changelog


def test_restore_consumer_accepts_a_raised_message_max_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user who raised ``message.max.bytes`` above 16 MiB in ``[kafka.consumer]`` (large
    records; it is a global property, so the connection carries it to every client) could
    restore before issue 17. The restore's fixed ``fetch.max.bytes`` = 16 MiB now makes
    librdkafka refuse the restore consumer ("`fetch.max.bytes` must be >= `message.max.bytes`"),
    so every assignment fails."""
    settings = KafkaSettings.model_validate(
        {
            "bootstrap_servers": "127.0.0.1:1",
            "group_id": "g",
            "topics": ["t"],
            "consumer": {"message.max.bytes": 20_000_000},
        }
    )
    changelog = _bare_changelog(settings)

    def consumer(conf: dict[str, Any]) -> RealConsumer:
        real = RealConsumer(conf)  # librdkafka validates the configuration here
        real.close()
        raise _Built

    monkeypatch.setattr(changelog_module, "Consumer", consumer)
    store = RocksStore(tmp_path / "store", retention_ms=10**12)
    try:
        with pytest.raises(_Built):
            changelog.restore(TopicPartition("t", 0), store)
    finally:
        store.close()


def test_a_corrupt_changelog_decision_is_refused_at_restore_not_stored(tmp_path: Path) -> None:
    """Before issue 17 every decision record was decoded at restore: a value this version
    cannot read (another format, a newer version's status or response format, a truncated
    value) stopped the restore with an error. Stored as raw bytes now, it is accepted and
    the store is handed to the engine; the failure comes later, at the lookup of that ID
    when it is redelivered (a crash on that offset, again after each restart), or in the
    retention sweep for a short value."""
    tp = TopicPartition("t", 0)
    position_key = TopicPartition("cl", 0)
    store = RocksStore(tmp_path / "store", retention_ms=10**12)
    now_ms = int(time.time() * 1000)
    good = IdRecord(RecordStatus.HANDLED, 1, now_ms, b"\x01" * 8).encode()
    bad_status = b"\x7f" + good[1:]  # not a RecordStatus
    try:
        pending = RestoredState(tp, position_key)
        pending.decisions.append((b"good", good))
        pending.decisions.append((b"bad", bad_status))  # as Changelog.restore's hot loop does
        with pytest.raises((StoreError, ValueError)):
            pending.apply(store, 2)
        # Had it been accepted, this is what the engine meets on redelivery of "bad":
        store.lookup(tp, ["bad"], now_ms)
    finally:
        store.close()


def test_a_short_changelog_decision_does_not_break_the_retention_sweep(tmp_path: Path) -> None:
    """A truncated decision value (under 17 bytes) stored raw at restore makes every
    retention sweep of that partition raise (``struct.error`` reading decided_at)."""
    tp = TopicPartition("t", 0)
    store = RocksStore(tmp_path / "store", retention_ms=1000)
    try:
        pending = RestoredState(tp, TopicPartition("cl", 0))
        pending.decisions.append((b"short", b"\x01\x00"))
        try:
            pending.apply(store, 1)
        except (StoreError, ValueError):
            return  # refused at restore: fine
        now_ms = int(time.time() * 1000) + 10_000
        store.find_expired(now_ms, {tp: 100})  # must not raise
        store.sweep_expired(now_ms, {tp: 100})
    finally:
        store.close()
