"""Read a store without owning it: what ``dedupe-consumer store`` shows.

The store is opened as a RocksDB secondary instance (no lock, no write; made for reading
a database a primary keeps writing), so it can be read while a consumer runs on it. It
shows the state as of the moment it was opened.
"""

from __future__ import annotations

import struct
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from rocksdict import AccessType, Options, Rdict

from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store.base import EPOCH, IdRecord
from dedupe_consumer.store.rocks import (
    _META,
    _RETENTION_KEY,
    _WATERMARK,
    _cf_name,
    _epoch_key,
    _watermark_key,
)

__all__ = ["FoundRecord", "NotAStoreError", "PartitionStats", "StoreReader"]

_SIZES = ("rocksdb.total-sst-files-size", "rocksdb.cur-size-all-mem-tables")


class NotAStoreError(ValueError):
    """The path holds no dedupe_consumer store."""


@dataclass(frozen=True, slots=True)
class FoundRecord:
    """One event ID's record in one partition."""

    partition: TopicPartition
    event_id: str
    record: IdRecord
    expires_at_ms: int | None
    """When the retention sweep may drop it (None: the store names no retention)."""


@dataclass(slots=True)
class PartitionStats:
    partition: TopicPartition
    ids: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    expired: int = 0
    """Past the retention: read as unseen, dropped by the next sweep."""
    responses: int = 0
    bytes: int = 0
    """RocksDB's estimate for the partition's records and staged effects."""
    effects: int = 0
    watermark: int | None = None
    epoch: str | None = None
    """The topic's ID and reset count (see ``store.base.EPOCH``), or None."""


class StoreReader:
    """A read-only view of the store at ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "CURRENT").is_file():
            raise NotAStoreError(
                f"{str(self.path)!r} is not a dedupe_consumer store (no RocksDB CURRENT file): "
                "give the directory named by store.path"
            )
        try:
            families = Rdict.list_cf(str(self.path))
        except Exception as exc:
            raise NotAStoreError(f"{str(self.path)!r} cannot be read as a store: {exc}") from exc
        if _META not in families:
            raise NotAStoreError(
                f"{str(self.path)!r} is a RocksDB database but not a dedupe_consumer store "
                f"(no {_META!r} column family)"
            )
        # A secondary instance is RocksDB's way to read a database a primary keeps writing
        # (read-only mode races its flushes and compactions: files listed in the MANIFEST
        # are gone by the time they are opened). Its own small directory is temporary.
        self._scratch = tempfile.TemporaryDirectory(prefix="dedupe-store-reader-")
        options = Options(raw_mode=True)
        options.set_max_open_files(-1)  # every file open from the start: a later delete is harmless
        self._db = Rdict(
            str(self.path),
            options,
            column_families={name: Options(raw_mode=True) for name in families},
            access_type=AccessType.secondary(self._scratch.name),
        )
        self._families = families
        self._meta = self._db.get_column_family(_META)
        raw = self._meta.get(_RETENTION_KEY)
        self.retention_ms: int | None = None if raw is None else _WATERMARK.unpack(raw)[0]

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def partitions(self) -> list[TopicPartition]:
        """Every partition with ID records, sorted."""
        found: list[TopicPartition] = []
        for name in self._families:
            kind, _, rest = name.partition(":")
            topic, _, partition = rest.rpartition(":")
            if kind == "p" and topic and partition.isdigit():
                found.append(TopicPartition(topic, int(partition)))
        return sorted(found, key=lambda tp: (tp.topic, tp.partition))

    def watermark(self, tp: TopicPartition) -> int | None:
        raw = self._meta.get(_watermark_key(tp))
        return None if raw is None else int(_WATERMARK.unpack(raw)[0])

    def epoch(self, tp: TopicPartition) -> str | None:
        raw = self._meta.get(_epoch_key(tp))
        if raw is None:
            return None
        topic_id, resets = EPOCH.unpack(raw)
        return f"{bytes(topic_id).hex()}/{resets}"

    def changelog_positions(self) -> dict[str, int]:
        """Next changelog offset to apply, per changelog partition (``<topic>:<partition>``)."""
        positions: dict[str, int] = {}
        for key, value in self._meta.items(from_key=b"cl:"):
            raw = key if isinstance(key, bytes) else b""
            if not raw.startswith(b"cl:") or not isinstance(value, bytes):
                break
            name = raw[3:].decode(errors="replace").removeprefix("p:")
            try:
                positions[name] = int(_WATERMARK.unpack(value)[0])
            except struct.error:
                continue
        return positions

    def records(self, tp: TopicPartition) -> Iterator[tuple[str, IdRecord]]:
        """Every ID record of ``tp``, expired ones included, in key order."""
        family = self._family(_cf_name(tp))
        if family is None:
            return
        for key, value in family.items():
            if isinstance(key, bytes) and isinstance(value, bytes):  # raw mode: always
                yield key.decode(errors="replace"), IdRecord.decode(value)

    def lookup(self, event_id: str, tp: TopicPartition | None = None) -> list[FoundRecord]:
        """``event_id``'s record in ``tp``, or in every partition that has one."""
        found: list[FoundRecord] = []
        for partition in [tp] if tp is not None else self.partitions():
            family = self._family(_cf_name(partition))
            raw = None if family is None else family.get(event_id.encode())
            if isinstance(raw, bytes):
                record = IdRecord.decode(raw)
                found.append(FoundRecord(partition, event_id, record, self.expiry(record)))
        return found

    def stats(self, now_ms: int) -> list[PartitionStats]:
        """One pass over every partition's records (this reads the whole store)."""
        out: list[PartitionStats] = []
        oldest = None if self.retention_ms is None else now_ms - self.retention_ms
        for tp in self.partitions():
            stats = PartitionStats(tp, watermark=self.watermark(tp), epoch=self.epoch(tp))
            for _, record in self.records(tp):
                stats.ids += 1
                stats.by_status[record.status.name.lower()] += 1
                stats.responses += 0 if record.response is None else 1
                if oldest is not None and record.decided_at_ms < oldest:
                    stats.expired += 1
            effects = self._family(_cf_name(tp, effects=True))
            if effects is not None:
                stats.effects = sum(1 for _ in effects.keys())  # noqa: SIM118 (an Rdict)
            for family in (self._family(_cf_name(tp)), effects):
                if family is not None:
                    stats.bytes += sum(family.property_int_value(p) or 0 for p in _SIZES)
            out.append(stats)
        return out

    def expiry(self, record: IdRecord) -> int | None:
        """When the retention sweep may drop ``record`` (ms), or None."""
        return None if self.retention_ms is None else record.decided_at_ms + self.retention_ms

    def _family(self, name: str) -> Rdict | None:
        return self._db.get_column_family(name) if name in self._families else None

    def close(self) -> None:
        del self._meta
        self._db.close()
        self._scratch.cleanup()
