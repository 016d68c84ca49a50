"""Carried lanes, found by an adversarial review: each test failed before its fix."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dedupe_consumer import Event, Handler
from dedupe_consumer.engine import Engine
from dedupe_consumer.store import RocksStore

from .changelog_rig import TP0, RecordingChangelog
from .conftest import rec
from .test_carried_lanes import FlakyKey, first_batch
from .test_carried_lanes import engine as carried_engine


def engine(
    tmp_path: Path,
    handler: Handler,
    changelog: RecordingChangelog | None = None,
    backoff: str = "3s",
    **processing: Any,
) -> tuple[Engine, RocksStore]:
    return carried_engine(
        tmp_path, handler, changelog, retry_backoff=backoff, retry_backoff_max=backoff, **processing
    )


def test_a_stop_releases_the_claims_of_held_events(tmp_path: Path) -> None:
    """Claim mode, a stop while s1 (carried) waits out its backoff and s2 (same key)
    waits behind it: neither succeeded, both are left undecided. Their claims stay
    IN_PROGRESS (the non-carried stop path releases them), so after the restart they
    are 'uncertain': with on_uncertain='skip' they are recorded HANDLED without the
    handler ever succeeding (a lost payment); with the default 'dead-letter' they are
    dead-lettered although s2 was never even tried."""
    handler = FlakyKey()
    e, store = engine(tmp_path, handler, mode="claim", on_uncertain="skip")
    try:
        e.pipeline([*first_batch(), rec(3, "s2", key=b"slow")])
        e.request_stop()
        e.drain(final=True)
        assert handler.attempts.get("s2") is None and "s1" not in handler.succeeded
    finally:
        e.close()
        store.close()
    handler = FlakyKey()
    handler.attempts["s1"] = 1  # its next attempt succeeds
    e, store = engine(tmp_path, handler, mode="claim", on_uncertain="skip")
    try:
        e.process([*first_batch(), rec(3, "s2", key=b"slow")])
        assert sorted(handler.succeeded) == ["s1", "s2"]
    finally:
        e.close()
        store.close()


class Crash(BaseException):
    pass


class CrashOnRetry(FlakyKey):
    def handle(self, event: Event) -> None:
        if event.id == "s1" and event.attempt == 2:
            raise Crash("the worker is going down")
        super().handle(event)


def bounded(e: Engine, call: Callable[[], object]) -> tuple[object, bool]:
    """``call()`` on a thread: (what it returned or raised, whether it hung). A hung
    call is freed by a stop (the walk ends after ``walk_budget_s``)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as raised:
            outcome.append(raised)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(5)
    hung = worker.is_alive()
    if hung:
        e.request_stop()
        worker.join(10)
    return (outcome[0] if outcome else None), hung


def test_a_crash_in_a_carried_lane_does_not_hang_the_next_batch(tmp_path: Path) -> None:
    """max_unpersisted=1; s1 and s2 (key slow) are carried (held_open=2). s1's retry
    raises a BaseException: the lane ends without giving back its events, so
    _held_open stays 2 for ever. The next batch's walk waits for held_open <= 1 and
    never ends (the crash is only raised after the walk)."""
    handler = CrashOnRetry()
    e, store = engine(tmp_path, handler, backoff="200ms", max_unpersisted=1)
    try:
        e.pipeline([*first_batch(), rec(3, "s2", key=b"slow")])
        time.sleep(0.6)  # s1's retry crashes the carried lane
        e.walk_budget_s = 0.5  # if it hangs, a stop ends the walk after this
        outcome, hung = bounded(e, lambda: e.pipeline([rec(4, "c", key=b"c")]))
        assert not hung, "the next batch's walk never ended"
        assert isinstance(outcome, Crash)
    finally:
        e.close()
        store.close()


def test_a_final_drain_that_gives_up_stops_the_carried_lane(tmp_path: Path) -> None:
    """drain(final=True) waits for carried lanes only up to walk_budget_s; when it
    gives up, the lane is not told to stop (unlike a revocation or a stop): it keeps
    going after the final drain and after close(), calls the handler for s1 (and
    would for every event of its key), and that success is never written. The
    restart reads s1 again (the watermark is below it) and charges it a second time."""
    handler = FlakyKey()
    e, store = engine(tmp_path, handler, backoff="1s")
    e.walk_budget_s = 0.3
    try:
        e.process(first_batch())  # pipeline + drain(final=True): gives up after 0.3 s
    finally:
        e.close()
    time.sleep(1.5)  # the lane's backoff ends: no call may start now
    store.close()
    handler2 = FlakyKey()
    handler2.attempts["s1"] = 1
    e, store = engine(tmp_path, handler2)
    try:
        e.process(first_batch())
        charged = handler.succeeded.count("s1") + handler2.succeeded.count("s1")
        assert charged == 1, f"s1 charged {charged} times (once after close, unrecorded)"
    finally:
        e.close()
        store.close()


class AlwaysFailsSlow(Handler):
    """Every attempt of key ``b"slow"`` fails (its retries run out: a dead letter)."""

    def __init__(self) -> None:
        self.succeeded: list[str] = []
        self.lock = threading.Lock()

    def handle(self, event: Event) -> None:
        if event.key == b"slow":
            raise RuntimeError("the payment API answered 503")
        with self.lock:
            self.succeeded.append(event.id)


class UnsendableLetters:
    """The dead-letter topic refuses every send."""

    def send(self, message: Any, letter: Any) -> None:
        from dedupe_consumer.errors import DeadLetterError

        raise DeadLetterError("dead-letter topic unavailable")

    def flush(self) -> None:
        pass


def test_a_carried_event_given_back_is_never_passed_by_the_watermark(tmp_path: Path) -> None:
    """s1 (offset 0) is carried; its retries run out and its dead letter cannot be
    sent: the lane gives s1 back (_give_back lowers _covered to -1, rewind to 0) and
    reports the error. The next batch collects that, then _settle overwrites
    _covered with the batch's end and, s1 being no longer held, the write carries
    watermark 3: s1 (neither handled nor dead-lettered) is below the watermark, and
    the restart skips it as a replay. A lost payment."""
    handler = AlwaysFailsSlow()
    e, store = engine(tmp_path, handler, backoff="200ms", max_retries=1)
    e.dead_letters = UnsendableLetters()
    try:
        e.pipeline(first_batch())
        time.sleep(0.6)  # s1's last attempt fails; its letter is not accepted
        e.pipeline([rec(3, "c", key=b"c")])
        e.drain()
        assert store.watermark(TP0) is None, "the watermark passed the undecided s1"
    finally:
        e.close()
        store.close()
