"""A dead letter read back from its headers (the inverse of ``dead_letter_headers``)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from dedupe_consumer.dead_letters import MOVED_HEADER_PREFIX, OUR_HEADER_PREFIX, REDRIVE_HEADER
from dedupe_consumer.models import SourceMessage, as_bytes, header_pairs, message_timestamp

__all__ = ["Letter", "LetterFilter", "parse_letter"]


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter: where it is, what it was, why it was set aside."""

    topic: str
    partition: int
    offset: int
    """Where the letter itself is (the dead-letter topic)."""
    dead_lettered_at: datetime | None
    reason: str
    event_id: str
    original_topic: str
    original_partition: int
    original_offset: int
    error_class: str
    error_message: str
    attempts: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    """The original headers (those this library moved aside restored)."""
    incomplete: str | None
    """Why it cannot be redriven (its value, key or headers were left out), or None."""

    @property
    def coordinates(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"

    def redrive_headers(self) -> list[tuple[str, str | bytes | None]]:
        """The original headers plus ``dedupe.redrive`` naming this letter."""
        return [*self.headers, (REDRIVE_HEADER, self.coordinates.encode())]


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", errors="replace")


def parse_letter(message: SourceMessage) -> Letter | None:
    """``message`` of the dead-letter topic as a :class:`Letter`; None when it carries no
    ``dlq.reason`` (not written by this library)."""
    ours: dict[str, bytes | None] = {}
    originals: list[tuple[str, bytes | None]] = []
    for name, value in header_pairs(message):
        raw = value
        if name.startswith(MOVED_HEADER_PREFIX):
            originals.append((name[len(MOVED_HEADER_PREFIX) :], raw))
        elif name.lower().startswith(OUR_HEADER_PREFIX):
            ours[name] = raw
        else:
            originals.append((name, raw))
    if "dlq.reason" not in ours:
        return None
    omitted = [
        part
        for part, header in (("value", "dlq.value.omitted"), ("key", "dlq.key.omitted"))
        if header in ours
    ]
    if "dlq.headers.omitted" in ours:
        omitted.append("headers")

    def number(name: str) -> int:
        try:
            return int(_text(ours.get(name)))
        except ValueError:
            return -1

    return Letter(
        topic=message.topic() or "",
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        dead_lettered_at=message_timestamp(message),
        reason=_text(ours["dlq.reason"]),
        event_id=_text(ours.get("dlq.event.id")),
        original_topic=_text(ours.get("dlq.original.topic")),
        original_partition=number("dlq.original.partition"),
        original_offset=number("dlq.original.offset"),
        error_class=_text(ours.get("dlq.error.class")),
        error_message=_text(ours.get("dlq.error.message")),
        attempts=number("dlq.attempts"),
        key=as_bytes(message.key()),
        value=as_bytes(message.value()),
        headers=tuple(originals),
        incomplete=None if not omitted else f"its {' and '.join(omitted)} left out (too large)",
    )


@dataclass(frozen=True, slots=True)
class LetterFilter:
    """Which letters a command takes; an empty field takes all."""

    reasons: Collection[str] = ()
    topic: str | None = None
    partition: int | None = None
    event_ids: Collection[str] = ()
    since: datetime | None = None
    until: datetime | None = None
    """On when the letter was written (its timestamp)."""

    def __call__(self, letter: Letter) -> bool:
        when = letter.dead_lettered_at
        return (
            (not self.reasons or letter.reason in self.reasons)
            and (self.topic is None or letter.original_topic == self.topic)
            and (self.partition is None or letter.original_partition == self.partition)
            and (not self.event_ids or letter.event_id in self.event_ids)
            and (self.since is None or (when is not None and when >= self.since))
            and (self.until is None or (when is not None and when < self.until))
        )
