"""Offsets that went back below the watermark: detected at assignment, never skipped silently."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dedupe_consumer import OffsetRegressionError
from dedupe_consumer.contracts import PartitionLog
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import EPOCH, RocksStore
from dedupe_consumer.store.changelog_codec import (
    _ADOPT,
    _EPOCH_KEY,
    _OFFSET,
    _RESET,
    _WATERMARK_KEY,
    RestoredState,
)

from .conftest import TOPIC, Recorder, Rig, rec

TP = TopicPartition(TOPIC, 0)
TOPIC_ID = bytes(range(16))
OTHER_ID = bytes(range(1, 17))


def decide_ten(r: Rig) -> None:
    r.engine.process([rec(i, f"old-{i}") for i in range(10)])
    assert r.engine.store.watermark(TP) == 9


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        (PartitionLog(TOPIC_ID, 0, 10), 10),  # all consumed: the log ends right after
        (PartitionLog(TOPIC_ID, 4, 500), 10),  # more to come; retention moved the start
        (PartitionLog(None, 0, 10), 10),  # no topic IDs known: the log bounds still count
    ],
)
def test_a_log_that_goes_on_from_the_watermark_resumes_after_it(
    rig: Callable[..., Rig], log: PartitionLog, expected: int
) -> None:
    r = rig()
    r.engine.assign([TP], {TP: PartitionLog(TOPIC_ID, 0, 0)})  # first sighting: no alarm
    decide_ten(r)
    assert r.engine.assign([TP], {TP: log}) == {TP: expected}
    assert r.engine.store.epoch(TP) == EPOCH.pack(TOPIC_ID, 0)


@pytest.mark.parametrize(
    ("log", "why"),
    [
        (PartitionLog(TOPIC_ID, 0, 3), "at or below the stored watermark 9"),
        (PartitionLog(TOPIC_ID, 0, 10 - 1), "at or below the stored watermark 9"),
        (PartitionLog(OTHER_ID, 0, 50), "deleted and created again"),
    ],
    ids=["truncated", "truncated-by-one", "recreated"],
)
def test_fail_stops_with_what_happened_and_what_to_do(
    rig: Callable[..., Rig], log: PartitionLog, why: str
) -> None:
    r = rig()
    r.engine.assign([TP], {TP: PartitionLog(TOPIC_ID, 0, 0)})
    decide_ten(r)
    with pytest.raises(OffsetRegressionError) as stopped:
        r.engine.assign([TP], {TP: log})
    message = str(stopped.value)
    assert why in message
    assert f"{TOPIC}[0]" in message
    assert "processing.on_offset_regression = 'reset'" in message
    assert r.engine.store.watermark(TP) == 9  # nothing changed: the operator decides


def test_reset_starts_the_watermark_over_and_keeps_the_ids(rig: Callable[..., Rig]) -> None:
    handler = Recorder()
    r = rig(handler, processing={"on_offset_regression": "reset"})
    r.engine.assign([TP], {TP: PartitionLog(TOPIC_ID, 0, 0)})
    decide_ten(r)
    assert r.engine.assign([TP], {TP: PartitionLog(TOPIC_ID, 0, 3)}) == {TP: 0}
    assert r.engine.store.watermark(TP) is None
    assert r.engine.store.epoch(TP) == EPOCH.pack(TOPIC_ID, 1)  # a new epoch, same topic
    handler.calls.clear()
    result = r.engine.process([rec(0, "new-0"), rec(1, "old-4"), rec(2, "new-1")])
    assert handler.ids == ["new-0", "new-1"]
    assert result.stats.duplicates == 1
    assert r.engine.store.watermark(TP) == 2
    # A restart sees the reset log as the one its watermark covers: no second reset.
    assert r.restart().assign([TP], {TP: PartitionLog(TOPIC_ID, 0, 3)}) == {TP: 3}


def test_a_reset_of_a_truncated_log_never_re_reads_events_older_than_retention(
    rig: Callable[..., Rig],
) -> None:
    """Their IDs may have expired: re-reading them would handle them twice (a review
    found 'reset' re-reading a whole retained log)."""
    handler = Recorder()
    r = rig(handler, processing={"on_offset_regression": "reset"})
    r.engine.assign([TP], {TP: PartitionLog(TOPIC_ID, 0, 0)})
    decide_ten(r)
    # The same topic, truncated to end at 8; only offsets from 6 on are within retention.
    assert r.engine.assign([TP], {TP: PartitionLog(TOPIC_ID, 0, 8, retained_from=6)}) == {TP: 6}
    # A recreated topic (new ID) holds only new events: all of it is read.
    r2 = rig(handler, processing={"on_offset_regression": "reset"})
    r2.engine.assign([TP], {TP: PartitionLog(TOPIC_ID, 0, 0)})
    decide_ten(r2)
    assert r2.engine.assign([TP], {TP: PartitionLog(OTHER_ID, 0, 8, retained_from=6)}) == {TP: 0}


def test_restore_adopts_an_epoch_and_starts_over_only_at_a_reset(tmp_path: Path) -> None:
    store = RocksStore(tmp_path / "s", retention_ms=10**9)
    try:
        old, new = EPOCH.pack(TOPIC_ID, 0), EPOCH.pack(OTHER_ID, 0)
        restored = RestoredState(TP, TP, store.epoch(TP))
        restored.add(_WATERMARK_KEY, _OFFSET.pack(19))  # before epochs were written
        restored.add(_EPOCH_KEY, old + _ADOPT)  # first announced: the watermark stays
        restored.add(_WATERMARK_KEY, _OFFSET.pack(18))
        restored.apply(store, 3)
        assert (store.watermark(TP), store.epoch(TP)) == (19, old)

        restored = RestoredState(TP, TP, store.epoch(TP))  # a later restore, from position 3
        restored.add(_EPOCH_KEY, old + _ADOPT)  # announced again by a restarted owner
        restored.add(_WATERMARK_KEY, _OFFSET.pack(25))
        restored.add(_EPOCH_KEY, new + _RESET)  # the topic was recreated: start over
        restored.add(_WATERMARK_KEY, _OFFSET.pack(-1))  # written with the reset
        restored.apply(store, 6)
        assert (store.watermark(TP), store.epoch(TP)) == (None, new)

        restored = RestoredState(TP, TP, store.epoch(TP))
        restored.add(_EPOCH_KEY, new + _RESET)  # read twice (restore is idempotent)
        restored.add(_WATERMARK_KEY, _OFFSET.pack(3))
        restored.apply(store, 8)
        restored.add(_EPOCH_KEY, new + _RESET)
        restored.apply(store, 9)
        assert (store.watermark(TP), store.epoch(TP)) == (3, new)
    finally:
        store.close()


def test_a_compacted_changelog_that_lost_the_reset_record_still_starts_over(
    tmp_path: Path,
) -> None:
    """Compaction keeps the latest ``t`` (a restarted owner's adopt) and the latest ``w``."""
    store = RocksStore(tmp_path / "s", retention_ms=10**9)
    try:
        new = EPOCH.pack(OTHER_ID, 0)
        restored = RestoredState(TP, TP, None)  # a fresh instance
        restored.add(_EPOCH_KEY, new + _ADOPT)
        restored.add(_WATERMARK_KEY, _OFFSET.pack(-1))  # the reset's: the old 19 is gone
        restored.apply(store, 9)
        assert (store.watermark(TP), store.epoch(TP)) == (None, new)
    finally:
        store.close()
