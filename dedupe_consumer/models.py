"""The data that flows through the engine: source messages, events, decisions.

``SourceMessage`` is a structural protocol that a confluent-kafka ``Message``
already satisfies, so the Kafka source hands its messages to the engine without
copying them; the replay source implements the same seven methods. Only events
that reach the handler are turned into an :class:`Event`.
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import structlog

if TYPE_CHECKING:
    from dedupe_consumer.effects import Effects, OutputHeaders
    from dedupe_consumer.payloads import CloudEvent

_log = structlog.get_logger("dedupe_consumer")

RawHeaders = dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]] | None
"""Headers as confluent-kafka types them (at run time always a list of pairs)."""


class TopicPartition(NamedTuple):
    """A source partition: the unit of ordering, of the watermark and of dedupe scope."""

    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]"


class SourceMessage(Protocol):
    """What the engine reads from a message (the confluent-kafka ``Message`` shape)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | str | None: ...
    def value(self) -> bytes | str | None: ...
    def headers(self) -> RawHeaders: ...
    def timestamp(self) -> tuple[int, int]: ...


class Decision(enum.StrEnum):
    """How one consumed offset ended. Every offset ends as exactly one of these.

    The values are the ``decision`` label of ``dedupe_events_total``. What the store
    keeps for an event ID is an ID record with a status, a different thing: only
    ``handled`` and ``dead_lettered`` leave one (``store.base.RECORDED_AS``).
    """

    HANDLED = "handled"
    """The handler completed (or, for an uncertain outcome, ``reconcile`` or
    ``on_uncertain = "skip"`` said it had)."""
    DUPLICATE = "duplicate"
    """An ID already decided, with the same payload digest: skipped."""
    CONFLICT = "conflict"
    """A duplicate ID whose payload digest differs from the first one seen, skipped
    (``dedupe.on_conflict = "skip"``); a dead-lettered one is ``DEAD_LETTERED``."""
    REPLAY = "replay"
    """An offset at or below the partition's durable watermark: already decided."""
    DEAD_LETTERED = "dead_lettered"
    """Sent to the dead-letter topic; why is a :class:`DeadLetterReason`."""


class DeadLetterReason(enum.StrEnum):
    """Why an event was dead-lettered: the ``dlq.reason`` header of its dead letter.

    The values are also the ``reason`` label of ``dedupe_dead_letters_total`` and
    the keys of :attr:`BatchStats.by_reason`; they never change.
    """

    MISSING_ID = "missing-id"
    """No event ID where ``dedupe.id_source`` points (absent or empty). With
    ``json:...``: valid JSON without the field."""
    INVALID_ID = "invalid-id"
    """An ID that cannot be stored: not UTF-8 (or a lone surrogate), over 512 bytes in
    UTF-8, or control characters; also an ID extractor that raised anything else."""
    INVALID_PAYLOAD = "invalid-payload"
    """The value is not JSON while ``id_source`` is ``json:...``, or ``Handler.parse``
    (``Handler.validate`` for a decoded record) rejected it (anything it raises); or it
    cannot be decoded as ``payload.format`` (not the wire format, or not matching its
    schema); or a CloudEvent the spec forbids (no ``type``, a bad ``time``, an envelope
    that is not JSON). Never retried."""
    PERMANENT_ERROR = "permanent-error"
    """The handler raised ``PermanentError``."""
    RETRIES_EXHAUSTED = "retries-exhausted"
    """The handler kept failing: ``processing.max_retries`` retries, then this."""
    CONFLICTING_DUPLICATE = "conflicting-duplicate"
    """The ID was decided before with another payload, and ``dedupe.on_conflict`` is
    ``"dead-letter"`` (the default)."""
    UNCERTAIN = "uncertain"
    """Claim mode: a claim was found in progress (the handler may or may not have
    completed) and ``processing.on_uncertain`` is ``"dead-letter"``."""
    RECONCILE_FAILED = "reconcile-failed"
    """Claim mode with ``on_uncertain = "reconcile"``: ``Handler.reconcile`` raised
    ``PermanentError`` or kept failing."""
    OUTPUT_FAILED = "output-failed"
    """An output could not be produced: ``event.emit`` (or the reply to a response)
    named a topic that does not exist (and ``processing.create_output_topics`` is
    false), one of this library's own, or a message too large, on every attempt; or
    the reply to a duplicate (``processing.reply_on_duplicate``) could not be sent."""
    RESPONSE_TOO_LARGE = "response-too-large"
    """``handle`` returned a response over ``dedupe.max_response_bytes`` (or of a type
    that cannot be stored). Not retried: the handler would answer the same."""
    UNKNOWN_SCHEMA = "unknown-schema"
    """``payload.format`` is a Schema Registry format and the registry does not know the
    schema ID the record names (HTTP 404). Not retried: the record cannot be read."""
    INTERNAL_ERROR = "internal-error"
    """An unexpected error while deciding the event, not the handler's (logged with a
    traceback as ``event_failed``)."""


