"""Is the retention right? Duplicate traffic measured on real messages (no Kafka here).

``dedupe.retention`` too short lets a late copy through as new; too long costs disk.
:func:`analyze` reads messages (a recording or a topic, given by the caller) the way
the consumer would: it extracts each event ID as ``dedupe.id_source`` says, and
measures how often an ID repeats, how many repeats carry another payload
(conflicts), how many messages have no usable ID, and how long after an ID's first
appearance its copies come (by message timestamps). :func:`recommend` turns that into
a retention and what the store would hold with it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from dedupe_consumer.ids import IdExtractor, MissingId
from dedupe_consumer.models import SourceMessage, as_bytes

__all__ = ["Analysis", "Recommendation", "analyze", "recommend"]

_RECORD_BYTES = 25
_ROCKSDB_OVERHEAD = 0
"""Bytes RocksDB adds per ID on disk besides key and value: none to speak of, because lz4
compression offsets its internal key and index bytes. Measured on this store's layout:
60.8 bytes per UUID ID for 61 of key and value (tests/unit/test_analysis.py measures it
again)."""
_HOUR, _DAY = 3600.0, 86400.0
_MIN_SPAN_S = 60.0


@dataclass(slots=True)
class Analysis:
    messages: int = 0
    without_id: int = 0
    unique_ids: int = 0
    duplicates: int = 0
    """Repeats with the first copy's payload."""
    conflicts: int = 0
    """Repeats with another payload (``dedupe.on_conflict`` decides them)."""
    gaps_s: list[float] = field(default_factory=list)
    """Seconds from each repeated ID's first appearance to the repeat, sorted."""
    other_partition: int = 0
    """Repeats on another partition (or topic) than their ID's first copy: with
    ``dedupe.scope = "partition"`` each partition keeps its own records, so these are
    handled again whatever the retention."""
    other_partition_gaps_s: list[float] = field(default_factory=list)
    """The gaps of those repeats (a subset of ``gaps_s``), sorted."""
    id_bytes: int = 0
    """Total UTF-8 bytes of the unique IDs."""
    first_ms: int | None = None
    last_ms: int | None = None

    def percentile(self, share: float) -> float | None:
        """The gap below which ``share`` of the repeats came (nearest rank), or None."""
        if not self.gaps_s:
            return None
        rank = max(1, math.ceil(share * len(self.gaps_s)))
        return self.gaps_s[rank - 1]

    @property
    def span_s(self) -> float:
        if self.first_ms is None or self.last_ms is None:
            return 0.0
        return max(0.0, (self.last_ms - self.first_ms) / 1000)

    @property
    def repeats(self) -> int:
        return self.duplicates + self.conflicts

    def missed_by(self, retention_s: float) -> int:
        """Repeats a retention of ``retention_s`` would have let through as new."""
        return sum(1 for gap in self.gaps_s if gap > retention_s)

    def handled_again(self, retention_s: float, scope: str = "partition") -> int:
        """Repeats the consumer would take for new events: those after their ID expired
        and, with ``scope = "partition"``, those on another partition than the first
        copy (each counted once)."""
        late = self.missed_by(retention_s)
        if scope == "topic":
            return late
        late_elsewhere = sum(1 for gap in self.other_partition_gaps_s if gap > retention_s)
        return late + self.other_partition - late_elsewhere


def analyze(messages: Iterable[SourceMessage], extract: IdExtractor) -> Analysis:
    """One pass over ``messages``; memory grows with the number of unique IDs."""
    out = Analysis()
    first: dict[str, tuple[int | None, bytes, tuple[str | None, int | None]]] = {}
    for message in messages:
        out.messages += 1
        kind, ms = message.timestamp()
        stamp = ms if kind and ms >= 0 else None
        if stamp is not None:
            out.first_ms = stamp if out.first_ms is None else min(out.first_ms, stamp)
            out.last_ms = stamp if out.last_ms is None else max(out.last_ms, stamp)
        try:
            event_id = extract(message)
        except (MissingId, ValueError, UnicodeError):
            out.without_id += 1
            continue
        digest = hashlib.blake2b(as_bytes(message.value()) or b"", digest_size=8).digest()
        seen = first.get(event_id)
        where = (message.topic(), message.partition())
        if seen is None:
            first[event_id] = (stamp, digest, where)
            out.unique_ids += 1
            out.id_bytes += len(event_id.encode())
            continue
        if digest == seen[1]:
            out.duplicates += 1
        else:
            out.conflicts += 1
        elsewhere = where != seen[2]
        out.other_partition += elsewhere
        if stamp is not None and seen[0] is not None:
            gap = max(0.0, (stamp - seen[0]) / 1000)
            out.gaps_s.append(gap)
            if elsewhere:
                out.other_partition_gaps_s.append(gap)
    out.gaps_s.sort()
    out.other_partition_gaps_s.sort()
    return out


@dataclass(frozen=True, slots=True)
class Recommendation:
    retention_s: float
    why: str
    bytes_per_id: float
    store_bytes: float | None
    """What the store would hold at this traffic with that retention (None: the messages
    span under a minute, or carry no timestamps: no rate to go by)."""


def _round_up(seconds: float) -> float:
    """Up to a whole hour below a day, else a whole day."""
    if seconds <= _DAY:
        return max(_HOUR, math.ceil(seconds / _HOUR) * _HOUR)
    return math.ceil(seconds / _DAY) * _DAY


def recommend(analysis: Analysis) -> Recommendation:
    """Cover the latest repeat seen with half of it again as headroom (at least 1 h), and
    say what the store would hold with that retention at the measured rate of new IDs."""
    latest = analysis.gaps_s[-1] if analysis.gaps_s else 0.0
    retention = _round_up(1.5 * latest)
    why = (
        f"the latest repeat came {latest / _HOUR:.1f} h after its first copy; 1.5x that, rounded up"
        if analysis.gaps_s
        else "no repeat with timestamps was seen: the minimum of 1 h"
    )
    mean_id = analysis.id_bytes / analysis.unique_ids if analysis.unique_ids else 36.0
    per_id = _RECORD_BYTES + mean_id + _ROCKSDB_OVERHEAD
    # A rate over less than a minute says nothing about a day (a burst, a test topic).
    rate = analysis.unique_ids / analysis.span_s if analysis.span_s >= _MIN_SPAN_S else None
    store = None if rate is None else rate * retention * per_id
    return Recommendation(retention, why, per_id, store)
