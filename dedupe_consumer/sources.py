"""The two contracts between the consumer loop and wherever batches come from.

A *source* (the Kafka consumer, a recording) hands out batches and takes
commits; the loop is the *assignment listener* it tells about partitions
coming and going. Keeping both here lets the Kafka source, the replay source
and the loop agree without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from dedupe_consumer.models import SourceMessage, TopicPartition


@dataclass(frozen=True, slots=True)
class PartitionLog:
    """What the cluster says about a source partition at assignment (to detect offset reuse)."""

    topic_id: bytes | None
    """The topic's 16-byte ID: it changes when the topic is deleted and created again."""
    low: int
    """The first offset still in the log."""
    high: int
    """The next offset to be written (the high watermark)."""
    retained_from: int | None = None
    """The first offset whose timestamp is within ``dedupe.retention`` of now (None:
    not asked): IDs of older events may have expired, so a reset never re-reads them."""
    partitions: int | None = None
    """How many partitions the topic has (None: not known): to check where keys land."""


class AssignmentListener(Protocol):
    def on_assigned(
        self,
        tps: Sequence[TopicPartition],
        logs: Mapping[TopicPartition, PartitionLog] | None = None,
    ) -> Mapping[TopicPartition, int | None]:
        """Return the offset to resume each partition from (None: the committed offset).

        ``logs``, when the source can tell, describes each partition's log, so that
        a topic that was recreated or truncated is not mistaken for a replay.
        """

    def on_revoked(self, tps: Sequence[TopicPartition]) -> Mapping[TopicPartition, int]:
        """Return offsets that must be committed before the partitions go."""

    def on_lost(self, tps: Sequence[TopicPartition]) -> None:
        """The partitions are gone already: nothing may be committed for them."""


class Source(Protocol):
    """Where batches come from: the Kafka consumer, or a recording."""

    def poll(self, max_messages: int, timeout_s: float) -> Sequence[SourceMessage]: ...
    def commit(self, offsets: Mapping[TopicPartition, int]) -> None: ...
    def seek(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Deliver these partitions again from these offsets (the rest of a cut batch)."""

    def close(self) -> None: ...


SourceFactory = Callable[[AssignmentListener], Source]
"""Builds a source for a listener (the loop); called once per run."""
