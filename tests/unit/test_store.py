from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import IdRecord, RecordStatus, RocksStore, WriteSet

TP = TopicPartition("t", 3)
NOW = 1_800_000_000_000


def decision(offset: int) -> IdRecord:
    return IdRecord(RecordStatus.HANDLED, offset, NOW, b"\x00" * 8)


def test_directory_is_private(tmp_path: Path) -> None:
    store = RocksStore(tmp_path / "s", retention_ms=1000)
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700
    finally:
        store.close()


def test_second_process_fails_fast_with_clear_message(tmp_path: Path) -> None:
    store = RocksStore(tmp_path / "s", retention_ms=1000)
    try:
        code = (
            "import sys\n"
            "from dedupe_consumer.store import RocksStore\n"
            "RocksStore(sys.argv[1], retention_ms=1000)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "s")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode != 0
        assert "StoreLockedError" in proc.stderr
        assert "give each consumer instance its own store.path" in proc.stderr
    finally:
        store.close()


def test_records_and_watermark_survive_reopen_with_families(tmp_path: Path) -> None:
    store = RocksStore(tmp_path / "s", retention_ms=10**9)
    store.persist(WriteSet({TP: [("a", decision(7)), ("b", decision(8))]}, watermarks={TP: 8}))
    store.close()
    store = RocksStore(tmp_path / "s", retention_ms=10**9)
    try:
        assert store.watermark(TP) == 8
        assert store.watermark(TopicPartition("t", 4)) is None
        found = store.lookup(TP, ["b", "zz", "a"], NOW)
        assert [d.offset if d else None for d in found] == [8, None, 7]
        assert "p:t:3" in store._db.list_cf(str(tmp_path / "s"))
    finally:
        store.close()


def test_sweep_is_bounded_per_call_and_wraps(tmp_path: Path) -> None:
    store = RocksStore(tmp_path / "s", retention_ms=1000)
    try:
        store.persist(
            WriteSet({TP: [(f"id{i:04d}", decision(i)) for i in range(300)]}, watermarks={TP: 299})
        )
        later = NOW + 5000
        assert store.sweep_expired(later, {TP: 100}) == 100
        assert store.sweep_expired(later, {TP: 100}) == 100
        assert store.sweep_expired(later, {TP: 500}) == 100
        assert store.sweep_expired(later, {TP: 500}) == 0
        assert store.watermark(TP) == 299  # watermarks never expire
    finally:
        store.close()


def test_decision_codec_round_trip() -> None:
    d = IdRecord(RecordStatus.DEAD_LETTERED, 2**40, NOW, b"abcdefgh")
    assert len(d.encode()) == 25
    assert IdRecord.decode(d.encode()) == d


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = Path("/proc/dedupe-store")  # even root cannot create it
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = tmp_path / "ro" / "s"
    with pytest.raises(Exception, match="cannot create store directory"):
        RocksStore(target, retention_ms=1000)


def test_effects_and_released_claims_in_one_write(tmp_path: Path) -> None:
    store = RocksStore(tmp_path / "s", retention_ms=10**9)
    try:
        claim = IdRecord(RecordStatus.IN_PROGRESS, 1, NOW, b"\x00" * 8)
        store.persist(WriteSet({TP: [("a", claim), ("b", claim)]}))
        store.persist(
            WriteSet(
                {TP: [("a", decision(1))]},
                released={TP: ["b"]},
                effects={TP: [(b"ledger:a", b"100"), (b"gone", None)]},
                watermarks={TP: 1},
            )
        )
        a, b = store.lookup(TP, ["a", "b"], NOW)
        assert a is not None and a.status is RecordStatus.HANDLED
        assert b is None
        assert store.effect(TP, b"ledger:a") == b"100"
        assert list(store.effects(TP)) == [(b"ledger:a", b"100")]
    finally:
        store.close()
