"""The retention sweep skips a partition while none of its records can have expired.

After a pass over every key, the store knows the oldest decision in the family; while
``now - retention`` is below it, a sweep call reads nothing. These tests check that
the skip never hides an expired record (old decisions written later, a restore, a
write during a pass, an empty family) and that it does skip in the steady state.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import IdRecord, RecordStatus, RocksStore, WriteSet

TP = TopicPartition("t", 0)
RETENTION = 1_000


def put(store: RocksStore, records: dict[str, int], tp: TopicPartition = TP) -> None:
    """Write ``records`` (event ID -> decided at, ms) as one persist."""
    write = WriteSet()
    write.records[tp] = [
        (event_id, IdRecord(RecordStatus.HANDLED, n, at, b"\x00" * 8))
        for n, (event_id, at) in enumerate(records.items())
    ]
    store.persist(write)


def sweep_until_done(store: RocksStore, now_ms: int, budget: int, calls: int) -> set[str]:
    """What ``calls`` sweep calls find, deleted as the engine does (tombstones, persist)."""
    found: set[str] = set()
    for _ in range(calls):
        ids = store.find_expired(now_ms, {TP: budget}).get(TP, [])
        if ids:
            write = WriteSet()
            write.released[TP] = list(ids)
            store.persist(write)
            found.update(ids)
    return found


class CountingIterators:
    """Counts the iterators the sweep opens on the partition's family."""

    def __init__(self, store: RocksStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened = 0
        real = store._family

        def family(tp: TopicPartition, *, effects: bool = False) -> object:
            target = real(tp, effects=effects)
            counter = self

            class Counted:
                def iter(self) -> object:
                    counter.opened += 1
                    return target.iter()

                def __getattr__(self, name: str) -> object:
                    return getattr(target, name)

            return Counted()

        monkeypatch.setattr(store, "_family", family)


def test_the_steady_state_reads_nothing_once_a_pass_saw_every_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RocksStore(tmp_path / "s", retention_ms=RETENTION)
    try:
        put(store, {f"id{i}": 10_000 for i in range(50)})
        assert store.find_expired(10_500, {TP: 100}) == {}  # a full pass: none expired
        counting = CountingIterators(store, monkeypatch)
        for now in range(10_500, 11_000, 50):
            assert store.find_expired(now, {TP: 100}) == {}
        assert counting.opened == 0  # nothing could have expired: nothing was read
        found = store.find_expired(11_001, {TP: 100})
        assert sorted(found[TP]) == sorted(f"id{i}" for i in range(50))
        assert counting.opened == 1
    finally:
        store.close()


def test_an_older_decision_written_after_the_pass_is_still_found(tmp_path: Path) -> None:
    """A restore writes records decided long ago: the floor must come down with them."""
    store = RocksStore(tmp_path / "s", retention_ms=RETENTION)
    try:
        put(store, {"new": 10_000})
        assert store.find_expired(10_100, {TP: 10}) == {}  # floor: 10,000
        put(store, {"restored": 9_500})
        assert store.find_expired(10_600, {TP: 10}) == {TP: ["restored"]}
    finally:
        store.close()


def test_an_empty_family_then_a_write_is_swept_when_it_expires(tmp_path: Path) -> None:
    store = RocksStore(tmp_path / "s", retention_ms=RETENTION)
    try:
        put(store, {"x": 5_000})
        write = WriteSet()
        write.released[TP] = ["x"]
        store.persist(write)
        assert store.find_expired(5_100, {TP: 10}) == {}  # an empty pass
        put(store, {"later": 6_000})
        assert store.find_expired(7_001, {TP: 10}) == {TP: ["later"]}
    finally:
        store.close()


def test_a_write_behind_the_cursor_of_a_pass_in_progress_counts(tmp_path: Path) -> None:
    store = RocksStore(tmp_path / "s", retention_ms=RETENTION)
    try:
        put(store, {f"k{i:03}": 20_000 for i in range(100)})
        assert store.find_expired(20_100, {TP: 30}) == {}  # the pass is a third through
        put(store, {"a-old": 15_000})  # sorts before the cursor: this pass will not see it
        for _ in range(5):  # the pass ends; its floor must include a-old
            store.find_expired(20_100, {TP: 30})
        assert store.find_expired(16_001, {TP: 200}) == {TP: ["a-old"]}
    finally:
        store.close()


@pytest.mark.parametrize("seed", range(8))
def test_whatever_the_writes_every_expired_record_is_found(tmp_path: Path, seed: int) -> None:
    """Random writes (old and new decisions, deletes) between random sweep calls: after
    enough calls at a fixed time, the sweep has found exactly the expired records."""
    rng = random.Random(seed)
    store = RocksStore(tmp_path / "s", retention_ms=RETENTION)
    live: dict[str, int] = {}
    try:
        now = 100_000
        for _ in range(60):
            now += rng.randint(0, 300)
            batch = {
                f"id{rng.randint(0, 300)}": now - rng.choice([0, 0, 0, 200, 900, 1500])
                for _ in range(rng.randint(0, 20))
            }
            if batch:
                put(store, batch)
                live.update(batch)
            found = store.find_expired(now, {TP: rng.randint(1, 40)}).get(TP, [])
            if found and rng.random() < 0.8:  # sometimes the delete is not written
                write = WriteSet()
                write.released[TP] = list(found)
                store.persist(write)
                for event_id in found:
                    live.pop(event_id, None)
        expired = {i for i, at in live.items() if at < now - RETENTION}
        assert sweep_until_done(store, now, 7, 200) == expired
    finally:
        store.close()
