"""Durability pipelined, when a write fails: found by an adversarial review.

A batch decided on top of a write that is not durable yet may only become durable
if that write did. Each test drives Engine.pipeline / Engine.drain the way DedupeConsumer.run does
(pipeline per batch; on an exception the run loop's ``finally`` calls
``engine.drain`` before ``source.close``).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dedupe_consumer import Event, PermanentError
from dedupe_consumer.engine import Engine
from dedupe_consumer.errors import DeadLetterError, NotOwnerError, StoreError
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import RecordStatus, RocksStore, WriteSet

from .changelog_rig import RecordingChangelog, changelog_engine
from .conftest import TOPIC, Clock, Recorder, make_settings, rec
from .test_event_errors import RefusingDeadLetters

TP0 = TopicPartition(TOPIC, 0)


class GatedChangelog(RecordingChangelog):
    """The first batch write (one with a watermark) waits for ``gate`` and then fails
    with ``error``; every other write succeeds."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.error: BaseException | None = error

    def before_write(self, write: WriteSet) -> None:
        if write.watermarks and self.error is not None:
            error, self.error = self.error, None
            assert self.gate.wait(10)
            raise error


class Counter(Recorder):
    """Each event adds 1 to a staged counter (a transactional effect)."""

    def handle(self, event: Event) -> None:
        super().handle(event)
        current = int(event.staged(b"count") or b"0")
        event.stage(b"count", str(current + 1).encode())


def make_engine(
    tmp_path: Path, changelog: RecordingChangelog | None, handler: Recorder, **processing: object
) -> tuple[Engine, RocksStore]:
    return changelog_engine(tmp_path, handler, changelog, processing=dict(processing))


# -- 1. a failed (not fenced) pending write: the gathered batches are persisted anyway --------


def test_a_failed_pending_write_does_not_let_the_gathered_batch_cover_its_offsets(
    tmp_path: Path,
) -> None:
    changelog = GatedChangelog(StoreError("changelog transaction failed: broker gone"))
    handler = Counter()
    e, store = make_engine(tmp_path, changelog, handler)
    try:
        e.pipeline([rec(i, f"n{i}") for i in range(3)])  # N: offsets 0..2, on the persister
        e.pipeline([rec(i, f"m{i}") for i in range(3, 6)])  # M: gathered (persister busy)
        changelog.gate.set()  # N's transaction fails
        with pytest.raises(StoreError):
            e.drain()  # what the loop sees (pipeline or drain): the consumer stops
        # DedupeConsumer.run's finally: engine.drain() before source.close(); it raises
        # the same error again and persists nothing decided after the failed write.
        with pytest.raises(StoreError):
            e.drain()
        # N (offsets 0..2) was never made durable: nothing may cover its offsets.
        wm = store.watermark(TP0)
        assert wm is None or wm < 0, (
            f"watermark {wm} covers offsets 0..2 whose decisions were never persisted: "
            "after a restart they are skipped as replays (lost), their IDs unrecorded"
        )
    finally:
        e.close()
        store.close()


# -- 2. a lost dead letter in batch N; batch N+1 is persisted past it --------------------------


class Poison(Recorder):
    def handle(self, event: Event) -> None:
        super().handle(event)
        if event.id.startswith("poison"):
            raise PermanentError("bad")


def test_a_lost_dead_letter_is_not_covered_by_the_next_batch_watermark(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "s")
    store = RocksStore(settings.store.path, retention_ms=10**9)
    dead = RefusingDeadLetters(set(), {2})  # the letter of offset 2 is lost at flush
    e = Engine(
        Poison(),
        settings.dedupe,
        settings.processing,
        store,
        dead,
        sweep_keys=settings.store.sweep_keys,
        revoked_state_grace=settings.store.revoked_state_grace,
        clock=Clock(),
    )
    e.assign([TP0])
    try:
        errors: list[BaseException] = []
        first = e.pipeline([rec(0, "a"), rec(1, "b"), rec(2, "poison"), rec(3, "d")])
        errors += [first.error] if first.error else []
        try:  # the loop polls the next batch before it learns about N's failure
            second = e.pipeline([rec(4, "e"), rec(5, "f")])
            errors += [second.error] if second.error else []
        finally:
            last = e.drain()  # the run loop's finally
            errors += [last.error] if last.error else []
        assert any(isinstance(x, DeadLetterError) for x in errors)
        wm = store.watermark(TP0)
        assert wm is not None and wm < 2, (
            f"watermark {wm} covers offset 2, whose dead letter was never delivered: "
            "the event is neither handled nor dead-lettered (invariant 4)"
        )
    finally:
        e.close()
        store.close()


# -- 3. fenced pending discovered outside _hand_over (claim phase): next batch not fenced ----


