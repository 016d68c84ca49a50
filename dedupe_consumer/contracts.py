"""The extension contracts: what the loop, the engine and their edges agree on.

Everything a new source, sink or store implements, and everything the loop is
built from, is importable from this one module:

* :class:`Source` (hands out batches, takes commits, raises
  :class:`~dedupe_consumer.errors.CommitError`) and the :class:`AssignmentListener`
  it tells about partitions coming and going, built by a :data:`SourceFactory`;
* :class:`SourceMessage`, what a source hands out;
* :class:`DeadLetterSink`, where events that cannot be handled go;
* :class:`ProcessedStore`, where decisions are made durable;
* :class:`PartitionLog`, what a source knows about a partition at assignment;
* :class:`BatchResult`, what the engine returns for each batch;
* :class:`Edges`, all of the above that one consumer runs against: built by
  :func:`dedupe_consumer.kafka.edges` (the default) or
  :func:`dedupe_consumer.replay.edges`, and handed to
  :class:`~dedupe_consumer.DedupeConsumer` (its composition root).

The Kafka source, the replay source and the loop agree through these without
importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from dedupe_consumer.dead_letters import DeadLetterSink
from dedupe_consumer.errors import CommitError
from dedupe_consumer.models import BatchStats, SourceMessage, TopicPartition
from dedupe_consumer.store.base import Output, ProcessedStore

if TYPE_CHECKING:
    from dedupe_consumer.store import StateChangelog

__all__ = [
    "AssignmentListener",
    "BatchResult",
    "CommitError",
    "DeadLetterSink",
    "Edges",
    "PartitionLog",
    "ProcessedStore",
    "Source",
    "SourceFactory",
    "SourceMessage",
]


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


@dataclass(slots=True)
class BatchResult:
    """What the engine did with one batch (``on_batch`` callbacks receive it)."""

    stats: BatchStats
    commits: dict[TopicPartition, int]
    """Next offset to consume per partition: durable decisions cover everything below."""
    error: BaseException | None = None
    """Set when the batch stopped early on a fatal condition (after persisting the prefix)."""
    handled_ids: list[str] = field(default_factory=list)
    rewind: dict[TopicPartition, int] = field(default_factory=dict)
    """Where to re-read partitions whose messages were not all decided (a cut walk)."""


class AssignmentListener(Protocol):
    """The loop's side of a source: told about partitions coming and going.

    A source that can keep polling while state is restored (the Kafka source) calls
    :meth:`prepare`, then :meth:`restore` for each partition it returned (on other
    threads), then :meth:`on_assigned` with what each restore applied. A simpler one
    calls :meth:`on_assigned` alone, which restores in line.
    """

    def prepare(self, tps: Sequence[TopicPartition]) -> Sequence[TopicPartition]:
        """The partitions are coming: return those whose state must be restored first."""

    def restore(self, tp: TopicPartition, stopping: Callable[[], bool]) -> int:
        """Restore one prepared partition's state (any thread); the records applied.
        Raises once ``stopping()`` is true (the partition went meanwhile)."""

    def on_restore_cancelled(self, tps: Sequence[TopicPartition]) -> None:
        """Prepared partitions went before :meth:`on_assigned`: they were never owned."""

    def on_assigned(
        self,
        tps: Sequence[TopicPartition],
        logs: Mapping[TopicPartition, PartitionLog] | None = None,
        restored: Mapping[TopicPartition, int] | None = None,
    ) -> Mapping[TopicPartition, int | None]:
        """Return the offset to resume each partition from (None: the committed offset).

        ``logs``, when the source can tell, describes each partition's log, so that
        a topic that was recreated or truncated is not mistaken for a replay.
        ``restored``: the records each :meth:`restore` applied (None: restore now).
        """

    def on_revoked(self, tps: Sequence[TopicPartition]) -> Mapping[TopicPartition, int]:
        """The partitions are about to go: return offsets decided durable just now (the
        walk in progress settled them); the source commits those and the partitions'
        uncommitted offsets after this."""

    def on_lost(self, tps: Sequence[TopicPartition]) -> None:
        """The partitions are gone already: nothing may be committed for them."""


class Source(Protocol):
    """Where batches come from: the Kafka consumer, or a recording."""

    def poll(self, max_messages: int, timeout_s: float) -> Sequence[SourceMessage]: ...

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit ``offsets``, which are durable: the next offset to read per partition.

        The source is the one owner of offsets that are durable but not committed
        yet: it keeps them until they are, commits a revoked partition's before it
        goes, forgets a lost partition's, and does not commit again what a
        changelog transaction committed. An empty ``offsets`` only retries a
        commit that failed. Raises :class:`~dedupe_consumer.errors.CommitError`
        when the commit failed now; the source tries again later, so the caller
        logs it and carries on.
        """

    def seek(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Deliver these partitions again from these offsets (the rest of a cut batch)."""

    def keep_alive(self) -> None:
        """Serve the group while a batch's handler calls run: deliver nothing new now
        (what arrives is kept for the next poll, a bounded read-ahead), but heartbeat
        and rebalance."""

    def close(self) -> None:
        """Commit what is durable and not committed yet, then let go of the source."""


SourceFactory = Callable[[AssignmentListener], Source]
"""Builds a source for a listener (the loop); called once per run."""


@dataclass(frozen=True, kw_only=True)
class Edges:
    """Everything a consumer runs against besides its handler and settings.

    Build them with :func:`dedupe_consumer.kafka.edges` (what
    ``DedupeConsumer(handler, settings)`` uses) or :func:`dedupe_consumer.replay.edges`,
    or assemble your own. Whoever builds edges closes them (:meth:`close`): the
    consumer closes the edges it built itself, never edges passed to it.
    """

    source: SourceFactory
    """Opens the source of batches for the loop's listener, once per run."""
    dead_letters: DeadLetterSink
    """Where events that cannot be handled go."""
    store: ProcessedStore
    """Where decisions and watermarks are made durable."""
    changelog: StateChangelog | None = None
    """Where each batch's decisions are mirrored so state moves with its partition (None: not)."""
    walk_budget_s: float | None = None
    """How long one batch may spend in handlers before the rest is re-read (None: no limit).
    The Kafka edges keep it below ``max.poll.interval.ms``."""
    max_record_bytes: int = 1_000_000
    """The largest record the changelog takes (the producer's ``message.max.bytes``): a
    staged effect that cannot fit is refused when it is staged."""
    closers: tuple[Callable[[], None], ...] = ()
    """What :meth:`close` calls, last first: the parts these edges opened themselves."""
    outputs: list[Output] | None = None
    """Without a changelog: where emitted messages (``event.emit``) go once their batch
    is persisted, kept in memory (a replay's). None: ``emit`` needs the changelog."""

    def close(self) -> None:
        """Close the parts these edges opened (last opened, first closed).

        Each one is closed even if an earlier one fails (a RocksDB lock left held
        would stop the next start); the first failure is raised afterwards."""
        failure: BaseException | None = None
        for close in reversed(self.closers):
            try:
                close()
            except BaseException as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
