"""What a replay found: counts, and the two failures that matter.

A replay passes when no event ID was handled more than once and no event was
lost. Both are checked from evidence *outside* the engine's own counters --
the handler's successful calls, the dead letters, the committed positions and
the store -- because a report that only repeats the engine's counters could
not catch a bug in the engine.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dedupe_consumer.dead_letters import KeptDeadLetter
from dedupe_consumer.models import DeadLetterReason, TopicPartition
from dedupe_consumer.replay.records import Record

DEFAULT_MAX_DEAD_LETTERED = 0.5
"""A replay in which more than this share of events was dead-lettered fails by default."""

DecidedLookup = Callable[[TopicPartition, Sequence[str]], list[bool]]
"""For a partition's IDs: does the store hold a durable decision for each?"""


@dataclass(frozen=True, slots=True)
class LostEvent:
    """An event of the recording that did not end as a durable decision."""

    partition: int
    offset: int
    event_id: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "offset": self.offset,
            "event_id": self.event_id,
            "reason": self.reason,
        }


@dataclass(slots=True)
class Audit:
    """The checks of :func:`audit`, before the engine's counters are added."""

    unique_ids: set[str] = field(default_factory=set)
    handled_ids: set[str] = field(default_factory=set)
    dead_lettered_ids: set[str] = field(default_factory=set)
    handled_more_than_once: dict[str, int] = field(default_factory=dict)
    lost: list[LostEvent] = field(default_factory=list)
    missing_id: int = 0


def audit(
    records: Sequence[Record],
    event_ids: Sequence[str | None],
    handler_calls: Mapping[str, int],
    dead_letters: Iterable[KeptDeadLetter],
    committed: Mapping[TopicPartition, int],
    decided: DecidedLookup,
) -> Audit:
    """Check a finished replay against invariants 3 (once per ID) and 4 (nothing lost).

    ``event_ids[i]`` is the ID of ``records[i]`` (None: it has none);
    ``handler_calls`` counts *successful* handler calls per ID; ``committed``
    is the next offset per partition the loop committed.

    An event is lost when its offset is not below the committed position
    (never decided), when its ID was neither handled nor dead-lettered or has
    no decision in the store, or when it had no ID and was not dead-lettered.
    """
    result = Audit()
    result.handled_ids = {event_id for event_id, n in handler_calls.items() if n > 0}
    result.handled_more_than_once = {
        event_id: n for event_id, n in sorted(handler_calls.items()) if n > 1
    }
    lettered_offsets: set[tuple[int, int]] = set()
    for kept in dead_letters:
        lettered_offsets.add((kept.message.partition() or 0, kept.message.offset() or 0))
        if kept.letter.event_id is not None:
            result.dead_lettered_ids.add(kept.letter.event_id)

    accounted = result.handled_ids | result.dead_lettered_ids
    to_check: dict[TopicPartition, dict[str, Record]] = {}
    for record, event_id in zip(records, event_ids, strict=True):
        tp = TopicPartition(record.topic_, record.partition_)
        if event_id is None:
            result.missing_id += 1
        else:
            result.unique_ids.add(event_id)
        if record.offset_ >= committed.get(tp, 0):
            result.lost.append(
                _lost(record, event_id, "never decided: not below the committed offset")
            )
        elif event_id is None:
            if (record.partition_, record.offset_) not in lettered_offsets:
                result.lost.append(_lost(record, None, "no event ID and not dead-lettered"))
        elif event_id not in to_check.setdefault(tp, {}):
            to_check[tp][event_id] = record  # an ID is checked at its first offset only
            if event_id not in accounted:
                result.lost.append(_lost(record, event_id, "neither handled nor dead-lettered"))

    for tp, first_seen in to_check.items():
        ids = list(first_seen)
        for event_id, durable in zip(ids, decided(tp, ids), strict=True):
            if not durable:
                result.lost.append(
                    _lost(first_seen[event_id], event_id, "no durable decision in the store")
                )
    result.lost.sort(key=lambda lost: (lost.partition, lost.offset))
    return result