@dataclass(slots=True)
class Event:
    """One unseen event, as the handler sees it.

    Not frozen on purpose: a frozen dataclass pays an ``object.__setattr__`` per
    field on every construction, and one Event is built per handled message.
    """

    id: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp: datetime | None
    payload: Any = None
    """The value parsed into the handler's ``payload_model``; without one, the decoded
    record (``payload.format`` other than 'raw', or a structured CloudEvent's JSON data),
    else ``None``."""
    attempt: int = 1
    """1 on the first call, 2 on the first retry, and so on."""
    cloudevent: CloudEvent | None = None
    """Its CloudEvent attributes (type, subject, time, ...) with ``dedupe.id_source =
    "cloudevents"``; None otherwise."""
    effects: Effects | None = field(default=None, compare=False, repr=False)
    """This call's transactional effects; see :meth:`stage`."""

    def stage(self, key: bytes | str, value: bytes | str | None) -> None:
        """Stage a write that commits atomically with this event's dedupe record.

        Both or neither: if the process dies before the batch is persisted, the
        write is lost together with the record and the event is handled again.
        """
        if self.effects is None:
            raise RuntimeError("this event was not created by the engine: nothing to stage into")
        self.effects.stage(key, value)

    def emit(
        self,
        topic: str,
        value: bytes | str | None,
        key: bytes | str | None = None,
        headers: OutputHeaders | None = None,
    ) -> None:
        """Produce a message to ``topic`` exactly once: in the Kafka transaction that
        persists this event's decision, so it exists if and only if the decision does.

        A failed attempt's outputs are dropped with its staged writes. Readers of
        ``topic`` see it only with ``isolation.level = read_committed``. Needs
        ``store.changelog = true`` (the transaction is the changelog's). Raises
        ``ValueError`` for a topic that does not exist or a message too large: the
        attempt fails like any (retried, then dead-lettered).
        """
        if self.effects is None:
            raise RuntimeError("this event was not created by the engine: nothing to emit into")
        self.effects.emit(topic, value, key, headers)

    def staged(self, key: bytes | str) -> bytes | None:
        """Read a staged value of this partition: this call's, then those of earlier
        events of its lane in this batch (same key under ``ordering = "key"``, the whole
        partition under ``"partition"``), then the persisted one."""
        if self.effects is None:
            raise RuntimeError("this event was not created by the engine: nothing to read")
        return self.effects.get(key)

    def header(self, name: str) -> bytes | None:
        """The last header called ``name`` (Kafka allows repeats; the last one wins)."""
        for key, value in reversed(self.headers):
            if key == name:
                return value
        return None


