"""The store contract the engine relies on, independent of RocksDB.

A store keeps, per source partition, one :class:`IdRecord` per event ID
and one watermark (the highest offset whose decision is durable). The one
write method takes a whole batch so an implementation can make records and
watermarks atomic and durable together: that is invariant 2 of the design.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple, Protocol

from dedupe_consumer.models import Decision, TopicPartition


class RecordStatus(enum.IntEnum):
    """What an :class:`IdRecord` says about its event ID (one byte on disk and in the changelog)."""

    HANDLED = 1
    """The handler completed (or a reconcile or ``on_uncertain = "skip"`` said it did)."""
    DEAD_LETTERED = 2
    """The event went to the dead-letter topic."""
    IN_PROGRESS = 3
    """A claim (claim mode): the handler may have run; its outcome is not known yet.

    Not a decision: it is written before the handler is called and replaced by the
    decision's record (or released) when the batch persists. Found after a crash, it
    is an uncertain outcome (``processing.on_uncertain``)."""


RECORDED_AS: Mapping[Decision, RecordStatus] = MappingProxyType(
    {Decision.HANDLED: RecordStatus.HANDLED, Decision.DEAD_LETTERED: RecordStatus.DEAD_LETTERED}
)
"""The one mapping from how an offset ended to what is stored for its event ID.

Only these decisions write an ID record. A duplicate or a conflict was decided at
the ID's first offset (its record is that one), a replay is covered by the
watermark, and a dead letter without an event ID has nothing to key a record by."""


_RECORD = struct.Struct(">BQQ8s")  # status, offset, decided_at_ms, payload digest


EPOCH = struct.Struct(">16sQ")
"""A partition's offset epoch: the topic's ID and how often its watermark was reset.

Offsets are only comparable within one epoch: a topic deleted and created again
(new ID), or a reset after truncation (next count), starts a new one."""


_RESPONSE = struct.Struct(">BiH")  # format (1), key length (-1: none), topic length (0: none)


class Response(NamedTuple):
    """What a handler answered for an event (``handle`` returned it), kept with the
    event's ID record: given to ``Handler.on_duplicate`` and sent again as the reply
    to a duplicate (``processing.reply_on_duplicate``).

    ``topic`` and ``key`` are the reply's destination when the handler chose one (the
    sidecar's ``Kafka-Reply-Topic`` and ``Kafka-Reply-Key``); None: the request's
    ``reply-to`` header (or ``processing.reply_topic``) and the request's key."""

    value: bytes
    topic: str | None = None
    key: bytes | None = None

    @property
    def size(self) -> int:
        """Bytes it takes in the ID record: what ``dedupe.max_response_bytes`` bounds."""
        topic = 0 if self.topic is None else len(self.topic.encode())
        return len(self.value) + topic + (0 if self.key is None else len(self.key))

    def encode(self) -> bytes:
        topic = b"" if self.topic is None else self.topic.encode()
        key = -1 if self.key is None else len(self.key)
        return _RESPONSE.pack(1, key, len(topic)) + (self.key or b"") + topic + self.value

    @classmethod
    def decode(cls, data: bytes) -> Response:
        version, key_size, topic_size = _RESPONSE.unpack_from(data)
        if version != 1:
            raise ValueError(f"a stored response of format {version}: written by a newer version")
        at = _RESPONSE.size
        key = None if key_size < 0 else bytes(data[at : at + key_size])
        at += max(key_size, 0)
        topic = bytes(data[at : at + topic_size]).decode() if topic_size else None
        return cls(bytes(data[at + topic_size :]), topic, key)


_STATUSES = frozenset(int(status) for status in RecordStatus)
RECORD_BYTES = _RECORD.size
"""An ID record without a response: what nearly every changelog value is."""
RECORD_STATUSES = _STATUSES
"""The status bytes this version reads (a record's first byte)."""


