"""Redrive without a broker: a letter's headers read back, and the engine's one exception."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from types import SimpleNamespace

import pytest

from dedupe_consumer import DeadLetterReason, Event, PermanentError
from dedupe_consumer.dead_letters import REDRIVE_HEADER, DeadLetter, dead_letter_headers
from dedupe_consumer.dlq import LetterFilter, parse_letter
from dedupe_consumer.replay import Record

from .conftest import TOPIC, Recorder, Rig, rec


def test_a_letter_reads_back_what_it_was_and_why() -> None:
    original = Record(
        TOPIC,
        3,
        41,
        b"k",
        b"v",
        [("event-id", b"e-1"), ("dlq.reason", b"forged"), ("trace", None)],
        1_700_000_000_000,
    )
    letter = DeadLetter(DeadLetterReason.PERMANENT_ERROR, "e-1", "PermanentError", "no", 2)
    headers = dead_letter_headers(original, letter)
    written = Record("payments.dlq", 0, 7, b"k", b"v", headers, 1_700_000_100_000)
    parsed = parse_letter(written)
    assert parsed is not None
    assert (parsed.reason, parsed.event_id, parsed.attempts) == ("permanent-error", "e-1", 2)
    assert (parsed.original_topic, parsed.original_partition, parsed.original_offset) == (
        TOPIC,
        3,
        41,
    )
    # The original headers come back as they were, in order, the forged dlq.* one included.
    assert parsed.headers == (("event-id", b"e-1"), ("dlq.reason", b"forged"), ("trace", None))
    assert parsed.redrive_headers()[-1] == (REDRIVE_HEADER, b"payments.dlq/0/7")
    assert parsed.incomplete is None
    assert LetterFilter(reasons={"permanent-error"}, topic=TOPIC, partition=3)(parsed)
    assert not LetterFilter(event_ids={"other"})(parsed)
    shrunk = dead_letter_headers(original, letter, value_omitted=10)
    cut = parse_letter(Record("payments.dlq", 0, 8, b"k", None, shrunk, 0))
    assert cut is not None and cut.incomplete == "its value left out (too large)"
    assert parse_letter(Record("payments.dlq", 0, 9, None, b"x", [], 0)) is None


def redriven(offset: int, event_id: str) -> Record:
    plain = rec(offset, event_id)
    return replace(plain, headers_=[*plain.headers_, (REDRIVE_HEADER, b"payments.dlq/0/1")])


def test_only_a_dead_lettered_id_is_handled_again_when_redriven(rig: Callable[..., Rig]) -> None:
    def refuse(event: Event) -> None:
        if event.id == "bad" and event.attempt and refusing:
            raise PermanentError("no")

    refusing = True
    handler = Recorder(refuse)
    r = rig(handler)
    first = r.engine.process([rec(0, "bad"), rec(1, "good")])
    assert (first.stats.dead_lettered, first.stats.handled) == (1, 1)
    refusing = False
    again = r.engine.process([rec(2, "bad"), redriven(3, "good"), redriven(4, "bad")])
    # A plain copy of a dead-lettered ID is a duplicate; a redriven copy of a handled
    # one too; a redriven copy of the dead-lettered one is handled, once.
    assert (again.stats.duplicates, again.stats.handled) == (2, 1)
    assert handler.ids == ["bad", "good", "bad"]
    twice = r.engine.process([redriven(5, "bad")])
    assert (twice.stats.duplicates, twice.stats.handled) == (1, 0)


def test_listing_a_growing_transactional_dlq_ends_at_the_end_it_saw(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dead-letter topic written transactionally (or shared with a transactional
    writer) ends each transaction with a commit marker: the high watermark taken at the
    start is one past a marker, so the record at ``end - 1`` never arrives. While the
    topic keeps growing (a dead-letter storm: when ``dlq list`` is run), librdkafka never
    reports a partition end either, and the records at or past ``end`` are skipped
    without closing the partition: ``dlq list``/``redrive`` spin until their deadline,
    then fail. A record at or past the end seen at the start must close the partition."""
    from dedupe_consumer.dlq import cli as dlq_cli
    from dedupe_consumer.kafka import recording

    letter = DeadLetter(DeadLetterReason.PERMANENT_ERROR, "e-1", "PermanentError", "no", 1)

    def at(offset: int) -> Record:
        original = Record(TOPIC, 0, offset, b"k", b"v", [("event-id", b"e-1")], 0)
        return Record(
            "payments.dlq", 0, offset, b"k", b"v", dead_letter_headers(original, letter), 0
        )

    clock = [0.0]

    class GrowingReader:
        def __init__(self, *_: object) -> None:
            self.next = 0

        def partition_count(self, *_: object) -> int:
            return 1

        def watermarks(self, *_: object) -> tuple[int, int]:
            return (0, 2)  # the letter at 0, its commit marker at 1

        def assign(self, *_: object) -> None:
            pass

        def read(self, *_: object) -> Iterator[Record]:
            clock[0] += 1.0
            if self.next < 1000:  # more letters (and markers) keep coming: no EOF
                yield at(self.next)
                self.next += 2

        def close(self) -> None:
            pass

    monkeypatch.setattr(recording, "TopicReader", GrowingReader)
    monkeypatch.setattr(recording, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    settings = SimpleNamespace(
        processing=SimpleNamespace(dead_letter_topic="payments.dlq"),
        kafka=SimpleNamespace(
            connection=lambda: SimpleNamespace(bootstrap_servers="x", properties={})
        ),
    )
    letters = list(dlq_cli._letters(settings))  # type: ignore[arg-type]
    assert [x.offset for x in letters if x is not None] == [0]