@dataclass(slots=True)
class BatchStats:
    """Counts of decisions; the sum of the decision counts equals ``consumed``."""

    consumed: int = 0
    handled: int = 0
    duplicates: int = 0
    conflicts: int = 0
    replays: int = 0
    dead_lettered: int = 0
    by_reason: dict[DeadLetterReason, int] = field(default_factory=dict)
    """Dead-lettered offsets per reason; they sum to ``dead_lettered``."""
    uncertain: int = 0
    """Claims found in progress (claim mode); counted apart: each also ends as a decision."""

    def add(self, decision: Decision) -> None:
        self.consumed += 1
        if decision is Decision.HANDLED:
            self.handled += 1
        elif decision is Decision.DUPLICATE:
            self.duplicates += 1
        elif decision is Decision.CONFLICT:
            self.conflicts += 1
        elif decision is Decision.REPLAY:
            self.replays += 1
        else:
            self.dead_lettered += 1

    def by_decision(self) -> dict[Decision, int]:
        """The decision counts keyed by :class:`Decision`; they sum to ``consumed``."""
        return {
            Decision.HANDLED: self.handled,
            Decision.DUPLICATE: self.duplicates,
            Decision.CONFLICT: self.conflicts,
            Decision.REPLAY: self.replays,
            Decision.DEAD_LETTERED: self.dead_lettered,
        }

    def merge(self, other: BatchStats) -> None:
        self.consumed += other.consumed
        self.handled += other.handled
        self.duplicates += other.duplicates
        self.conflicts += other.conflicts
        self.replays += other.replays
        self.dead_lettered += other.dead_lettered
        self.uncertain += other.uncertain
        for reason, count in other.by_reason.items():
            self.by_reason[reason] = self.by_reason.get(reason, 0) + count


def message_timestamp(message: SourceMessage) -> datetime | None:
    kind, ms = message.timestamp()
    if kind == 0 or ms < 0:  # TIMESTAMP_NOT_AVAILABLE
        return None
    return timestamp_of(ms)


def timestamp_of(ms: int) -> datetime | None:
    """A Kafka timestamp (ms since the epoch) as an aware UTC datetime, None if out of range."""
    try:
        return datetime.fromtimestamp(ms / 1000, tz=UTC)
    except (ValueError, OverflowError, OSError):  # a producer-set time past year 9999
        return None


def header_pairs(message: SourceMessage) -> list[tuple[str, bytes | None]]:
    """Headers as ``(name, bytes)`` pairs, in order, repeats kept."""
    try:
        raw: RawHeaders = _read_headers(message)
    except (SystemError, UnicodeDecodeError):
        raw = _drop_undecodable_headers(message)
    if not raw:
        return []
    if isinstance(raw, list):
        # confluent-kafka (and the replay Record) give (str, bytes | None) pairs: no copy.
        return raw  # type: ignore[return-value]
    items = raw.items() if isinstance(raw, dict) else raw
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in items]


def as_bytes(data: bytes | str | None) -> bytes | None:
    if data is None or isinstance(data, bytes):
        return data
    return data.encode()


_read_headers = operator.methodcaller("headers")
"""``message.headers()`` through the C API: a plain call site, once CPython specializes it,
skips the check that turns confluent-kafka's half-failed header decoding into an error,
and returns a list holding a NULL name that crashes the interpreter when read."""


def _drop_undecodable_headers(message: SourceMessage) -> RawHeaders:
    """Headers without the ones whose *name* is not UTF-8 (a foreign producer's).

    confluent-kafka decodes header names as UTF-8 without checking the result:
    the first ``headers()`` call raises ``SystemError`` (from a UnicodeDecodeError)
    and caches a list whose bad entries hold a NULL name, which crashes the
    interpreter when read. ``repr`` is the one safe way to spot them (it prints
    ``<NULL>``); the cleaned list replaces the cache, so every later reader
    (ID extraction, the handler's Event, dead letters) sees the same headers.
    """
    cached = message.headers()  # the second call returns the cached, broken list
    if not isinstance(cached, list):
        return cached
    kept = [pair for pair in cached if not repr(pair).startswith("(<NULL>,")]
    set_headers = getattr(message, "set_headers", None)
    if set_headers is not None:
        set_headers(kept)
    dropped = len(cached) - len(kept)
    _log.warning(
        "header_names_not_utf8",
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
        dropped=dropped,
        note="headers whose name is not UTF-8 are ignored",
    )
    return kept