class FenceFirstBatch(RecordingChangelog):
    """Fences the first write carrying a watermark (a batch's, not a claim's)."""

    def __init__(self) -> None:
        super().__init__()
        self.fenced = False

    def before_write(self, write: WriteSet) -> None:
        if write.watermarks and not self.fenced:
            self.fenced = True
            raise NotOwnerError("ILLEGAL_GENERATION")


def test_a_batch_classified_against_a_fenced_pending_write_is_not_persisted(
    tmp_path: Path,
) -> None:
    changelog = FenceFirstBatch()
    handler = Counter()
    e, store = make_engine(tmp_path, changelog, handler, mode="claim")
    try:
        e.pipeline([rec(i, f"n{i}") for i in range(3)])  # N: 0..2; its transaction is fenced
        # M: classified while N is pending (N's overlay: count=3); its claim phase settles
        # N (fenced) with nothing gathered yet, so _fenced_before is never set for M.
        m = e.pipeline([rec(i, f"m{i}") for i in range(3, 6)])
        m2 = e.drain()
        wm = store.watermark(TP0)
        n_records = store.lookup(TP0, ["n0", "n1", "n2"], 0)
        handled = [r is not None and r.status is RecordStatus.HANDLED for r in n_records]
        assert wm is None or wm < 0 or all(handled), (
            f"M persisted watermark {wm} over N's offsets 0..2 although N was fenced and "
            f"not persisted (records {n_records}); rewinds {m.rewind} {m2.rewind}: "
            "re-read, they are taken for replays"
        )
    finally:
        e.close()
        store.close()


def test_fenced_orphan_adopted_after_a_later_batch_regresses_watermark_and_effects(
    tmp_path: Path,
) -> None:
    changelog = FenceFirstBatch()
    handler = Counter()
    e, store = make_engine(tmp_path, changelog, handler, mode="claim")
    try:
        e.pipeline([rec(i, f"n{i}") for i in range(3)])  # N fenced on the persister
        m = e.pipeline([rec(i, f"m{i}") for i in range(3, 6)])  # M: read again, not decided
        assert m.rewind == {TP0: 0}
        # The loop seeks back to N's offsets; the next pipeline first adopts the kept
        # batch N ("still ours since it was fenced: try once more"), then M is handled.
        e.pipeline([rec(i, f"n{i}") for i in range(3)] + [rec(i, f"m{i}") for i in range(3, 6)])
        e.drain()
        assert store.watermark(TP0) == 5
        assert store.effect(TP0, b"count") == b"6"  # six events each added 1, once
        assert sorted(handler.ids) == sorted(
            [f"n{i}" for i in range(3)] + [f"m{i}" for i in range(3, 6)]
        )
    finally:
        e.close()
        store.close()


class OneAtATime(RecordingChangelog):
    """Each transaction waits for a permit: the test decides when the persister finishes."""

    def __init__(self) -> None:
        super().__init__()
        self.allow = threading.Semaphore(0)

    def before_write(self, write: WriteSet) -> None:
        assert self.allow.acquire(timeout=10)


def test_handled_but_not_durable_events_stay_within_the_documented_bound(
    tmp_path: Path,
) -> None:
    changelog = OneAtATime()
    exposed: list[int] = []
    store_box: list[RocksStore] = []

    class Watch(Recorder):
        def handle(self, event: Event) -> None:
            super().handle(event)
            store = store_box[0]
            wm = store.watermark(TP0)
            durable = 0 if wm is None else wm + 1  # offsets 0..wm are durable
            exposed.append(len(self.calls) - durable)  # a SIGKILL now repeats these

    e, store = make_engine(tmp_path, changelog, Watch(), max_unpersisted=4)
    store_box.append(store)
    batch = 2  # events per batch
    try:
        e.pipeline([rec(i, f"e{i}") for i in range(0, 2)])  # B1 -> persister (blocked)
        e.pipeline([rec(i, f"e{i}") for i in range(2, 4)])  # B2 gathered (2 < 4)
        changelog.allow.release()  # B1 durable
        e.pipeline([rec(i, f"e{i}") for i in range(4, 6)])  # B2+B3 (4) -> persister (blocked)
        e.pipeline([rec(i, f"e{i}") for i in range(6, 8)])  # B4 gathered
        e.pipeline([rec(i, f"e{i}") for i in range(8, 9)])  # B5 walked: 4 + 2 + 1 exposed
        for _ in range(10):
            changelog.allow.release()
        e.drain()
        # docs: 2 x (max_unpersisted - 1 + batch_size): the write on the persister and the
        # batches gathered for the next one.
        bound = 2 * (4 - 1 + batch)
        assert max(exposed) <= bound, (
            f"{max(exposed)} handler calls were made but not durable at one moment "
            f"(documented bound {bound}): pending write + gathered batches + the walk"
        )
    finally:
        for _ in range(10):
            changelog.allow.release()
        e.close()
        store.close()
