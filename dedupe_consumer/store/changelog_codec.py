"""What a changelog topic holds, without Kafka: its name and its records.

Each source topic ``T`` of group ``G`` has a compacted changelog topic (see
:func:`changelog_topic` for its name) with the same partition count. A batch's
records in it, per source partition:

* ``d:<event id>`` = the 25-byte :class:`~dedupe_consumer.store.IdRecord`
  (a decision or a claim); a ``None`` value (tombstone) deletes it;
* ``e:<key>`` = a staged effect; ``None`` deletes it;
* ``w`` = the watermark (8 bytes, big-endian; ``-1`` after a reset);
* ``t`` = the offset epoch the watermark belongs to (:data:`~dedupe_consumer.store.EPOCH`)
  and one flag byte, ``1`` when the watermark starts over.

The Kafka side (transactions, restore consumer, topic admin) is
:class:`dedupe_consumer.kafka.changelog.Changelog`; this module is the part the
store owns: how its state is written as records and read back.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Collection, Iterator, Mapping

from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store.base import IdRecord, ProcessedStore, WriteSet

_WATERMARK_KEY = b"w"
_EPOCH_KEY = b"t"
"""Value: an offset epoch (``store.EPOCH``) and a flag, 1 when the watermark starts over."""
_ADOPT, _RESET = b"\x00", b"\x01"
_DECISION_PREFIX = b"d:"
DECISION_PREFIX = _DECISION_PREFIX
"""Keys of decision records start with it; the rest is the event ID as the store keys it."""
_EFFECT_PREFIX = b"e:"
_OFFSET = struct.Struct(">q")

_SUFFIX = "dedupe-changelog"
_LEGAL_NAME = re.compile(r"[A-Za-z0-9._-]+")
_MAX_TOPIC_NAME = 249
_HINT = 80
"""Characters of the group and of the topic kept, readable, in a hashed name."""


def decision_key(event_id: str) -> bytes:
    """The changelog key of ``event_id``'s record (a ``None`` value deletes it)."""
    return _DECISION_PREFIX + event_id.encode()


def changelog_topic(group_id: str, topic: str) -> str:
    """The changelog topic of source ``topic`` in group ``group_id``: one name per pair.

    ``<group>.<topic>.<len(group)>.dedupe-changelog``: the length says where the
    group ends, so ``(payments, orders.v1)`` and ``(payments.orders, v1)`` differ
    (``payments.orders.v1.8.`` / ``...15.``). A group with characters that a
    topic name cannot hold, or a name over Kafka's 249 characters, gets
    ``<hint>.h<sha256>.dedupe-changelog`` instead, where the hint is a cut,
    cleaned copy of both for people and the hash (over the length-prefixed pair)
    keeps the name unique. The two forms cannot meet: one has digits before the
    suffix, the other ``h`` and hex.
    """
    return internal_topic(group_id, topic, _SUFFIX)


def internal_topic(group_id: str, topic: str, suffix: str) -> str:
    """A topic of this library's for ``(group_id, topic)``, named as
    :func:`changelog_topic` says, with ``suffix`` (a legal topic name) at the end."""
    name = f"{group_id}.{topic}.{len(group_id)}.{suffix}"
    if _LEGAL_NAME.fullmatch(group_id) and len(name) <= _MAX_TOPIC_NAME:
        return name
    pair = f"{len(group_id)}:{group_id}{topic}".encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(pair).hexdigest()[:32]
    hint = re.sub(r"[^A-Za-z0-9._-]", "-", group_id[:_HINT]) + "." + topic[:_HINT]
    return f"{hint}.h{digest}.{suffix}"


def legacy_changelog_topic(group_id: str, topic: str) -> str:
    """The old, non-injective name: no longer read (see :meth:`Changelog.ensure_topics`)."""
    return f"{group_id}.{topic}.{_SUFFIX}"


