"""``dedupe-consumer analyze``: duplicate traffic measured, a retention recommended."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from typer.testing import CliRunner

from dedupe_consumer.analysis import analyze, recommend
from dedupe_consumer.cli import app
from dedupe_consumer.ids import parse_id_source
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.replay import Record
from dedupe_consumer.store import IdRecord, RecordStatus, RocksStore, WriteSet

from .test_replay import line, write_recording

T0 = 1_700_000_000_000


def at(offset: int, event_id: str | None, ms: int, value: bytes = b"{}") -> Record:
    headers: list[tuple[str, str | bytes | None]] = (
        [] if event_id is None else [("event-id", event_id.encode())]
    )
    return Record("payments", 0, offset, None, value, headers, T0 + ms)


def test_repeats_conflicts_and_gaps_are_measured() -> None:
    result = analyze(
        [
            at(0, "a", 0),
            at(1, "b", 1_000),
            at(2, "a", 3_600_000),  # a repeat an hour later
            at(3, "b", 7_200_000, b'{"other": 1}'),  # same ID, another payload
            at(4, None, 7_200_000),
        ],
        parse_id_source("header:event-id"),
    )
    assert (result.messages, result.unique_ids, result.without_id) == (5, 2, 1)
    assert (result.duplicates, result.conflicts) == (1, 1)
    assert result.gaps_s == [3600.0, 7199.0]
    assert result.percentile(0.5) == 3600.0 and result.percentile(1.0) == 7199.0
    assert result.missed_by(3600) == 1 and result.missed_by(7200) == 0
    advice = recommend(result)
    assert advice.retention_s == 3 * 3600  # 1.5 x 7199 s, up to a whole hour
    assert advice.bytes_per_id == 25 + 1  # record + a one-byte ID
    assert advice.store_bytes is not None
    assert abs(advice.store_bytes - 2 / 7200 * 3 * 3600 * 26) < 1e-6


def test_the_bytes_per_id_are_what_the_store_takes_on_disk(tmp_path: Path) -> None:
    """The recommendation's estimate against a real store: 20,000 UUID IDs, flushed."""
    store = RocksStore(tmp_path / "s", retention_ms=10**12)
    tp = TopicPartition("t", 0)
    ids = [str(uuid.uuid4()) for _ in range(20_000)]
    now = int(time.time() * 1000)
    try:
        for start in range(0, len(ids), 5_000):
            chunk = ids[start : start + 5_000]
            records = [
                (x, IdRecord(RecordStatus.HANDLED, start + n, now, os.urandom(8)))
                for n, x in enumerate(chunk)
            ]
            store.persist(WriteSet(records={tp: records}))
        family = store._family(tp)
        family.flush(True)
        on_disk = (family.property_int_value("rocksdb.total-sst-files-size") or 0) / len(ids)
    finally:
        store.close()
    estimate = recommend(
        analyze([at(n, x, n) for n, x in enumerate(ids)], parse_id_source("header:event-id"))
    ).bytes_per_id
    assert 0.75 * on_disk <= estimate <= 1.25 * on_disk, (estimate, on_disk)


def test_the_command_reports_a_recording(tmp_path: Path) -> None:
    lines = [line(0, n, f"id-{n % 3}") for n in range(6)]  # 3 IDs, each twice
    path = write_recording(tmp_path / "r.jsonl", lines, 1)
    shown = CliRunner().invoke(app, ["analyze", str(path), "--retention", "1h"])
    assert shown.exit_code == 0, shown.output
    assert "messages: 6" in shown.output and "unique IDs: 3" in shown.output
    assert "duplicates (same ID, same payload): 3 (50.00%)" in shown.output
    assert (
        'with retention 60.0 min and dedupe.scope "partition": 0 of 3 repeats would be '
        "handled again (0 after their ID expired, 0 more on another partition" in shown.output
    )
    assert "recommended dedupe.retention: 60.0 min" in shown.output
    assert "an unknown size (the messages span under a minute" in shown.output
    wrong = CliRunner().invoke(app, ["analyze"])
    assert wrong.exit_code == 2
    bad = CliRunner().invoke(app, ["analyze", str(path), "--id-source", "nonsense"])
    assert bad.exit_code == 2
