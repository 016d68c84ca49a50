"""Guards for what a crash test cannot show (issue 10, "tests that would not catch a
regression"): every decision write is synced, and dead letters are flushed before
the batch that decided them is persisted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dedupe_consumer import DedupeConsumer, Event, PermanentError
from dedupe_consumer.contracts import AssignmentListener, Edges
from dedupe_consumer.dead_letters import DeadLetter, MemoryDeadLetters
from dedupe_consumer.errors import DeadLetterError
from dedupe_consumer.models import SourceMessage, TopicPartition
from dedupe_consumer.replay import ReplaySource
from dedupe_consumer.store import RocksStore, WriteSet

from .conftest import TOPIC, Recorder, Rig, make_settings, rec

TP0 = TopicPartition(TOPIC, 0)
RigFactory = Callable[..., Rig]


class RecordingDb:
    """Stands between RocksStore and its RocksDB handle and notes each write's options."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.writes: list[Any] = []

    def write(self, batch: Any, options: Any = None) -> None:
        self.writes.append(options)
        if options is None:
            self._db.write(batch)
        else:
            self._db.write(batch, options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def fail_c(event: Event) -> None:
    if event.id == "c":
        raise PermanentError("dead-lettered: its decision is a write too")


@pytest.mark.parametrize("mode", ["plain", "claim"])
def test_every_decision_and_claim_write_is_synced(rig: RigFactory, mode: str) -> None:
    r = rig(Recorder(fail_c), processing={"mode": mode})
    assert r.store is not None
    db = RecordingDb(r.store._db)
    r.store._db = db  # type: ignore[assignment]
    for start in (0, 10):  # two batches; nothing is old enough for the sweep to write
        r.engine.process([rec(start + i, f"{start}-{i}") for i in range(3)] + [rec(start + 3, "c")])
    assert len(db.writes) == (4 if mode == "claim" else 2)  # claims, then decisions
    for options in db.writes:
        assert options is not None, "a store write without WriteOptions is not synced"
        assert options.sync, "a decision write that is not synced is lost by a power cut"
        assert not options.disable_wal


class Timeline:
    def __init__(self) -> None:
        self.events: list[str] = []


class TimelineDeadLetters(MemoryDeadLetters):
    def __init__(self, timeline: Timeline, fail_flush: bool = False) -> None:
        super().__init__()
        self.timeline = timeline
        self.fail_flush = fail_flush

    def send(self, message: SourceMessage, letter: DeadLetter) -> None:
        self.timeline.events.append("send")
        super().send(message, letter)

    def flush(self) -> None:
        self.timeline.events.append("flush")
        if self.fail_flush:
            raise DeadLetterError("the dead-letter topic is unreachable")


class TimelineStore(RocksStore):
    timeline: Timeline

    def persist(self, write: WriteSet) -> None:
        self.timeline.events.append("persist")
        super().persist(write)


def run_with(
    tmp_path: Path, dead: TimelineDeadLetters, timeline: Timeline
) -> tuple[DedupeConsumer, list[ReplaySource], TimelineStore]:
    settings = make_settings(tmp_path / "state")
    store = TimelineStore(tmp_path / "state", retention_ms=10**12)
    store.timeline = timeline
    sources: list[ReplaySource] = []
    records = [rec(0, "a"), rec(1, "b"), rec(2, "c"), rec(3, "d")]

    def source(listener: AssignmentListener) -> ReplaySource:
        sources.append(ReplaySource(records, listener))
        return sources[-1]

    consumer = DedupeConsumer(
        Recorder(fail_c), settings, edges=Edges(source=source, dead_letters=dead, store=store)
    )
    return consumer, sources, store


def test_dead_letters_are_sent_then_flushed_then_the_batch_is_persisted(tmp_path: Path) -> None:
    timeline = Timeline()
    consumer, sources, store = run_with(tmp_path, TimelineDeadLetters(timeline), timeline)
    try:
        consumer.run(until=lambda t: sources[0].exhausted, install_signal_handlers=False)
        assert timeline.events == ["send", "flush", "persist"]
        assert sources[0].committed == {TP0: 4}
    finally:
        store.close()


def test_a_failing_flush_leaves_no_record_no_watermark_and_no_commit(tmp_path: Path) -> None:
    timeline = Timeline()
    dead = TimelineDeadLetters(timeline, fail_flush=True)
    consumer, sources, store = run_with(tmp_path, dead, timeline)
    try:
        with pytest.raises(DeadLetterError):
            consumer.run(until=lambda t: sources[0].exhausted, install_signal_handlers=False)
        assert timeline.events == ["send", "flush"]  # never persisted
        assert store.watermark(TP0) is None
        assert store.lookup(TP0, ["a", "b", "c", "d"], 0) == [None] * 4
        assert sources[0].committed == {}
    finally:
        store.close()