def changelog_records(
    write: WriteSet,
    announce: Mapping[TopicPartition, bytes],
    resets: Collection[TopicPartition],
) -> Iterator[tuple[TopicPartition, bytes, bytes | None]]:
    """``write`` as changelog records ``(source partition, key, value)``, in write order.

    ``announce``: partitions whose offset epoch is written first, because it applies to
    the watermark that follows; flagged as a reset for the partitions in ``resets``.
    """
    for tp, epoch in announce.items():  # first: it applies to the watermark below
        flag = _RESET if tp in resets else _ADOPT
        yield tp, _EPOCH_KEY, epoch + flag
    for tp, items in write.records.items():
        for event_id, decision in items:
            yield tp, _DECISION_PREFIX + event_id.encode(), decision.encode()
    for tp, ids in write.released.items():
        for event_id in ids:
            yield tp, _DECISION_PREFIX + event_id.encode(), None
    for tp, changes in write.effects.items():
        for key, value in changes:
            yield tp, _EFFECT_PREFIX + key, value
    for tp, offset in write.watermarks.items():
        yield tp, _WATERMARK_KEY, _OFFSET.pack(offset)


class RestoredState:
    """Changelog records read but not yet applied, latest value per key."""

    def __init__(
        self, tp: TopicPartition, position_key: TopicPartition, epoch: bytes | None = None
    ) -> None:
        self.tp = tp
        self.position_key = position_key
        self.records: dict[str, IdRecord | None] = {}
        self.decisions: list[tuple[bytes, bytes | None]] = []
        """Decision records as read, undecoded, in changelog order: ``(key without
        DECISION_PREFIX, value)``. The restore's fast path (millions of records): the
        changelog value is the store's value byte for byte, and applying them in order
        leaves the latest per ID, as ``records`` does."""
        self.effects: dict[bytes, bytes | None] = {}
        self.watermark: int | None = None
        self.epoch = epoch
        """The offset epoch of the watermark: the store's, then the latest read."""
        self.epoch_changed = False
        self.reset = False

    def __len__(self) -> int:
        return len(self.records) + len(self.decisions) + len(self.effects)

    def add(self, key: bytes, value: bytes | None) -> None:
        """One changelog record; a ``None`` value is a tombstone."""
        if key == _WATERMARK_KEY and value is not None:
            offset = _OFFSET.unpack(value)[0]
            if offset >= 0:  # -1 comes with a reset: nothing decided in the new epoch yet
                self.watermark = offset if self.watermark is None else max(self.watermark, offset)
        elif key == _EPOCH_KEY and value is not None and value[:-1] != self.epoch:
            self.epoch, self.epoch_changed = value[:-1], True
            if value[-1:] == _RESET:  # the old watermark counted offsets of another log
                self.watermark, self.reset = None, True
        elif key.startswith(_DECISION_PREFIX):
            event_id = key[len(_DECISION_PREFIX) :].decode()
            self.records[event_id] = None if value is None else IdRecord.decode(value)
        elif key.startswith(_EFFECT_PREFIX):
            self.effects[key[len(_EFFECT_PREFIX) :]] = value

    def apply(self, store: ProcessedStore, position: int, *, sync: bool = True) -> int:
        """Write what was read, and the changelog position it reaches; then forget it.

        One atomic write: the position is never stored without the records before
        it. ``sync=False`` (a restore's intermediate chunks) leaves the WAL unsynced:
        see :meth:`ProcessedStore.apply_restored` for why that stays correct.
        """
        tp = self.tp
        if self.epoch_changed and self.epoch is not None:
            store.set_epoch(tp, self.epoch, reset_watermark=self.reset)
            self.epoch_changed = self.reset = False
        write = WriteSet(changelog_positions={self.position_key: position})
        local = store.watermark(tp)
        if self.watermark is not None and (local is None or local < self.watermark):
            write.watermarks[tp] = self.watermark
        write.records[tp] = [(i, d) for i, d in self.records.items() if d is not None]
        write.released[tp] = [i for i, d in self.records.items() if d is None]
        write.effects[tp] = list(self.effects.items())
        store.apply_restored(tp, self.decisions, write, sync=sync)
        count = len(self)
        self.records, self.decisions, self.effects, self.watermark = {}, [], {}, None
        return count
