"""The store contract the engine relies on, independent of RocksDB.

A store keeps, per source partition, one :class:`StoredDecision` per event ID
and one watermark (the highest offset whose decision is durable). The one
write method takes a whole batch so an implementation can make records and
watermarks atomic and durable together: that is invariant 2 of the design.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from dedupe_consumer.models import TopicPartition


class Status(enum.IntEnum):
    HANDLED = 1
    DEAD_LETTERED = 2


_RECORD = struct.Struct(">BQQ8s")  # status, offset, decided_at_ms, payload digest


@dataclass(frozen=True, slots=True)
class StoredDecision:
    """What the store remembers about one event ID (25 bytes on disk, no payload)."""

    status: Status
    offset: int
    decided_at_ms: int
    digest: bytes

    def encode(self) -> bytes:
        return _RECORD.pack(self.status, self.offset, self.decided_at_ms, self.digest)

    @classmethod
    def decode(cls, data: bytes) -> StoredDecision:
        status, offset, decided_at_ms, digest = _RECORD.unpack(data)
        return cls(Status(status), offset, decided_at_ms, digest)


Verdicts = Mapping[TopicPartition, Sequence[tuple[str, StoredDecision]]]
"""New decisions per partition, in offset order."""


class ProcessedStore(Protocol):
    def watermark(self, tp: TopicPartition) -> int | None:
        """Highest offset of ``tp`` whose decision is durable, or None if never seen."""

    def lookup(
        self, tp: TopicPartition, ids: Sequence[str], now_ms: int
    ) -> list[StoredDecision | None]:
        """Decisions for ``ids`` (one multi-get); expired ones read as None."""

    def persist(
        self,
        decisions: Verdicts,
        watermarks: Mapping[TopicPartition, int],
        changelog_positions: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        """Write decisions, watermarks and changelog positions atomically with a synced WAL."""

    def changelog_position(self, tp: TopicPartition) -> int | None:
        """Next changelog offset of ``tp`` not yet applied locally, or None."""

    def sweep_expired(self, now_ms: int, budget: int) -> int:
        """Examine at most ``budget`` records, delete the expired ones; return how many."""

    def close(self) -> None: ...