def unreadable_record(data: bytes) -> str | None:
    """Why ``data`` is not an ID record this version can read, or None. Cheap (no
    decoding): the restore stores changelog values as they are and checks each with it."""
    if len(data) < _RECORD.size:
        return f"{len(data)} bytes, under the {_RECORD.size} of a record"
    if data[0] not in _STATUSES:
        return f"status {data[0]} is unknown"
    if len(data) > _RECORD.size and (
        len(data) < _RECORD.size + _RESPONSE.size or data[_RECORD.size] != 1
    ):
        return "its response is of an unknown format"
    return None


class IdRecord(NamedTuple):
    """What the store remembers about one event ID: 25 bytes on disk (no payload), and
    the handler's :class:`Response` after them when it returned one.

    The same bytes are the value of the ID's changelog record, so a response moves
    with its partition and expires with its ID. A named tuple, not a frozen
    dataclass: one is built per decided event, and a frozen dataclass's ``__init__``
    costs twice as much."""

    status: RecordStatus
    offset: int
    decided_at_ms: int
    digest: bytes
    response: Response | None = None

    def encode(self) -> bytes:
        head = _RECORD.pack(self.status, self.offset, self.decided_at_ms, self.digest)
        return head if self.response is None else head + self.response.encode()

    @classmethod
    def decode(cls, data: bytes) -> IdRecord:
        status, offset, decided_at_ms, digest = _RECORD.unpack_from(data)
        response = Response.decode(data[_RECORD.size :]) if len(data) > _RECORD.size else None
        return cls(RecordStatus(status), offset, decided_at_ms, digest, response)


class Output(NamedTuple):
    """A message a handler emitted (``event.emit``): produced in the changelog transaction
    that persists its event's decision, so it exists if and only if that decision does."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    answers: int | None = None
    """A reply to a duplicate: that duplicate's offset (it has no ID record, so a write
    cut below it must not keep its reply)."""


@dataclass(slots=True)
class WriteSet:
    """Everything one batch makes durable, in one atomic, synced write."""

    records: dict[TopicPartition, list[tuple[str, IdRecord]]] = field(default_factory=dict)
    """New ID records per partition (decisions or claims), in offset order."""
    released: dict[TopicPartition, list[str]] = field(default_factory=dict)
    """IDs whose record is deleted (a changelog tombstone, then a local delete): claims
    withdrawn because their event was not decided, and IDs past retention (the sweep)."""
    effects: dict[TopicPartition, list[tuple[bytes, bytes | None]]] = field(default_factory=dict)
    """Writes staged by handlers (``event.stage``); ``None`` deletes."""
    watermarks: dict[TopicPartition, int] = field(default_factory=dict)
    changelog_positions: dict[TopicPartition, int] = field(default_factory=dict)
    outputs: dict[TopicPartition, list[Output]] = field(default_factory=dict)
    """Messages emitted by the handlers of each source partition's events, in offset
    order: produced with the changelog records (never kept in the store)."""

    def __bool__(self) -> bool:
        return bool(
            self.records
            or self.released
            or self.effects
            or self.watermarks
            or self.changelog_positions
            or self.outputs
        )

    def partitions(self) -> set[TopicPartition]:
        return {*self.records, *self.released, *self.effects, *self.watermarks, *self.outputs}


class ProcessedStore(Protocol):
    @property
    def instance_id(self) -> str:
        """A stable ID of this store (and so of this consumer instance), made on first open."""

    def watermark(self, tp: TopicPartition) -> int | None:
        """Highest offset of ``tp`` whose decision is durable, or None if never seen."""

    def lookup(self, tp: TopicPartition, ids: Sequence[str], now_ms: int) -> list[IdRecord | None]:
        """The records of ``ids`` (one multi-get); expired ones read as None."""

    def persist(self, write: WriteSet) -> None:
        """Apply ``write`` atomically with a synced WAL."""

    def apply_restored(
        self,
        tp: TopicPartition,
        decisions: Sequence[tuple[bytes, bytes | None]],
        write: WriteSet,
        *,
        sync: bool,
    ) -> None:
        """Apply a chunk of a changelog restore atomically: ``decisions`` first, in order
        (``(event ID bytes, IdRecord bytes)`` as the changelog holds them; ``None``
        deletes), then ``write``, whose changelog position covers them.

        ``sync=False`` leaves the WAL unsynced. A restore syncs only its last chunk:
        each chunk is one atomic write that holds its records *and* the position
        after them, so whatever a crash keeps of the unsynced ones (all of them after
        a process crash, a prefix of them after a power loss, since the WAL recovers
        to a consistent point in time), the stored position never runs ahead of the
        records it covers. (The next restore cannot tell the records past that position
        from another owner's writes, so it rebuilds the partition from the changelog's
        start: correct, at the cost of reading it all again.) The last, synced write
        syncs the whole WAL before it: nothing is decided on an unsynced state. A value
        this version cannot read (``unreadable_record``) raises ``StoreError``.
        """

    def effect(self, tp: TopicPartition, key: bytes) -> bytes | None:
        """A value a handler staged for ``tp`` (transactional effects)."""

    def changelog_position(self, tp: TopicPartition) -> int | None:
        """Next changelog offset of ``tp`` not yet applied locally, or None."""

    def epoch(self, tp: TopicPartition) -> bytes | None:
        """Which run of ``tp``'s offsets the watermark belongs to (see :data:`EPOCH`)."""

    def set_epoch(self, tp: TopicPartition, epoch: bytes, *, reset_watermark: bool) -> None:
        """Record ``tp``'s epoch; with ``reset_watermark`` also forget its watermark (synced)."""

    def sweep_expired(self, now_ms: int, budgets: Mapping[TopicPartition, int]) -> int:
        """Examine up to ``budgets[tp]`` records of each partition, delete the expired ones."""

    def find_expired(
        self, now_ms: int, budgets: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, list[str]]:
        """Expired IDs among up to ``budgets[tp]`` records of each partition (deletes nothing)."""

    def partitions(self) -> list[TopicPartition]:
        """Every partition with local state, assigned or not."""

    def drop_partition(
        self, tp: TopicPartition, changelog_position: TopicPartition | None = None
    ) -> None:
        """Forget ``tp`` entirely: records, effects, watermark, changelog position, epoch.

        ``changelog_position``: the key its changelog position is kept under, when that
        is not ``tp`` itself (the changelog keys positions by its own topic name)."""

    def close(self) -> None: ...


