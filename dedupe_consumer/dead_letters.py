"""Dead letters: what did not become an effect, and why, kept outside the stream.

A dead letter carries the original key, value and headers plus ``dlq.*``
headers that say where it came from and why it was set aside, so it can be
inspected or re-driven later without consulting any other system. An incoming
header whose name starts with ``dlq.`` is renamed ``dlq.original-header.<name>``
so that no message can pass off its own metadata as ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dedupe_consumer.models import DeadLetterReason, SourceMessage, as_bytes, header_pairs
from dedupe_consumer.scope import is_by_id_topic, split_origin

OUR_HEADER_PREFIX = "dlq."
MOVED_HEADER_PREFIX = "dlq.original-header."
"""An original header whose name starts with ``dlq.`` is kept under this prefix."""
REDRIVE_HEADER = "dedupe.redrive"
"""On a redriven copy of a dead letter (``dedupe-consumer dlq redrive``): the letter's
``<topic>/<partition>/<offset>``. An ID whose record says dead-lettered is handled once
more when a copy carries it (an ID that was handled stays a duplicate)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One event set aside: why, and what to tell whoever inspects it (the ``dlq.*`` headers)."""

    reason: DeadLetterReason
    event_id: str | None
    error_class: str
    error_message: str
    attempts: int
    traceparent: str | None = None
    """With tracing on: the W3C ``traceparent`` of the event's span. The letter carries it
    as its ``traceparent`` header (the event's own, if any, moves to
    ``dlq.original.traceparent``), so the letter, and a redrive of it, join the trace."""


def dead_letter_headers(
    message: SourceMessage,
    letter: DeadLetter,
    *,
    value_omitted: int | None = None,
    originals_omitted: bool = False,
) -> list[tuple[str, str | bytes | None]]:
    """The original headers (``dlq.*`` ones moved aside) followed by the ``dlq.*`` headers.

    ``value_omitted``: the letter goes without its value, which was this many bytes
    (too large for the dead-letter topic); ``dlq.original.*`` say where it still is.
    ``originals_omitted``: the original key and headers are left out too (still too
    large without the value); ``dlq.key.omitted`` and ``dlq.headers.omitted`` say so.
    """
    kind, ts = message.timestamp()
    topic, partition, offset = message.topic() or "", message.partition(), message.offset()
    stamp: int | None = ts if kind else -1
    own = header_pairs(message)
    by_id: dict[str, str] = {}
    if is_by_id_topic(topic):  # topic scope: say where it was sent, and where the copy is
        stripped, origin = split_origin(own)
        if origin is not None:
            by_id = {
                "dlq.by-id.topic": topic,
                "dlq.by-id.partition": str(partition),
                "dlq.by-id.offset": str(offset),
            }
            own = list(stripped)
            topic, partition, offset, stamp = origin
    extra = {
        "dlq.reason": letter.reason,
        "dlq.original.topic": topic,
        "dlq.original.partition": str(partition),
        "dlq.original.offset": str(offset),
        "dlq.original.timestamp": str(-1 if stamp is None else stamp),
        **by_id,
        "dlq.event.id": letter.event_id or "",
        "dlq.error.class": letter.error_class,
        "dlq.error.message": letter.error_message[:2000],
        "dlq.attempts": str(letter.attempts),
    }
    if value_omitted is not None:
        extra["dlq.value.omitted"] = "too-large"
        extra["dlq.value.size"] = str(value_omitted)
    if letter.traceparent is not None:
        theirs = [v for name, v in own if name.lower() == "traceparent"]
        if theirs:
            extra["dlq.original.traceparent"] = (as_bytes(theirs[-1]) or b"").decode(
                "utf-8", "replace"
            )
            own = [(name, v) for name, v in own if name.lower() != "traceparent"]
        own = [*own, ("traceparent", letter.traceparent.encode())]
    original: list[tuple[str, str | bytes | None]] = [
        (MOVED_HEADER_PREFIX + name if name.lower().startswith(OUR_HEADER_PREFIX) else name, value)
        for name, value in own
    ]
    if originals_omitted:
        key = as_bytes(message.key())
        extra["dlq.key.omitted"] = "too-large"
        extra["dlq.key.size"] = str(len(key or b""))
        extra["dlq.headers.omitted"] = "too-large"
        extra["dlq.headers.size"] = str(
            sum(len(name.encode()) + len(as_bytes(value) or b"") for name, value in original)
        )
        original = []
    return [*original, *((k, v.encode()) for k, v in extra.items())]


class DeadLetterSink(Protocol):
    def send(self, message: SourceMessage, letter: DeadLetter) -> None:
        """Queue a dead letter; it need not be durable until :meth:`flush` returns."""

    def flush(self) -> None:
        """Block until every queued dead letter is durable, or raise DeadLetterError."""


@dataclass(slots=True)
class KeptDeadLetter:
    message: SourceMessage
    letter: DeadLetter


class MemoryDeadLetters:
    """Keeps dead letters in a list: the sink of replays, where no Kafka is involved."""

    def __init__(self) -> None:
        self.letters: list[KeptDeadLetter] = []

    def send(self, message: SourceMessage, letter: DeadLetter) -> None:
        self.letters.append(KeptDeadLetter(message, letter))

    def flush(self) -> None:
        return None
