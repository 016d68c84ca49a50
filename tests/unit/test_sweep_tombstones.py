"""Expired IDs leave through the persist path, so the changelog gets them as tombstones."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from structlog.testing import capture_logs

from dedupe_consumer.engine import Engine
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import RocksStore

from .changelog_rig import RecordingChangelog, changelog_engine
from .conftest import TOPIC, Clock, Recorder, rec

TP0 = TopicPartition(TOPIC, 0)


def engine(tmp_path: Path, changelog: Changelog | None) -> tuple[Engine, RocksStore, Clock]:
    clock = Clock()
    e, store = changelog_engine(
        tmp_path,
        Recorder(),
        changelog,
        retention_ms=3_600_000,
        clock=clock,
        dedupe={"retention": "1h"},
        store={"sweep_keys": 1000},
    )
    return e, store, clock


def test_a_batch_write_carries_the_expired_ids_as_deletions(tmp_path: Path) -> None:
    changelog = RecordingChangelog()
    e, store, clock = engine(tmp_path, changelog)
    try:
        e.process([rec(i, f"old{i}") for i in range(10)])
        clock.now += timedelta(hours=2).total_seconds()
        # "old3" comes again: it is expired, so it is new; its fresh record must survive.
        e.process([rec(10, "new"), rec(11, "old3")])
        last = changelog.writes[-1]
        assert sorted(last.released[TP0]) == sorted(f"old{i}" for i in range(10) if i != 3)
        assert [i for i, _ in last.records[TP0]] == ["new", "old3"]
        assert last.watermarks == {TP0: 11}
        assert changelog.offsets[-1] == {TP0: 12}  # the transaction commits the offsets
        found = store.lookup(TP0, [f"old{i}" for i in range(10)], 0)
        assert [d is not None for d in found] == [i == 3 for i in range(10)]  # deleted locally
    finally:
        store.close()


def test_idle_writes_tombstones_only_when_some_ids_expired(tmp_path: Path) -> None:
    changelog = RecordingChangelog()
    e, store, clock = engine(tmp_path, changelog)
    try:
        e.process([rec(i, f"id{i}") for i in range(5)])
        writes = len(changelog.writes)
        e.idle()
        assert len(changelog.writes) == writes  # nothing expired: no transaction
        clock.now += timedelta(hours=2).total_seconds()
        e.idle()
        [sweep] = changelog.writes[writes:]
        assert sorted(sweep.released[TP0]) == [f"id{i}" for i in range(5)]
        assert not sweep.records and not sweep.watermarks
        assert changelog.offsets[-1] == {TP0: 5}  # re-commits a safe offset: fenced if stale
        assert store.lookup(TP0, [f"id{i}" for i in range(5)], 0) == [None] * 5
        e.idle()
        assert len(changelog.writes) == writes + 1
    finally:
        store.close()


def test_without_a_changelog_the_sweep_deletes_through_the_synced_persist(
    tmp_path: Path,
) -> None:
    e, store, clock = engine(tmp_path, None)
    try:
        e.process([rec(i, f"id{i}") for i in range(5)])
        clock.now += timedelta(hours=2).total_seconds()
        e.idle()
        assert store.lookup(TP0, [f"id{i}" for i in range(5)], 0) == [None] * 5
    finally:
        store.close()


def test_a_changed_retention_is_logged_once_and_applies_at_once(tmp_path: Path) -> None:
    RocksStore(tmp_path / "s", retention_ms=7 * 86_400_000).close()
    with capture_logs() as logs:
        store = RocksStore(tmp_path / "s", retention_ms=86_400_000)
        store.close()
        RocksStore(tmp_path / "s", retention_ms=86_400_000).close()
    changed = [e for e in logs if e["event"] == "retention_changed"]
    assert len(changed) == 1
    assert (changed[0]["old_retention_ms"], changed[0]["new_retention_ms"]) == (
        7 * 86_400_000,
        86_400_000,
    )


def test_an_idle_partition_is_swept_under_another_partitions_safe_offset(
    tmp_path: Path,
) -> None:
    tp1 = TopicPartition(TOPIC, 1)
    first = RecordingChangelog()
    e, store, clock = engine(tmp_path, first)
    e.assign([TP0, tp1])
    e.process([rec(i, f"p1-{i}", partition=1) for i in range(3)])
    store.close()

    changelog = RecordingChangelog()  # a restart: partition 1 gets no traffic any more
    e, store, clock = engine(tmp_path, changelog)
    try:
        e.assign([TP0, tp1])
        clock.now += timedelta(hours=2).total_seconds()
        e.idle()
        assert changelog.writes == []  # no safe offset known yet: nothing is written
        e.process([rec(0, "p0-0")])
        e.idle()
        sweep = changelog.writes[-1]
        assert sorted(sweep.released[tp1]) == ["p1-0", "p1-1", "p1-2"]
        assert changelog.offsets[-1] == {TP0: 1}  # fenced by partition 0's offset
    finally:
        store.close()
