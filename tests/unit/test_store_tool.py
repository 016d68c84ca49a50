"""``dedupe-consumer store``: a real RocksDB store, read while its consumer holds it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rocksdict import Rdict
from typer.testing import CliRunner

from dedupe_consumer.cli import app
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import EPOCH, IdRecord, RecordStatus, Response, RocksStore, WriteSet
from dedupe_consumer.store.reading import NotAStoreError, StoreReader

runner = CliRunner()
TP0, TP1 = TopicPartition("payments", 0), TopicPartition("payments", 1)
HOUR_MS = 3_600_000


@pytest.fixture
def held_store(tmp_path: Path) -> Iterator[Path]:
    """A store with records of every kind, still open (and locked) by its 'consumer'."""
    path = tmp_path / "state"
    store = RocksStore(path, retention_ms=24 * HOUR_MS)
    now = int(time.time() * 1000)
    write = WriteSet(
        records={
            TP0: [
                ("pay-1", IdRecord(RecordStatus.HANDLED, 10, now, b"\x01" * 8)),
                ("pay-2", IdRecord(RecordStatus.DEAD_LETTERED, 11, now, b"\x02" * 8)),
                (
                    "pay-3",
                    IdRecord(
                        RecordStatus.HANDLED, 12, now, b"\x03" * 8, Response(b"ok", "replies", b"k")
                    ),
                ),
                ("old", IdRecord(RecordStatus.HANDLED, 3, now - 48 * HOUR_MS, b"\x04" * 8)),
            ],
            TP1: [("pay-9", IdRecord(RecordStatus.IN_PROGRESS, 7, now, b"\x09" * 8))],
        },
        effects={TP0: [(b"balance:acct-1", b"100")]},
        watermarks={TP0: 12, TP1: 6},
        changelog_positions={TopicPartition("g.payments.dedupe-changelog", 0): 42},
    )
    store.persist(write)
    store.set_epoch(TP0, EPOCH.pack(b"\xab" * 16, 1), reset_watermark=False)
    try:
        yield path
    finally:
        store.close()


def test_the_reader_sees_every_record_while_the_consumer_holds_the_store(
    held_store: Path,
) -> None:
    with StoreReader(held_store) as store:
        assert store.retention_ms == 24 * HOUR_MS
        assert store.partitions() == [TP0, TP1]
        assert store.watermark(TP0) == 12 and store.watermark(TP1) == 6
        assert store.epoch(TP0) == "ab" * 16 + "/1" and store.epoch(TP1) is None
        assert store.changelog_positions() == {"g.payments.dedupe-changelog:0": 42}
        (hit,) = store.lookup("pay-3")
        assert hit.partition == TP0 and hit.record.offset == 12
        assert hit.record.response == Response(b"ok", "replies", b"k")
        assert hit.expires_at_ms == hit.record.decided_at_ms + 24 * HOUR_MS
        assert store.lookup("pay-3", TP1) == [] and store.lookup("nobody") == []
        stats = {s.partition: s for s in store.stats(int(time.time() * 1000))}
    p0 = stats[TP0]
    assert (p0.ids, p0.expired, p0.responses, p0.effects) == (4, 1, 1, 1)
    assert p0.by_status == {"handled": 3, "dead_lettered": 1}
    assert stats[TP1].by_status == {"in_progress": 1}


def test_the_commands_show_stats_lookup_watermarks_and_export(
    held_store: Path, tmp_path: Path
) -> None:
    shown = runner.invoke(app, ["store", "stats", str(held_store)])
    assert shown.exit_code == 0, shown.output
    assert "2 partitions, retention 24 h" in shown.output
    row = next(line.split() for line in shown.output.splitlines() if line.startswith("payments[0]"))
    assert row[1:9] == ["4", "3", "1", "0", "1", "1", "1", row[8]]  # ids ... effects, bytes
    assert row[9] == "12"

    found = runner.invoke(app, ["store", "lookup", str(held_store), "pay-3"])
    assert found.exit_code == 0, found.output
    record = json.loads(found.output)
    assert record["status"] == "handled" and record["offset"] == 12
    assert record["response"] == {"value_base64": "b2s=", "topic": "replies", "key_base64": "aw=="}
    assert record["expired"] is False

    missing = runner.invoke(app, ["store", "lookup", str(held_store), "nobody"])
    assert missing.exit_code == 1
    assert "'nobody' is not in the store (2 partitions searched)" in missing.output

    marks = runner.invoke(app, ["store", "watermarks", str(held_store)])
    assert marks.exit_code == 0, marks.output
    assert "g.payments.dedupe-changelog:0" in marks.output and "42" in marks.output

    out = tmp_path / "export.jsonl"
    exported = runner.invoke(app, ["store", "export", str(held_store), "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["event_id"] for line in lines) == ["old", "pay-1", "pay-2", "pay-3", "pay-9"]
    assert next(line for line in lines if line["event_id"] == "old")["expired"] is True


def test_a_path_that_is_not_a_store_is_a_usage_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["store", "stats", str(empty)])
    assert result.exit_code == 2
    assert "is not a dedupe_consumer store" in result.output
    other = tmp_path / "other-rocksdb"
    Rdict(str(other)).close()  # a RocksDB database, not ours
    result = runner.invoke(app, ["store", "lookup", str(other), "x"])
    assert result.exit_code == 2
    assert "not a dedupe_consumer store" in result.output
    with pytest.raises(NotAStoreError):
        StoreReader(tmp_path / "missing")
