"""RocksDB implementation of the processed-ID store (via rocksdict).

Layout: one column family per source topic-partition (``p:<topic>:<partition>``,
key = event ID, value = 25-byte :class:`IdRecord`) and a ``meta`` column
family for watermarks. Column families are opened with the options they were
created with (a reopen without them silently drops the bloom filters), all
share one block cache and one write-buffer budget, so memory is bounded by
configuration rather than by the number of partitions or IDs.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import structlog
from rocksdict import (
    BlockBasedOptions,
    Cache,
    ColumnFamily,
    DBCompressionType,
    Options,
    Rdict,
    WriteBatch,
    WriteBufferManager,
    WriteOptions,
)

from dedupe_consumer.errors import StoreError, StoreLockedError
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store.base import (
    RECORD_BYTES,
    RECORD_STATUSES,
    IdRecord,
    WriteSet,
    unreadable_record,
)

log = structlog.get_logger("dedupe_consumer.store")

_META = "meta"
_INSTANCE_KEY = b"instance-id"
_RETENTION_KEY = b"retention-ms"
_WATERMARK = struct.Struct(">q")
_DECIDED_AT = struct.Struct(">Q")  # IdRecord bytes 9..17


def _cf_name(tp: TopicPartition, *, effects: bool = False) -> str:
    # ':' cannot appear in a Kafka topic name, so the name is unambiguous.
    return f"{'e' if effects else 'p'}:{tp.topic}:{tp.partition}"


def _watermark_key(tp: TopicPartition) -> bytes:
    return b"wm:" + _cf_name(tp).encode()


def _changelog_key(tp: TopicPartition) -> bytes:
    return b"cl:" + _cf_name(tp).encode()


def _epoch_key(tp: TopicPartition) -> bytes:
    return b"ep:" + _cf_name(tp).encode()


class RocksStore:
    """One RocksDB per consumer instance; see the module docstring for the layout."""

    def __init__(
        self,
        path: str | Path,
        *,
        retention_ms: int,
        block_cache_mb: int = 64,
        write_buffer_mb: int = 64,
    ) -> None:
        self.path = Path(path)
        self.retention_ms = retention_ms
        self._prepare_directory()
        self._cache = Cache(block_cache_mb * 1024 * 1024)
        self._buffers = WriteBufferManager(write_buffer_mb * 1024 * 1024, False)
        self._sync = WriteOptions()
        self._sync.sync = True
        self._unsynced = WriteOptions()  # a restore's chunks before its last (apply_restored)
        existing = Rdict.list_cf(str(self.path)) if (self.path / "CURRENT").exists() else []
        families = {name: self._options() for name in existing if name != "default"}
        families.setdefault(_META, self._options())
        try:
            self._db = Rdict(str(self.path), self._options(), column_families=families)
        except Exception as exc:
            if "lock" in str(exc).lower():
                raise StoreLockedError(
                    f"store {str(self.path)!r} is already open by another consumer "
                    f"(RocksDB lock held: {exc}); give each consumer instance its own "
                    "store.path"
                ) from exc
            raise StoreError(f"cannot open store {str(self.path)!r}: {exc}") from exc
        self._meta = self._db.get_column_family(_META)
        self._families: dict[TopicPartition, Rdict] = {}
        self._effect_families: dict[TopicPartition, Rdict] = {}
        self._sweep_cursor: dict[str, bytes | None] = {}
        self._decided_floor: dict[str, float] = {}
        """Per record family, no live record was decided before this (ms): the sweep skips
        the family while nothing can have expired. Known once a pass has seen every key."""
        self._pass_floor: dict[str, float] = {}
        """The oldest decision seen or written since the family's current pass began."""
        self._floor_lock = threading.Lock()  # persist runs on the persister thread
        self._note_retention()

    def _note_retention(self) -> None:
        """Log once when ``dedupe.retention`` changed since the last start; it applies at once.

        Reads and the sweep use the current retention, and expired IDs leave the
        changelog by tombstones, so nothing else has to be altered.
        """
        raw = self._meta.get(_RETENTION_KEY)
        stored = None if raw is None else int(_WATERMARK.unpack(raw)[0])
        if stored == self.retention_ms:
            return
        if stored is not None:
            log.warning(
                "retention_changed",
                store=str(self.path),
                old_retention_ms=stored,
                new_retention_ms=self.retention_ms,
                effect="applies now: IDs older than the new retention read as absent and "
                "are swept (and tombstoned in the changelog)",
            )
        self._meta.put(_RETENTION_KEY, _WATERMARK.pack(self.retention_ms), self._sync)

    def _prepare_directory(self) -> None:
        """Create the directory 0700, or check an existing one without changing it.

        Only a directory the library creates is the library's to chmod (it holds
        event IDs: not for other local users); ``store.path = "/tmp"`` must not
        make /tmp private. An existing directory that other users can write to
        is refused: they could replace the store's files.
        """
        where = f"store.path {str(self.path)!r}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir(mode=0o700)
            self.path.chmod(0o700)  # ours: mkdir's mode went through the umask
        except FileExistsError:
            pass  # someone else's, or ours from an earlier run: checked below
        except OSError as exc:
            raise StoreError(
                f"cannot create store directory {str(self.path)!r} (store.path): {exc}"
            ) from exc
        try:
            info = self.path.stat()
        except OSError as exc:
            raise StoreError(f"cannot use {where}: {exc}") from exc
        if not stat.S_ISDIR(info.st_mode):
            raise StoreError(f"{where} is not a directory; point store.path to a directory")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            inside = str(self.path / "dedupe-state")
            raise StoreError(
                f"{where} is writable by other users (mode {stat.S_IMODE(info.st_mode):04o}), "
                "who could replace the store's files; run 'chmod go-w' on it, or set "
                f"store.path to a new directory inside it, e.g. {inside!r}, "
                "which dedupe_consumer creates with mode 0700"
            )
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StoreError(f"{where} is not writable by this user")

    def _options(self) -> Options:
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.create_missing_column_families(True)
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)  # most lookups are misses: skip the disk read
        table.set_block_cache(self._cache)
        table.set_cache_index_and_filter_blocks(True)
        opts.set_block_based_table_factory(table)
        opts.set_write_buffer_manager(self._buffers)
        opts.set_write_buffer_size(16 * 1024 * 1024)
        opts.set_max_write_buffer_number(2)
        opts.set_compression_type(DBCompressionType.lz4())
        return opts

    def _family(self, tp: TopicPartition, *, effects: bool = False) -> Rdict:
        cache = self._effect_families if effects else self._families
        family = cache.get(tp)
        if family is None:
            name = _cf_name(tp, effects=effects)
            try:
                family = self._db.get_column_family(name)
            except Exception:
                family = self._db.create_column_family(name, self._options())
            cache[tp] = family
        return family

    def _handle(self, tp: TopicPartition, *, effects: bool = False) -> ColumnFamily:
        self._family(tp, effects=effects)
        return self._db.get_column_family_handle(_cf_name(tp, effects=effects))

    # -- ProcessedStore -------------------------------------------------------------------

    @property
    def instance_id(self) -> str:
        raw = self._meta.get(_INSTANCE_KEY)
        if raw is None:
            raw = uuid.uuid4().hex.encode()
            self._meta.put(_INSTANCE_KEY, raw, self._sync)
        return bytes(raw).decode()

    def watermark(self, tp: TopicPartition) -> int | None:
        raw = self._meta.get(_watermark_key(tp))
        return None if raw is None else int(_WATERMARK.unpack(raw)[0])

    def lookup(self, tp: TopicPartition, ids: Sequence[str], now_ms: int) -> list[IdRecord | None]:
        if not ids:
            return []
        raw: list[bytes | None] = self._family(tp).get([i.encode() for i in ids]) or []
        oldest = now_ms - self.retention_ms
        out: list[IdRecord | None] = []
        for data in raw:
            if data is None:
                out.append(None)
                continue
            record = IdRecord.decode(data)
            out.append(record if record.decided_at_ms >= oldest else None)
        return out

    def changelog_position(self, tp: TopicPartition) -> int | None:
        raw = self._meta.get(_changelog_key(tp))
        return None if raw is None else int(_WATERMARK.unpack(raw)[0])

    def epoch(self, tp: TopicPartition) -> bytes | None:
        raw = self._meta.get(_epoch_key(tp))
        return None if raw is None else bytes(raw)

    def set_epoch(self, tp: TopicPartition, epoch: bytes, *, reset_watermark: bool) -> None:
        batch = WriteBatch(raw_mode=True)
        meta = self._db.get_column_family_handle(_META)
        batch.put(_epoch_key(tp), epoch, meta)
        if reset_watermark:
            batch.delete(_watermark_key(tp), meta)
        self._write(batch)

    def _write(self, batch: WriteBatch) -> None:
        try:
            self._db.write(batch, self._sync)
        except Exception as exc:
            raise StoreError(f"cannot write to store {str(self.path)!r}: {exc}") from exc

    def persist(self, write: WriteSet) -> None:
        self._write_set(write, WriteBatch(raw_mode=True), self._sync)

    def apply_restored(
        self,
        tp: TopicPartition,
        decisions: Sequence[tuple[bytes, bytes | None]],
        write: WriteSet,
        *,
        sync: bool,
    ) -> None:
        batch = WriteBatch(raw_mode=True)
        if decisions:
            handle = self._handle(tp)
            put, delete = batch.put, batch.delete
            for event_id, record in decisions:  # millions: nothing decoded, no objects made
                if record is None:
                    delete(event_id, handle)
                    continue
                # The common case inline (a call per record costs seconds at 10M); any
                # other length or status gets the full check.
                if len(record) != RECORD_BYTES or record[0] not in RECORD_STATUSES:
                    why = unreadable_record(record)
                else:
                    why = None
                if why is not None:  # refused here, not at a lookup or a sweep much later
                    raise StoreError(
                        f"the changelog holds a record for ID {event_id[:200]!r} of {tp} "
                        f"that this version cannot read ({why}): written by a newer "
                        "version of dedupe_consumer, or not by it. No event of the partition "
                        "is decided on this state; run the version that wrote the changelog"
                    )
                put(event_id, record, handle)
            name = _cf_name(tp)
            if self._tracks_floor(name):  # a sweep pass saw this family: older records count
                decided = [_DECIDED_AT.unpack_from(r, 9)[0] for _, r in decisions if r is not None]
                if decided:
                    self._lower_floor(name, min(decided))
        # Unsynced unless asked: see ProcessedStore.apply_restored for why that is safe.
        self._write_set(write, batch, self._sync if sync else self._unsynced)

    def _write_set(self, write: WriteSet, batch: WriteBatch, sync: WriteOptions) -> None:
        for tp, items in write.records.items():
            handle = self._handle(tp)
            for event_id, record in items:
                batch.put(event_id.encode(), record.encode(), handle)
            if items:
                self._lower_floor(_cf_name(tp), min(r.decided_at_ms for _, r in items))
        for tp, ids in write.released.items():
            handle = self._handle(tp)
            for event_id in ids:
                batch.delete(event_id.encode(), handle)
        for tp, changes in write.effects.items():
            handle = self._handle(tp, effects=True)
            for key, value in changes:
                if value is None:
                    batch.delete(key, handle)
                else:
                    batch.put(key, value, handle)
        meta = self._db.get_column_family_handle(_META)
        for tp, offset in write.watermarks.items():
            batch.put(_watermark_key(tp), _WATERMARK.pack(offset), meta)
        for tp, offset in write.changelog_positions.items():
            batch.put(_changelog_key(tp), _WATERMARK.pack(offset), meta)
        try:
            self._db.write(batch, sync)
        except Exception as exc:
            raise StoreError(f"cannot write to store {str(self.path)!r}: {exc}") from exc

    def effect(self, tp: TopicPartition, key: bytes) -> bytes | None:
        value: bytes | None = self._family(tp, effects=True).get(key)
        return value

    def effects(self, tp: TopicPartition) -> Iterator[tuple[bytes, bytes]]:
        """Every staged effect of ``tp``, in key order (for inspection and tests)."""
        yield from self._family(tp, effects=True).items()

    def sweep_expired(self, now_ms: int, budgets: Mapping[TopicPartition, int]) -> int:
        """Examine up to ``budgets[tp]`` records of each partition; delete the expired ones.

        Local only (unsynced): for partitions this instance does not own. An
        owner removes expired IDs with :meth:`find_expired` and a persist, so
        that its changelog gets the same deletions as tombstones.
        """
        deleted = 0
        batch = WriteBatch(raw_mode=True)
        for tp, keys in self._expired_keys(now_ms, budgets).items():
            handle = self._handle(tp)
            for key in keys:
                batch.delete(key, handle)
                deleted += 1
        if deleted:
            self._db.write(batch)
        return deleted

    def find_expired(
        self, now_ms: int, budgets: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, list[str]]:
        """Expired event IDs among up to ``budgets[tp]`` records of each partition."""
        return {
            tp: [key.decode() for key in keys]
            for tp, keys in self._expired_keys(now_ms, budgets).items()
            if keys
        }

    def _expired_keys(
        self, now_ms: int, budgets: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, list[bytes]]:
        """The bounded retention scan.

        A cursor per partition walks its key space and wraps, so every record is
        looked at again after ``records / budget`` calls. The engine gives each
        partition twice what it just wrote, so the sweep outpaces inserts where
        they happen and steady-state size stays near ``insert rate x 1.5 x
        retention`` whatever the total traffic (invariant 5).
        """
        oldest = now_ms - self.retention_ms
        found: dict[TopicPartition, list[bytes]] = {}
        for tp, budget in budgets.items():
            name = _cf_name(tp)
            keys = found[tp] = []
            if self._decided_floor.get(name, -math.inf) >= oldest:
                continue  # every record was decided since: none has expired
            it = self._family(tp).iter()
            cursor = self._sweep_cursor.get(name)
            if cursor is None:
                it.seek_to_first()
                self._begin_pass(name)
            else:
                it.seek(cursor)
            seen = 0
            wrapped = cursor is None
            floor = math.inf
            while seen < budget:
                if not it.valid():
                    self._end_pass(name, floor)  # every key seen since the pass began
                    floor = math.inf
                    if wrapped:
                        break
                    it.seek_to_first()  # wrap once, up to where this call started
                    self._begin_pass(name)
                    wrapped = True
                    continue
                key = it.key()
                if cursor is not None and wrapped and key >= cursor:
                    break
                decided_at = _DECIDED_AT.unpack_from(it.value(), 9)[0]  # no full decode
                if decided_at < oldest:
                    keys.append(bytes(key))
                floor = min(floor, decided_at)
                seen += 1
                it.next()
            self._lower_floor(name, floor, pass_only=True)
            self._sweep_cursor[name] = it.key() if it.valid() else None
            del it
        return found

    # The sweep's floor: a pass walks a family's keys from the first to the last (over
    # several calls); its oldest decision, with the oldest written meanwhile, bounds
    # every record then. Expired records count too: a floor only rises after a pass
    # that no longer finds them.

    def _begin_pass(self, name: str) -> None:
        with self._floor_lock:
            self._pass_floor[name] = math.inf

    def _end_pass(self, name: str, seen: float) -> None:
        with self._floor_lock:
            self._decided_floor[name] = min(self._pass_floor.pop(name, -math.inf), seen)

    def _lower_floor(self, name: str, decided_at: float, *, pass_only: bool = False) -> None:
        with self._floor_lock:
            if name in self._pass_floor:
                self._pass_floor[name] = min(self._pass_floor[name], decided_at)
            if not pass_only and name in self._decided_floor:
                self._decided_floor[name] = min(self._decided_floor[name], decided_at)

    def _tracks_floor(self, name: str) -> bool:
        with self._floor_lock:
            return name in self._decided_floor or name in self._pass_floor

    def _forget_floor(self, name: str) -> None:
        with self._floor_lock:
            self._decided_floor.pop(name, None)
            self._pass_floor.pop(name, None)

    def partitions(self) -> list[TopicPartition]:
        found: list[TopicPartition] = []
        for name in Rdict.list_cf(str(self.path)):
            kind, _, rest = name.partition(":")
            topic, _, partition = rest.rpartition(":")
            if kind == "p" and topic and partition.isdigit():
                found.append(TopicPartition(topic, int(partition)))
        return found

    def drop_partition(
        self, tp: TopicPartition, changelog_position: TopicPartition | None = None
    ) -> None:
        """Drop ``tp``'s column families and meta keys; only for state the changelog holds.

        The meta keys go first, synced: a crash before the families are dropped leaves
        no changelog position, so the next restore reads the changelog from its start.
        """
        meta = self._db.get_column_family_handle(_META)
        batch = WriteBatch(raw_mode=True)
        keys = [_watermark_key(tp), _changelog_key(tp), _epoch_key(tp)]
        if changelog_position is not None:
            keys.append(_changelog_key(changelog_position))
        for key in keys:
            batch.delete(key, meta)
        self._write(batch)
        existing = set(Rdict.list_cf(str(self.path)))
        for effects in (False, True):
            name = _cf_name(tp, effects=effects)
            (self._effect_families if effects else self._families).pop(tp, None)
            self._sweep_cursor.pop(name, None)
            self._forget_floor(name)
            if name in existing:
                try:
                    self._db.drop_column_family(name)
                except Exception as exc:
                    raise StoreError(f"cannot drop {name!r} in {str(self.path)!r}: {exc}") from exc

    def approximate_size(self) -> int:
        """Bytes of SST files and memtables, for metrics and benchmarks."""
        total = 0
        for name in ("rocksdb.total-sst-files-size", "rocksdb.cur-size-all-mem-tables"):
            for family in [self._meta, *self._families.values()]:
                total += family.property_int_value(name) or 0
        return total

    def close(self) -> None:
        # Column-family handles keep the DB (and its LOCK) alive: drop them first.
        self._families.clear()
        self._effect_families.clear()
        self._sweep_cursor.clear()
        del self._meta
        self._db.close()
