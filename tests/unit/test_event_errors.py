"""An error on behalf of one event belongs to that event (issue 10, items 2 and 3).

Each test puts one poison message between good ones and checks that the good
ones are handled exactly once, across a restart, and that the poison ends as a
dead letter with the right reason instead of stopping the partition.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from dedupe_consumer import ConfigError, DeadLetterReason, Event, PermanentError
from dedupe_consumer.dead_letters import DeadLetter, MemoryDeadLetters, dead_letter_headers
from dedupe_consumer.errors import DeadLetterError
from dedupe_consumer.models import SourceMessage, TopicPartition
from dedupe_consumer.replay import Record
from dedupe_consumer.store import RecordStatus

from .conftest import TOPIC, Recorder, Rig, make_settings, rec

TP0 = TopicPartition(TOPIC, 0)
RigFactory = Callable[..., Rig]


def reasons(r: Rig) -> dict[int, str]:
    return {kept.message.offset() or 0: kept.letter.reason for kept in r.dead.letters}


def assert_moves_on(r: Rig, batch: list[Record], good: list[str]) -> None:
    """The batch decided through its last offset, good IDs once each, also after a restart."""
    result = r.engine.process(batch)
    assert result.error is None
    assert result.commits == {TP0: batch[-1].offset_ + 1}
    assert r.store is not None and r.store.watermark(TP0) == batch[-1].offset_
    r.restart().process(batch)  # redelivered after a restart: nothing runs again
    assert isinstance(r.handler, Recorder)
    assert sorted(r.handler.ids) == sorted(good)


# -- item 3: poison IDs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("poison", "why"),
    [
        (b'{"id": "\\ud800"}', "lone surrogate"),
        (json.dumps({"id": "\u20ac" * 200}).encode(), "600 bytes, only 200 characters"),
        (b'{"id": "a\\u001b[31mb"}', "control character (ANSI escape)"),
        (b'{"id": "line\\nbreak"}', "control character (newline)"),
    ],
)
def test_an_id_that_cannot_be_stored_is_dead_lettered_as_invalid_id(
    rig: RigFactory, poison: bytes, why: str
) -> None:
    r = rig(dedupe={"id_source": "json:/id"})
    batch = [rec(0, "a"), rec(1, None, value=poison), rec(2, "c")]
    assert_moves_on(r, batch, ["a", "c"])
    assert reasons(r) == {1: "invalid-id"}, why


def test_an_id_at_the_byte_limit_is_accepted(rig: RigFactory) -> None:
    r = rig(dedupe={"id_source": "json:/id"})
    long_id = "\u20ac" * 170 + "ab"  # 512 bytes
    assert_moves_on(r, [rec(0, None, value=json.dumps({"id": long_id}).encode())], [long_id])


def test_invalid_id_with_policy_hash_falls_back_to_the_payload_hash(rig: RigFactory) -> None:
    r = rig(dedupe={"id_source": "json:/id", "on_missing_id": "hash"})
    r.engine.process([rec(0, None, value=b'{"id": "\\udfff"}')])
    assert isinstance(r.handler, Recorder)
    assert len(r.handler.ids) == 1 and len(r.handler.ids[0]) == 64  # sha256 hex
    assert not r.dead.letters


class HeadersExplode(Record):
    """A message whose headers cannot be read at all."""

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        raise RuntimeError("headers are unreadable")


def test_an_id_source_that_raises_something_else_is_an_invalid_id(rig: RigFactory) -> None:
    r = rig()  # header:event-id
    bad = HeadersExplode(TOPIC, 0, 1, b"k", b"{}")
    assert_moves_on(r, [rec(0, "a"), bad, rec(2, "c")], ["a", "c"])
    assert reasons(r) == {1: "invalid-id"}


# -- item 2: errors on behalf of one event -----------------------------------------------


class Payment(BaseModel):
    id: str


class ParseRaises(Recorder):
    payload_model = Payment

    def parse(self, value: bytes | None) -> Any:
        if value is not None and b"boom" in value:
            raise TypeError("a parser bug that is not a ValueError")
        return super().parse(value)


def test_parse_raising_anything_dead_letters_invalid_payload(rig: RigFactory) -> None:
    r = rig(ParseRaises())
    batch = [rec(0, "a"), rec(1, "b", body={"id": "b", "boom": 1}), rec(2, "c")]
    assert_moves_on(r, batch, ["a", "c"])
    assert reasons(r) == {1: "invalid-payload"}
    assert r.dead.letters[0].letter.error_class == "TypeError"


def test_a_staged_effect_too_large_for_the_changelog_fails_at_stage_time(
    rig: RigFactory,
) -> None:
    class Stager(Recorder):
        def handle(self, event: Event) -> None:
            super().handle(event)
            size = 2_000_000 if event.id == "b" else 10
            event.stage(b"k:" + event.id.encode(), b"x" * size)

    r = rig(Stager(), processing={"max_retries": 2})
    result = r.engine.process([rec(0, "a"), rec(1, "b"), rec(2, "c")])
    assert result.error is None and result.commits == {TP0: 3}
    assert isinstance(r.handler, Recorder)
    assert r.handler.ids == ["a", "b", "b", "b", "c"]  # retried per policy, then dead-lettered
    assert reasons(r) == {1: "retries-exhausted"}
    assert "message.max.bytes" in r.dead.letters[0].letter.error_message
    assert r.store is not None
    assert {k for k, _ in r.store.effects(TP0)} == {b"k:a", b"k:c"}


def test_the_effect_bound_follows_the_producer_message_max_bytes(rig: RigFactory) -> None:
    class Stager(Recorder):
        def handle(self, event: Event) -> None:
            super().handle(event)
            event.stage(b"k", b"x" * 5000)

    r = rig(Stager(), kafka={"producer": {"message.max.bytes": 4000}})
    r.engine.process([rec(0, "a")])
    assert reasons(r) == {0: "retries-exhausted"}


def test_an_engine_error_on_behalf_of_one_event_dead_letters_it(rig: RigFactory) -> None:
    r = rig(dedupe={"id_source": "key"})
    bad = HeadersExplode(TOPIC, 0, 1, b"b", b"{}")  # the Event for the handler cannot be built
    assert_moves_on(r, [rec(0, "a"), bad, rec(2, "c")], ["a", "c"])
    assert reasons(r) == {1: "internal-error"}
    assert r.dead.letters[0].letter.error_class == "RuntimeError"


class RefusingDeadLetters(MemoryDeadLetters):
    """A dead-letter topic that refuses the letters of chosen offsets."""

    def __init__(self, refuse_on_send: set[int], refuse_on_flush: set[int]) -> None:
        super().__init__()
        self.refuse_on_send = refuse_on_send
        self.refuse_on_flush = refuse_on_flush
        self.queued: list[SourceMessage] = []

    def send(self, message: SourceMessage, letter: DeadLetter) -> None:
        if message.offset() in self.refuse_on_send:
            where = (message.topic() or "", message.partition() or 0, message.offset() or 0)
            raise DeadLetterError("refused", (where,))
        self.queued.append(message)
        super().send(message, letter)

    def flush(self) -> None:
        queued, self.queued = self.queued, []
        failed = tuple(
            (m.topic() or "", m.partition() or 0, m.offset() or 0)
            for m in queued
            if m.offset() in self.refuse_on_flush
        )
        if failed:
            raise DeadLetterError("flush refused", failed)


class Poison(Recorder):
    def handle(self, event: Event) -> None:
        super().handle(event)
        event.stage(b"seen:" + event.id.encode(), b"1")
        if event.id.startswith("poison"):
            raise PermanentError("bad")


@pytest.mark.parametrize("when", ["send", "flush"])
def test_a_dead_letter_that_cannot_be_sent_persists_the_prefix_then_stops(
    rig: RigFactory, when: str
) -> None:
    r = rig(Poison())
    r.dead = RefusingDeadLetters(
        {2} if when == "send" else set(), {2} if when == "flush" else set()
    )
    engine = r.restart()
    batch = [rec(0, "a"), rec(1, "b"), rec(2, "poison"), rec(3, "d")]
    result = engine.process(batch)
    assert isinstance(result.error, DeadLetterError)
    assert result.commits == {TP0: 2}  # exactly after the last event before the poison
    assert r.store is not None and r.store.watermark(TP0) == 1
    # A send that fails stops the walk at the poison; a flush that fails comes after
    # the walk: "d" was handled, and its record stays durable above the gap.
    handled = ["a", "b"] if when == "send" else ["a", "b", "d"]
    assert {k for k, _ in r.store.effects(TP0)} == {b"seen:" + i.encode() for i in handled}
    now = int(r.clock() * 1000)
    found = r.store.lookup(TP0, ["a", "b", "poison", "d"], now)
    assert [i for i, f in zip("ab?d", found, strict=True) if f] == [i[0] for i in handled]
    assert all(f.status is RecordStatus.HANDLED for f in found if f)

    r.dead.refuse_on_send, r.dead.refuse_on_flush = set(), set()  # the DLQ is fixed
    assert r.restart().process(batch).commits == {TP0: 4}
    assert isinstance(r.handler, Recorder)
    assert [i for i in r.handler.ids if i in "abd"] == ["a", "b", "d"]  # each once


# -- reconcile -----------------------------------------------------------------------------


class Crash(BaseException):
    pass


class Reconciling(Recorder):
    payload_model = Payment

    def __init__(self, reconcile: Callable[[Event], bool]) -> None:
        super().__init__()
        self.crash = True
        self._reconcile = reconcile
        self.reconciled: list[Event] = []

    def handle(self, event: Event) -> None:
        super().handle(event)
        if self.crash:
            raise Crash

    def reconcile(self, event: Event) -> bool:
        self.reconciled.append(event)
        return self._reconcile(event)


def uncertain_rig(rig: RigFactory, reconcile: Callable[[Event], bool]) -> Rig:
    """A rig whose event "a" (offset 0) is an in-progress claim left by a crash."""
    r = rig(Reconciling(reconcile), processing={"mode": "claim", "on_uncertain": "reconcile"})
    with pytest.raises(Crash):
        r.engine.process([rec(0, "a")])
    handler = r.handler
    assert isinstance(handler, Reconciling)
    handler.crash = False
    handler.calls.clear()
    r.restart()
    return r


def test_reconcile_gets_the_parsed_payload_and_can_stage(rig: RigFactory) -> None:
    def happened(event: Event) -> bool:
        assert isinstance(event.payload, Payment) and event.payload.id == "a"
        event.stage(b"reconciled", event.id)
        return True

    r = uncertain_rig(rig, happened)
    result = r.engine.process([rec(0, "a"), rec(1, "b")])
    assert result.error is None and result.commits == {TP0: 2}
    handler = r.handler
    assert isinstance(handler, Reconciling)
    assert [e.id for e in handler.reconciled] == ["a"]
    assert handler.ids == ["b"]
    assert r.store is not None and dict(r.store.effects(TP0)) == {b"reconciled": b"a"}


def test_reconcile_raising_is_retried_then_dead_lettered(rig: RigFactory) -> None:
    def broken(event: Event) -> bool:
        raise ConnectionError("downstream is down")

    r = uncertain_rig(rig, broken)
    result = r.engine.process([rec(0, "a"), rec(1, "b")])
    assert result.error is None and result.commits == {TP0: 2}
    handler = r.handler
    assert isinstance(handler, Reconciling)
    assert len(handler.reconciled) == 4  # max_retries = 3
    assert handler.ids == ["b"]
    assert reasons(r) == {0: "reconcile-failed"}
    assert r.dead.letters[0].letter.error_class == "ConnectionError"


# -- dead-letter metadata ------------------------------------------------------------------


def test_incoming_dlq_headers_cannot_spoof_the_dead_letter_metadata() -> None:
    message = Record(
        TOPIC,
        3,
        42,
        b"k",
        b"v",
        [("dlq.reason", b"uncertain"), ("DLQ.original.offset", b"7"), ("trace", b"t")],
        1_700_000_000_000,
    )
    headers = dead_letter_headers(
        message, DeadLetter(DeadLetterReason.PERMANENT_ERROR, "e", "E", "m", 1)
    )
    ours = [(k, v) for k, v in headers if k.lower().startswith("dlq.") and ".original-" not in k]
    assert dict(ours)["dlq.reason"] == b"permanent-error"
    assert [k for k, _ in ours].count("dlq.reason") == 1
    assert ("dlq.original.offset", b"42") in ours
    assert ("DLQ.original.offset", b"7") not in headers
    assert ("dlq.original-header.dlq.reason", b"uncertain") in headers
    assert ("dlq.original-header.DLQ.original.offset", b"7") in headers
    assert ("trace", b"t") in headers


# -- claim_lease and the walk budget -------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_lease_wait_never_runs_past_the_walk_budget(rig: RigFactory) -> None:
    r = rig(
        Reconciling(lambda e: True),
        processing={"mode": "claim", "on_uncertain": "skip", "claim_lease": "4m"},
    )
    with pytest.raises(Crash):
        r.engine.process([rec(0, "a")])
    assert isinstance(r.handler, Reconciling)
    r.handler.crash = False
    engine = r.restart()
    engine.walk_budget_s = 0.3
    result = engine.process([rec(0, "a"), rec(1, "b")])
    # Four minutes of lease were not waited (the timeout above fails the test): the walk
    # was cut at the young claim, to be re-read.
    assert result.rewind == {TP0: 0} and result.commits == {}
    r.clock.now += 300  # the lease has run out: the claim is now uncertain and resolved
    assert engine.process([rec(0, "a"), rec(1, "b")]).commits == {TP0: 2}


def test_a_claim_lease_as_long_as_the_poll_interval_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        make_settings(
            tmp_path,
            processing={"mode": "claim", "claim_lease": "10s"},
            kafka={"consumer": {"max.poll.interval.ms": 10_000}},
        )
    assert "processing.claim_lease" in str(refused.value)
    assert "max.poll.interval.ms" in str(refused.value)
    make_settings(tmp_path, processing={"mode": "plain", "claim_lease": "10m"})  # unused: fine
