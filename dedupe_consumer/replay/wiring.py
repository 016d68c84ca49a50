"""The replay edges: a recording in, dead letters kept in memory, a local RocksDB.

:func:`edges` is what :func:`~dedupe_consumer.replay.replay_recording` runs the
consumer against; a test can pass them to a
:class:`~dedupe_consumer.DedupeConsumer` itself. No Kafka client and no
``[kafka]`` settings are involved, and there is no changelog.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dedupe_consumer.consumer import LoopSettings
from dedupe_consumer.contracts import Edges
from dedupe_consumer.dead_letters import MemoryDeadLetters
from dedupe_consumer.replay.format import Recording
from dedupe_consumer.replay.records import Record
from dedupe_consumer.replay.source import ReplayFeed
from dedupe_consumer.store import Output, RocksStore


@dataclass(frozen=True, kw_only=True)
class ReplayEdges(Edges):
    """:class:`~dedupe_consumer.contracts.Edges` whose parts a test can inspect afterwards."""

    source: ReplayFeed
    """``source.committed``: what the loop committed; ``source.exhausted``: all handed out."""
    dead_letters: MemoryDeadLetters
    """``dead_letters.letters``: every dead letter, in order."""
    store: RocksStore
    outputs: list[Output] = field(default_factory=list)
    """What the handler emitted (``event.emit``), in the order persisted."""


def edges(
    records: Recording | Sequence[Record],
    settings: LoopSettings,
    *,
    redeliver_batches: bool = False,
    max_record_bytes: int = 1_000_000,
) -> ReplayEdges:
    """Edges that feed ``records`` (a whole recording, or records) to the loop.

    The store opens now at ``settings.store.path`` with ``dedupe.retention``;
    close it with :meth:`~dedupe_consumer.contracts.Edges.close`.
    ``redeliver_batches`` hands every batch out twice, as a consumer restarted
    between persist and commit would see it. ``max_record_bytes`` bounds a
    staged effect as the changelog producer's ``message.max.bytes`` would.
    """
    if isinstance(records, Recording):
        records = records.records
    store = RocksStore(
        settings.store.path,
        retention_ms=int(settings.dedupe.retention.total_seconds() * 1000),
        block_cache_mb=settings.store.block_cache_mb,
    )
    return ReplayEdges(
        source=ReplayFeed(records, redeliver_batches=redeliver_batches),
        dead_letters=MemoryDeadLetters(),
        store=store,
        max_record_bytes=max_record_bytes,
        closers=(store.close,),
    )
