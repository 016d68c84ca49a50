"""Durability pipelined: batches decided while the write before is made durable.

The persister is held back by a changelog whose transaction waits on a gate, so the
batches decided meanwhile are gathered into the next write. Lookups, staged-effect
reads and the sweep must see what is decided but not durable yet, and the gathered
write must end as the batches would have, one after the other.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

from dedupe_consumer import Event, Handler
from dedupe_consumer.engine import Engine
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import RocksStore, WriteSet

from .changelog_rig import RecordingChangelog, changelog_engine
from .conftest import TOPIC, Clock, rec

TP0 = TopicPartition(TOPIC, 0)


class GatedChangelog(RecordingChangelog):
    """Each transaction waits until the gate opens: the persister stays busy."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()

    def before_write(self, write: WriteSet) -> None:
        self.waiting.set()
        assert self.gate.wait(10), "the test never opened the gate"


class Counter(Handler):
    """A running total in staged effects, and the IDs it was called for."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def handle(self, event: Event) -> None:
        self.calls.append(event.id)
        total = int(event.staged(b"total") or b"0")
        event.stage(b"total", str(total + 1))


def rig(tmp_path: Path, handler: Handler) -> tuple[Engine, RocksStore, Clock, GatedChangelog]:
    clock = Clock()
    changelog = GatedChangelog()
    e, store = changelog_engine(
        tmp_path,
        handler,
        changelog,
        retention_ms=3_600_000,
        clock=clock,
        dedupe={"retention": "1h"},
        store={"sweep_keys": 1000},
    )
    return e, store, clock, changelog


def test_batches_decided_while_the_persister_is_busy_see_each_other(tmp_path: Path) -> None:
    handler = Counter()
    e, store, _, changelog = rig(tmp_path, handler)
    try:
        changelog.gate.clear()
        first = e.pipeline([rec(0, "a"), rec(1, "b")])
        assert changelog.waiting.wait(5)
        # Not durable yet: nothing to commit, and the store does not have it.
        assert first.commits == {} and first.stats.handled == 0
        assert store.watermark(TP0) is None
        second = e.pipeline([rec(2, "a"), rec(3, "c")])  # "a" again: a duplicate
        third = e.pipeline([rec(0, "a"), rec(1, "b"), rec(4, "d")])  # a seek back
        assert second.stats.consumed == third.stats.consumed == 0  # gathered, not durable
        changelog.gate.set()
        done = e.drain()
    finally:
        e.close()
    assert handler.calls == ["a", "b", "c", "d"]
    assert done.stats.handled == 4
    assert done.stats.duplicates == 1
    assert done.stats.replays == 2  # offsets 0 and 1, decided before, not durable then
    assert store.watermark(TP0) == 4
    assert store.effect(TP0, b"total") == b"4"  # no lost update across the batches
    # Two writes: the first batch, then the two gathered into one.
    assert [sorted(w.watermarks.values()) for w in changelog.writes] == [[1], [4]]
    store.close()


def test_an_id_released_and_decided_again_in_one_gathered_write_is_kept(
    tmp_path: Path,
) -> None:
    handler = Counter()
    e, store, clock, changelog = rig(tmp_path, handler)
    try:
        e.process([rec(i, f"old{i}") for i in range(10)])
        changelog.gate.clear()
        e.pipeline([rec(10, "p")])  # on the persister, held
        assert changelog.waiting.wait(5)
        clock.now += timedelta(hours=2).total_seconds()
        e.pipeline([rec(11, "q")])  # its sweep releases the expired old0..old9
        e.pipeline([rec(12, "old3")])  # sent again after expiry: handled anew
        changelog.gate.set()
        e.drain()
        now_ms = int(clock() * 1000)
        assert handler.calls.count("old3") == 2
        # The new decision outlives the release gathered into the same write.
        assert store.lookup(TP0, ["old3", "old4"], now_ms) != [None, None]
        assert store.lookup(TP0, ["old3"], now_ms)[0] is not None
        assert store.lookup(TP0, ["old4"], now_ms)[0] is None
        last = changelog.writes[-1]
        assert "old3" in {i for i, _ in last.records[TP0]}
        assert "old3" not in last.released.get(TP0, [])
        # And a third copy is a duplicate.
        result = e.process([rec(13, "old3")])
        assert result.stats.duplicates == 1
    finally:
        e.close()
        store.close()
