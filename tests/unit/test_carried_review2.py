"""Carried lanes, found by a second adversarial review: each test failed before its fix."""

from __future__ import annotations

import time
from pathlib import Path

from dedupe_consumer import Event

from .changelog_rig import TP0, RecordingChangelog
from .conftest import rec
from .test_carried_lanes import FlakyKey, engine, first_batch
from .test_carried_review import AlwaysFailsSlow, UnsendableLetters, bounded
from .test_fenced_batches import FencingChangelog


class FlakyOnce(FlakyKey):
    """s1 fails its very first attempt only (not the first attempt of each delivery)."""

    def handle(self, event: Event) -> None:
        with self.lock:
            self.attempts[event.id] = self.attempts.get(event.id, 0) + 1
            first = self.attempts[event.id] == 1
        if event.id == "s1" and first:
            raise RuntimeError("the payment API answered 503")
        with self.lock:
            self.succeeded.append(event.id)


def test_a_given_back_event_is_never_passed_by_the_changelog_offsets(tmp_path: Path) -> None:
    """s1 (offset 0) is carried; its retries run out and its dead letter is refused:
    the lane gives s1 back (_given_back = 0). The next batch [c@3] moves _next[TP0]
    to 3: _next is capped by _held only, and s1 is no longer held. The watermark is
    capped (the first review's fix), but the changelog transaction commits the
    write's safe offsets (_fence_offsets(write, _next)) = {TP0: 3}. The consumer
    stops on the error; the restart resumes at max(committed=3, watermark+1) and
    never reads s1 again: neither handled nor dead-lettered. A lost payment."""
    handler = AlwaysFailsSlow()
    changelog = RecordingChangelog()
    e, store = engine(
        tmp_path,
        handler,
        changelog,
        retry_backoff="200ms",
        retry_backoff_max="200ms",
        max_retries=1,
    )
    e.dead_letters = UnsendableLetters()
    try:
        e.pipeline(first_batch())
        time.sleep(0.6)  # s1's last attempt fails; its letter is not accepted
        e.pipeline([rec(3, "c", key=b"c")])
        e.drain()
        assert store.watermark(TP0) is None
        committed = [o[TP0] for o in changelog.offsets if TP0 in o]
        assert all(o <= 0 for o in committed), f"transactions committed {committed}: past s1@0"
    finally:
        e.close()
        store.close()


def test_a_fenced_write_of_a_partition_with_a_carried_lane_is_kept(tmp_path: Path) -> None:
    """The CI scenario of test_fenced_batches (a cooperative rebalance moves the
    generation while a write is in flight; the partition is then revoked and its
    kept batch persisted in the revoke callback), with a retry in progress: s1@0 is
    carried, so the write of a@1 and b@2 carries records but no watermark. _fenced
    keeps a write only `if part.watermarks`: it is dropped, the revoke callback has
    nothing to adopt, and the next owner (here: us again) handles a and b a second
    time. Without the carried lane the batch would have waited for s1, had a
    watermark and been adopted: carried lanes turn every such fence into double
    charges of everything decided while a lane is held."""
    handler = FlakyOnce()
    changelog = FencingChangelog()
    e, store = engine(tmp_path, handler, changelog)
    try:
        changelog.fence = 1  # the generation moved while the write was in flight
        e.pipeline(first_batch())
        e.release([TP0])  # revoke callback: still ours, the kept write is persisted here
        changelog.restored_records = 0  # nobody wrote meanwhile
        e.assign([TP0])
        e.process(first_batch())
        assert handler.succeeded.count("a") == 1 and handler.succeeded.count("b") == 1, (
            f"handled: {handler.succeeded}"
        )
    finally:
        e.close()
        store.close()


def test_process_after_a_final_drain_gave_up_does_not_hang(tmp_path: Path) -> None:
    """process() = pipeline + drain(final=True). The final drain waits walk_budget_s
    for the carried lane (s1 in a 3 s backoff, s2 behind it), gives up and abandons
    it: the lane ends (gone) but its events stay in _held and _held_open stays 2 for
    ever. With max_unpersisted=1, every later walk waits for _held_open <= 1: the
    next process() never returns (and with any bound the watermark stays before s1,
    whose redelivery is taken for a replay of a held offset: never handled)."""
    handler = FlakyKey()
    e, store = engine(tmp_path, handler, max_unpersisted=1)
    e.walk_budget_s = 0.3
    try:
        e.process([*first_batch(), rec(3, "s2", key=b"slow")])  # gives up after 0.3 s
        _, hung = bounded(e, lambda: e.process([rec(4, "c", key=b"c")]))
        assert not hung, "the next process() never returned"
    finally:
        e.close()
        store.close()
