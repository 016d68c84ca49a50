"""One vocabulary: the enums' values are what reaches headers, metric labels and the store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dedupe_consumer import DeadLetterReason, Decision, Event, PermanentError, RetryableError
from dedupe_consumer.dead_letters import dead_letter_headers
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.observability import Metrics
from dedupe_consumer.store import RECORDED_AS, RecordStatus

from .conftest import TOPIC, Recorder, Rig, rec

TP0 = TopicPartition(TOPIC, 0)

PUBLISHED_REASONS = {
    "missing-id",
    "invalid-id",
    "invalid-payload",
    "permanent-error",
    "retries-exhausted",
    "conflicting-duplicate",
    "uncertain",
    "reconcile-failed",
    "internal-error",
    "output-failed",
    "response-too-large",
    "unknown-schema",
}
"""The ``dlq.reason`` values users' DLQ consumers, dashboards and alerts match on."""


class Picky(Recorder):
    """Rejects one value in ``parse``; fails for good on ``p``, every time on ``r``."""

    def parse(self, value: bytes | None) -> Any:
        if value == b"not-parseable":
            raise ValueError("not the expected shape")
        return None

    def handle(self, event: Event) -> None:
        super().handle(event)
        if event.id == "p":
            raise PermanentError("refused")
        if event.id == "r":
            raise RetryableError("down")


def samples(metrics: Metrics, name: str, label: str) -> dict[str, float]:
    return {
        sample.labels[label]: sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    }


def test_reason_values_are_the_published_ones() -> None:
    assert {reason.value for reason in DeadLetterReason} == PUBLISHED_REASONS
    assert all(str(reason) == reason.value for reason in DeadLetterReason)


def test_headers_labels_and_counts_carry_the_enum_values(rig: Callable[..., Rig]) -> None:
    r = rig(Picky(), processing={"max_retries": 1})
    r.engine.process([rec(0, "a", body={"amount": 1})])
    result = r.engine.process(
        [
            rec(1, None),
            rec(2, "p"),
            rec(3, "r"),
            rec(4, "a", body={"amount": 2}),
            rec(5, "bad", value=b"not-parseable"),
        ]
    )
    expected = {
        DeadLetterReason.MISSING_ID,
        DeadLetterReason.PERMANENT_ERROR,
        DeadLetterReason.RETRIES_EXHAUSTED,
        DeadLetterReason.CONFLICTING_DUPLICATE,
        DeadLetterReason.INVALID_PAYLOAD,
    }

    letters = r.dead.letters
    assert [type(kept.letter.reason) for kept in letters] == [DeadLetterReason] * 5
    assert {kept.letter.reason for kept in letters} == expected
    for kept in letters:
        headers = dict(dead_letter_headers(kept.message, kept.letter))
        assert headers["dlq.reason"] == kept.letter.reason.value.encode()

    assert result.stats.by_reason == dict.fromkeys(expected, 1)
    metrics = r.engine.metrics
    # Every reason and decision is a series from the assignment on (0 until it happens).
    reasons = samples(metrics, "dedupe_dead_letters_total", "reason")
    assert set(reasons) == {reason.value for reason in DeadLetterReason}
    assert {k: v for k, v in reasons.items() if v} == {reason.value: 1.0 for reason in expected}
    decisions = samples(metrics, "dedupe_events_total", "decision")
    assert set(decisions) == {decision.value for decision in Decision}
    assert {k: v for k, v in decisions.items() if v} == {
        Decision.HANDLED.value: 1.0,
        Decision.DEAD_LETTERED.value: 5.0,
    }


def test_decisions_map_to_the_record_their_id_keeps(rig: Callable[..., Rig]) -> None:
    assert dict(RECORDED_AS) == {
        Decision.HANDLED: RecordStatus.HANDLED,
        Decision.DEAD_LETTERED: RecordStatus.DEAD_LETTERED,
    }
    r = rig(Picky())
    r.engine.process([rec(0, "a"), rec(1, "p"), rec(2, "a")])
    assert r.store is not None
    found = r.store.lookup(TP0, ["a", "p"], int(r.clock() * 1000))
    assert [f.status if f else None for f in found] == [
        RecordStatus.HANDLED,
        RecordStatus.DEAD_LETTERED,
    ]
    assert [f.offset if f else None for f in found] == [0, 1]  # a duplicate writes no record
