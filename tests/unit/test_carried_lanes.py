"""A retry with backoff holds only its key: its lane outlives the batch (it is carried).

The batch settles without the lane; the partition's watermark stays before the
lane's first undecided event while later batches go on; later events of the same
key join the lane (in order); what the lane decides is written with a later batch.
Revocations, losses, stops and duplicates of a held ID are checked here; the kill
suite checks the crash windows on a real broker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dedupe_consumer import Event, Handler
from dedupe_consumer.engine import Engine
from dedupe_consumer.errors import RetryableError
from dedupe_consumer.store import RecordStatus, RocksStore

from .changelog_rig import TP0, RecordingChangelog, changelog_engine
from .conftest import rec

BACKOFF = "3s"
"""Long next to a batch of no-op calls: the other batches finish well inside it."""


class FlakyKey(Handler):
    """Fails the first attempt of event s1 (key ``b"slow"``); records the order in
    which events succeed."""

    def __init__(self) -> None:
        self.succeeded: list[str] = []
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()

    def handle(self, event: Event) -> None:
        with self.lock:
            self.attempts[event.id] = self.attempts.get(event.id, 0) + 1
        if event.id == "s1" and event.attempt == 1:
            raise RuntimeError("the payment API answered 503")
        with self.lock:
            self.succeeded.append(event.id)


class AsyncFlakyKey(FlakyKey):
    async def handle(self, event: Event) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        FlakyKey.handle(self, event)


def engine(
    tmp_path: Path,
    handler: Handler,
    changelog: RecordingChangelog | None = None,
    **processing: Any,
) -> tuple[Engine, RocksStore]:
    return changelog_engine(
        tmp_path,
        handler,
        changelog,
        processing={
            "concurrency": 4,
            "retry_backoff": BACKOFF,
            "retry_backoff_max": BACKOFF,
            **processing,
        },
    )


def first_batch() -> list[Any]:
    return [rec(0, "s1", key=b"slow"), rec(1, "a", key=b"a"), rec(2, "b", key=b"b")]


def second_batch() -> list[Any]:
    return [rec(3, "c", key=b"c"), rec(4, "s2", key=b"slow"), rec(5, "d", key=b"d")]


def handled(store: RocksStore, ids: list[str]) -> list[bool]:
    return [r is not None and r.status is RecordStatus.HANDLED for r in store.lookup(TP0, ids, 0)]


@pytest.mark.parametrize("kind", [FlakyKey, AsyncFlakyKey])
def test_a_retry_in_backoff_holds_only_its_key(tmp_path: Path, kind: type[FlakyKey]) -> None:
    handler = kind()
    changelog = RecordingChangelog()
    e, store = engine(tmp_path, handler, changelog)
    try:
        e.pipeline(first_batch())
        e.pipeline(second_batch())  # while s1 waits out its backoff
        e.drain()  # what is decided is durable; s1 and s2 are not decided yet
        assert "s1" not in handler.succeeded and "s2" not in handler.succeeded
        assert sorted(handler.succeeded) == ["a", "b", "c", "d"]  # other keys went on
        assert handled(store, ["a", "b", "c", "d"]) == [True] * 4  # records above the gap
        assert store.watermark(TP0) is None  # held before s1 (offset 0): nothing committed
        assert all(0 not in w.watermarks.values() for w in changelog.writes)

        result = e.drain(final=True)  # waits for the carried lane
        assert handler.succeeded[-2:] == ["s1", "s2"]  # the key in offset order
        assert handled(store, ["s1", "s2"]) == [True, True]
        assert store.watermark(TP0) == 5
        assert result.commits == {TP0: 6}
        assert handler.attempts == {"s1": 2, "a": 1, "b": 1, "c": 1, "s2": 1, "d": 1}
    finally:
        e.close()
        store.close()


def test_a_later_batch_writes_what_the_carried_lane_decided(tmp_path: Path) -> None:
    handler = FlakyKey()
    e, store = engine(tmp_path, handler, retry_backoff="300ms", retry_backoff_max="300ms")
    try:
        e.pipeline(first_batch())
        deadline = threading.Event()
        while "s1" not in handler.succeeded:  # the lane ends its backoff on its own
            assert not deadline.wait(0.05) and handler.attempts["s1"] <= 2
        e.pipeline([rec(3, "c", key=b"c")])  # collects s1 into this batch's write
        e.drain()
        assert handled(store, ["s1", "a", "b", "c"]) == [True] * 4
        assert store.watermark(TP0) == 3
    finally:
        e.close()
        store.close()


def test_a_copy_of_a_held_id_under_another_key_is_its_duplicate(tmp_path: Path) -> None:
    handler = FlakyKey()
    e, store = engine(tmp_path, handler)
    try:
        e.pipeline(first_batch())
        result = e.pipeline([rec(3, "s1", key=b"other")])  # same ID, another key
        e.drain(final=True)
        assert handler.attempts["s1"] == 2  # one event: first attempt failed, second ran
        assert handler.succeeded.count("s1") == 1
        stats = result.stats
        assert stats.duplicates + e.drain().stats.duplicates <= 1
        assert store.watermark(TP0) == 3
    finally:
        e.close()
        store.close()


def test_a_revoked_partition_ends_its_carried_backoff_and_persists_what_was_decided(
    tmp_path: Path,
) -> None:
    handler = FlakyKey()
    changelog = RecordingChangelog()
    e, store = engine(tmp_path, handler, changelog)
    try:
        e.pipeline(first_batch())
        e.pipeline(second_batch())
        commits = e.release([TP0])  # revoked while s1 waits out its backoff
        assert handler.attempts["s1"] == 1  # the backoff ended: no call after the revoke
        assert "s2" not in handler.attempts
        assert store.watermark(TP0) is None  # nothing past the undecided s1
        assert all(offset <= 0 for offset in commits.values())
        assert handled(store, ["a", "b", "c", "d"]) == [True] * 4
        # Reassigned: read again from s1; a..d are found by ID, s1 and s2 handled once.
        e.assign([TP0])
        e.process(first_batch() + second_batch())
        assert handler.succeeded.count("s1") == 1 and handler.succeeded.count("s2") == 1
        assert sorted(handler.succeeded).count("a") == 1
        assert store.watermark(TP0) == 5
    finally:
        e.close()
        store.close()


def test_a_lost_partition_drops_its_carried_lane(tmp_path: Path) -> None:
    handler = FlakyKey()
    changelog = RecordingChangelog()
    e, store = engine(tmp_path, handler, changelog)
    try:
        e.pipeline(first_batch())
        written = len(changelog.writes)
        e.release([TP0], lost=True)
        assert len(changelog.writes) == written  # someone else's already: nothing written
        assert handler.attempts["s1"] == 1
        e.assign([TP0])
        e.process([rec(0, "s1", key=b"slow")])  # the new owner's turn, or ours again
        assert handler.succeeded == ["a", "b", "s1"]
    finally:
        e.close()
        store.close()


def test_a_stop_leaves_the_carried_event_undecided_and_held(tmp_path: Path) -> None:
    handler = FlakyKey()
    e, store = engine(tmp_path, handler)
    try:
        e.pipeline(first_batch())
        e.request_stop()
        e.drain(final=True)  # the backoff ends at once: no second attempt
        assert handler.attempts["s1"] == 1
        assert store.watermark(TP0) is None  # read again from s1 after the restart
        assert handled(store, ["a", "b"]) == [True, True]
        assert handled(store, ["s1"]) == [False]
    finally:
        e.close()
        store.close()


def test_claims_of_carried_events_stay_until_they_are_decided(tmp_path: Path) -> None:
    handler = FlakyKey()
    e, store = engine(tmp_path, handler, mode="claim")
    try:
        e.pipeline(first_batch())
        e.drain()
        (s1,) = store.lookup(TP0, ["s1"], 0)
        assert s1 is not None and s1.status is RecordStatus.IN_PROGRESS  # still claimed
        e.drain(final=True)
        assert handled(store, ["s1", "a", "b"]) == [True] * 3
    finally:
        e.close()
        store.close()


def test_partition_ordering_carries_the_whole_partition(tmp_path: Path) -> None:
    handler = FlakyKey()
    e, store = engine(tmp_path, handler, ordering="partition")
    try:
        e.pipeline(first_batch())
        e.pipeline(second_batch())
        e.drain()
        assert handler.succeeded == []  # one lane per partition: all wait behind s1
        e.drain(final=True)
        assert handler.succeeded == ["s1", "a", "b", "c", "s2", "d"]
        assert store.watermark(TP0) == 5
    finally:
        e.close()
        store.close()


class RunningTotal(FlakyKey):
    """A transactional effect every event of the partition adds to."""

    def handle(self, event: Event) -> None:
        super().handle(event)
        event.stage(b"total", str(int(event.staged(b"total") or b"0") + 1))


def test_a_lane_after_a_finished_carried_one_reads_its_writes(tmp_path: Path) -> None:
    """The carried lane finished (its decisions not written yet) before the next batch
    started a lane of the same key: that lane must read what the carried one staged,
    or the running total loses the carried lane's events."""
    handler = RunningTotal()
    e, store = engine(
        tmp_path, handler, ordering="partition", retry_backoff="200ms", retry_backoff_max="200ms"
    )
    try:
        e.pipeline(first_batch())  # one lane: s1 fails once, then s1, a, b
        stop = threading.Event()
        while "b" not in handler.succeeded:
            assert not stop.wait(0.05)
        stop.wait(0.2)  # the lane closes
        e.pipeline([rec(3, "c", key=b"c"), rec(4, "d", key=b"d")])
        e.drain(final=True)
        assert handler.succeeded == ["s1", "a", "b", "c", "d"]
        assert store.effect(TP0, b"total") == b"5"
        assert store.watermark(TP0) == 4
    finally:
        e.close()
        store.close()