class StateChangelog(Protocol):
    """The changelog as the engine uses it: a copy of the store's state outside it.

    Implemented with Kafka by :class:`dedupe_consumer.kafka.changelog.Changelog`;
    its records are described in :mod:`dedupe_consumer.store.changelog_codec`.
    """

    epochs: dict[TopicPartition, bytes]
    """Each owned partition's offset epoch, announced in the changelog once per epoch."""

    def ensure_topics(self, topics: Iterable[str]) -> None:
        """Make sure the changelog of each source topic exists and is usable."""

    def output_limit(self, topic: str, *, create: bool = False) -> int | None:
        """``topic``'s ``max.message.bytes`` (0: not known), None when it does not exist:
        what an emitted message (``event.emit``) to it may be. ``create``: a missing
        topic is created first."""

    def restore(
        self,
        tp: TopicPartition,
        store: ProcessedStore,
        *,
        stopping: Callable[[], bool] | None = None,
    ) -> int:
        """Bring ``store``'s copy of ``tp`` up to the changelog; the number of records read.
        Gives up early, raising, once ``stopping()`` is true."""

    def position_key(self, tp: TopicPartition) -> TopicPartition:
        """The key under which ``store.changelog_position`` keeps ``tp``'s position."""

    def reset_epoch(
        self, tp: TopicPartition, epoch: bytes, store: ProcessedStore | None = None
    ) -> None:
        """Start ``tp``'s watermark over in a new offset epoch."""

    def write(
        self,
        write: WriteSet,
        store: ProcessedStore | None = None,
        offsets: Mapping[TopicPartition, int] | None = None,
        *,
        live: bool = False,
    ) -> dict[TopicPartition, int]:
        """Make ``write`` durable in the changelog (committing ``offsets`` with it when it
        can); return the source offsets it committed. Raises
        :class:`~dedupe_consumer.errors.NotOwnerError` when the group fenced it."""