def _lost(record: Record, event_id: str | None, reason: str) -> LostEvent:
    return LostEvent(record.partition_, record.offset_, event_id, reason)


@dataclass(slots=True)
class ReplayReport:
    """The result of :func:`~dedupe_consumer.replay.replay_recording`.

    ``events`` counts the offsets fed to the engine (injected copies included,
    redeliveries not); ``deliveries`` counts every offset the engine decided,
    so with redelivered batches it is twice ``events`` and the second half are
    ``replays``.
    """

    recording: str
    topic: str
    events: int
    injected: int
    deliveries: int
    handled: int
    duplicates: int
    replays: int
    conflicting: int
    dead_lettered: int
    missing_id: int
    unique_ids: set[str]
    handled_ids: set[str]
    dead_lettered_ids: set[str]
    handled_more_than_once: dict[str, int]
    lost: list[LostEvent]
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    ids_in_several_partitions: set[str] = field(default_factory=set)
    """Dedupe is per partition: such an ID is handled once *per partition*. Showing
    them explains a ``handled_more_than_once`` that is a producer keying problem."""
    error: str | None = None
    """Set when the run stopped early (e.g. ``on_missing_id = "fail"``)."""
    seconds: float = 0.0
    max_dead_lettered: float = DEFAULT_MAX_DEAD_LETTERED
    """Above this share of dead-lettered events the replay tested too little to pass."""

    @property
    def tested_nothing(self) -> str | None:
        """Why this replay proves too little to pass, or None.

        A replay whose events were all dead-lettered (an ``id_source`` that does not
        match the recording, a payload model that rejects everything) has no ID
        handled twice and nothing lost, yet tested nothing.
        """
        if self.events == 0:
            return "the recording holds no events"
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.dead_letter_reasons.items()))
        hint = ""
        if self.dead_letter_reasons.get(DeadLetterReason.MISSING_ID):
            hint = (
                "; 'missing-id' means dedupe.id_source does not find an ID in these "
                "events: pass settings (or --config) with the id_source the topic needs"
            )
        if self.handled == 0:
            return (
                f"no event was handled: {self.dead_lettered} of {self.events} were "
                f"dead-lettered ({reasons or 'none'}){hint}"
            )
        if self.dead_lettered > self.max_dead_lettered * self.events:
            return (
                f"{self.dead_lettered} of {self.events} events were dead-lettered ({reasons}), "
                f"more than the allowed share {self.max_dead_lettered:g}{hint}; raise "
                "max_dead_lettered (--max-dead-lettered) if that is what the test expects"
            )
        return None

    @property
    def ok(self) -> bool:
        """No ID handled twice, nothing lost, the run was not cut short, and it tested
        something (see :attr:`tested_nothing`)."""
        return (
            not self.handled_more_than_once
            and not self.lost
            and self.error is None
            and self.tested_nothing is None
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary. ID sets appear as counts: a recording may hold millions."""
        return {
            "ok": self.ok,
            "recording": self.recording,
            "topic": self.topic,
            "events": self.events,
            "injected": self.injected,
            "deliveries": self.deliveries,
            "handled": self.handled,
            "duplicates": self.duplicates,
            "replays": self.replays,
            "conflicting": self.conflicting,
            "dead_lettered": self.dead_lettered,
            "dead_letter_reasons": dict(sorted(self.dead_letter_reasons.items())),
            "missing_id": self.missing_id,
            "unique_ids": len(self.unique_ids),
            "handled_ids": len(self.handled_ids),
            "dead_lettered_ids": len(self.dead_lettered_ids),
            "handled_more_than_once": dict(sorted(self.handled_more_than_once.items())),
            "ids_in_several_partitions": sorted(self.ids_in_several_partitions),
            "lost": [lost.to_dict() for lost in self.lost],
            "error": self.error,
            "tested_nothing": self.tested_nothing,
            "seconds": round(self.seconds, 3),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