class RateLimited(FlakyKey):
    """s1's first attempt is refused with a wish to wait (an HTTP 429's Retry-After)."""

    def __init__(self, wait_s: float) -> None:
        super().__init__()
        self.wait_s = wait_s
        self.at: dict[tuple[str, int], float] = {}

    def handle(self, event: Event) -> None:
        self.at[(event.id, event.attempt)] = time.monotonic()
        if event.id == "s1" and event.attempt == 1:
            raise RetryableError("HTTP 429: slow down", retry_after=self.wait_s)
        super().handle(event)


def test_a_retry_after_wish_is_waited_out_as_the_backoff_holding_only_its_key(
    tmp_path: Path,
) -> None:
    handler = RateLimited(0.5)
    e, store = engine(tmp_path, handler, retry_backoff="1ms", retry_backoff_max="10s")
    try:
        e.pipeline(first_batch())
        e.pipeline(second_batch())  # the other keys go on while s1 waits
        e.drain(final=True)
        waited = handler.at[("s1", 2)] - handler.at[("s1", 1)]
        assert waited >= 0.5  # the wish, not the 1 ms backoff
        assert handler.succeeded.index("c") < handler.succeeded.index("s1")
        assert store.watermark(TP0) == 5
    finally:
        e.close()
        store.close()


def test_a_retry_after_wish_is_capped_by_retry_backoff_max(tmp_path: Path) -> None:
    handler = RateLimited(3600)
    e, store = engine(tmp_path, handler, retry_backoff="1ms", retry_backoff_max="300ms")
    try:
        e.process(first_batch())  # an hour asked, 300 ms granted: it ends
        assert handler.at[("s1", 2)] - handler.at[("s1", 1)] < 60
        assert sorted(handler.succeeded) == ["a", "b", "s1"]
    finally:
        e.close()
        store.close()
