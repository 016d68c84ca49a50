"""Claim mode and transactional effects, with an in-process crash (a BaseException
escaping the engine before it persists); tests/faults/ does the same with SIGKILL."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from dedupe_consumer import ConfigError, Event, Handler, RetryableError
from dedupe_consumer.engine import Engine
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import RecordStatus

from .conftest import TOPIC, Recorder, Rig, rec

TP0 = TopicPartition(TOPIC, 0)
RigFactory = Callable[..., Rig]


class Crash(BaseException):
    """Stands in for the process dying: nothing after it runs, nothing is persisted."""


class CrashingHandler(Recorder):
    def __init__(self, crash_on: str | None = None, effects: set[str] | None = None) -> None:
        super().__init__()
        self.crash_on = crash_on
        self.done = effects if effects is not None else set()  # the "downstream system"
        self.reconciled: list[str] = []

    def handle(self, event: Event) -> None:
        super().handle(event)
        if event.id == self.crash_on:
            raise Crash
        self.done.add(event.id)

    def reconcile(self, event: Event) -> bool:
        self.reconciled.append(event.id)
        return event.id in self.done


BATCH = [rec(0, "a"), rec(1, "b"), rec(2, "c")]


def crash_then_redeliver(r: Rig) -> Engine:
    with pytest.raises(Crash):
        r.engine.process(BATCH)
    assert r.store is not None and r.store.watermark(TP0) is None  # nothing decided
    found = r.store.lookup(TP0, ["a", "b", "c"], int(r.clock() * 1000))
    assert [f.status if f else None for f in found] == [RecordStatus.IN_PROGRESS] * 3
    engine = r.restart()
    handler = r.handler
    assert isinstance(handler, CrashingHandler)
    handler.crash_on = None
    return engine


def test_claim_dead_letter_sends_every_uncertain_event_to_dead_letters(
    rig: RigFactory,
) -> None:
    r = rig(CrashingHandler("b"), processing={"mode": "claim", "on_uncertain": "dead-letter"})
    engine = crash_then_redeliver(r)
    result = engine.process(BATCH)
    assert result.stats.uncertain == 3
    assert [d.letter.reason for d in r.dead.letters] == ["uncertain"] * 3
    assert r.handler.ids == ["a", "b"]  # type: ignore[attr-defined]  # no call after the crash
    assert result.commits == {TP0: 3}


def test_claim_skip_assumes_done(rig: RigFactory) -> None:
    r = rig(CrashingHandler("b"), processing={"mode": "claim", "on_uncertain": "skip"})
    result = crash_then_redeliver(r).process(BATCH)
    assert (result.stats.uncertain, result.stats.handled) == (3, 3)
    assert r.handler.ids == ["a", "b"]  # type: ignore[attr-defined]


def test_claim_retry_calls_again(rig: RigFactory) -> None:
    r = rig(CrashingHandler("b"), processing={"mode": "claim", "on_uncertain": "retry"})
    result = crash_then_redeliver(r).process(BATCH)
    assert result.stats.uncertain == 3
    assert r.handler.ids == ["a", "b", "a", "b", "c"]  # type: ignore[attr-defined]


def test_claim_reconcile_asks_downstream_and_calls_only_what_did_not_happen(
    rig: RigFactory,
) -> None:
    handler = CrashingHandler("b")
    r = rig(handler, processing={"mode": "claim", "on_uncertain": "reconcile"})
    result = crash_then_redeliver(r).process(BATCH)
    assert handler.reconciled == ["a", "b", "c"]
    assert handler.ids == ["a", "b", "b", "c"]  # "a" happened: not called again
    assert result.stats.handled == 3 and result.stats.uncertain == 3


def test_reconcile_policy_needs_a_reconcile_method(rig: RigFactory) -> None:
    with pytest.raises(ConfigError, match="reconcile"):
        rig(Recorder(), processing={"mode": "claim", "on_uncertain": "reconcile"})


def test_claims_of_undecided_events_are_released_on_stop(rig: RigFactory) -> None:
    r: Rig

    def stop_at_b(event: Event) -> None:
        if event.id == "b":
            r.engine.request_stop()
            raise RetryableError("503")

    r = rig(
        Recorder(stop_at_b),
        processing={"mode": "claim", "retry_backoff": "5s", "retry_backoff_max": "5s"},
    )
    result = r.engine.process(BATCH)
    assert result.commits == {TP0: 1}
    assert r.store is not None
    found = r.store.lookup(TP0, ["a", "b", "c"], int(r.clock() * 1000))
    assert [f.status if f else None for f in found] == [RecordStatus.HANDLED, None, None]


def test_plain_mode_writes_no_claims(rig: RigFactory) -> None:
    r = rig(CrashingHandler("b"))
    with pytest.raises(Crash):
        r.engine.process(BATCH)
    assert r.store is not None
    assert r.store.lookup(TP0, ["a", "b", "c"], int(r.clock() * 1000)) == [None] * 3


def test_a_young_claim_is_waited_out_for_its_lease(rig: RigFactory) -> None:
    r = rig(
        CrashingHandler("a"),
        processing={"mode": "claim", "on_uncertain": "skip", "claim_lease": "2s"},
    )
    with pytest.raises(Crash):
        r.engine.process(BATCH[:1])
    engine = r.restart()
    r.clock.now += 1.6  # the claim is 1.6 s old: 0.4 s of lease left
    started = time.monotonic()
    engine.process(BATCH[:1])
    assert time.monotonic() - started >= 0.35


class Ledger(Handler):
    """Keeps a balance per account in the store itself (transactional effects)."""

    def __init__(self, crash_on: str | None = None, fail_first: bool = False) -> None:
        self.crash_on = crash_on
        self.fail_first = fail_first
        self.calls = 0

    def handle(self, event: Event) -> None:
        self.calls += 1
        account = b"balance:" + (event.key or b"")
        balance = int(event.staged(account) or b"0") + 10
        event.stage(account, str(balance))
        event.stage(b"applied:" + event.id.encode(), b"1")
        if self.fail_first and event.attempt == 1:
            raise RetryableError("flaky")  # staged writes of a failed attempt are dropped
        if event.id == self.crash_on:
            raise Crash


def test_effects_commit_with_the_record_both_or_neither(rig: RigFactory) -> None:
    handler = Ledger(crash_on="c")
    r = rig(handler)
    msgs = [rec(0, "a", key=b"acct1"), rec(1, "b", key=b"acct1"), rec(2, "c", key=b"acct1")]
    with pytest.raises(Crash):
        r.engine.process(msgs)
    assert r.store is not None and r.store.effect(TP0, b"balance:acct1") is None  # neither
    engine = r.restart()
    handler.crash_on = None
    engine.process(msgs)
    engine.process(msgs)  # redelivered again: replays, no effect
    assert r.store is not None
    assert r.store.effect(TP0, b"balance:acct1") == b"30"  # both: each event applied once
    assert r.store.effect(TP0, b"applied:b") == b"1"


def test_failed_attempt_discards_its_staged_writes(rig: RigFactory) -> None:
    r = rig(Ledger(fail_first=True))
    r.engine.process([rec(0, "a", key=b"acct")])
    assert r.store is not None
    assert r.store.effect(TP0, b"balance:acct") == b"10"


def test_a_stop_never_erases_the_claim_of_an_uncertain_event(rig: RigFactory) -> None:
    import threading

    r = rig(
        CrashingHandler("b"),
        processing={"mode": "claim", "on_uncertain": "skip", "claim_lease": "5s"},
    )
    engine = crash_then_redeliver(r)
    threading.Timer(0.3, engine.request_stop).start()  # SIGTERM during the lease wait
    result = engine.process(BATCH)
    assert result.commits == {}
    assert r.store is not None
    found = r.store.lookup(TP0, ["a", "b", "c"], int(r.clock() * 1000))
    assert [f.status if f else None for f in found] == [RecordStatus.IN_PROGRESS] * 3
