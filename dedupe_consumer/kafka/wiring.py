"""The default edges: Kafka in, a Kafka dead-letter topic, RocksDB, the changelog.

:func:`edges` is what ``DedupeConsumer(handler, settings)`` runs against. It is
the one place that decides how the Kafka parts are built from the settings and
wired to each other (the changelog to the consumer's group metadata).
"""

from __future__ import annotations

from collections.abc import Callable

from dedupe_consumer.config import Settings
from dedupe_consumer.contracts import AssignmentListener, Edges, Source
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.kafka.dead_letters import KafkaDeadLetters
from dedupe_consumer.kafka.source import KafkaSource
from dedupe_consumer.observability import Metrics
from dedupe_consumer.store import RocksStore

WALK_BUDGET_SHARE = 0.6
"""The share of ``max.poll.interval.ms`` one batch may spend in handlers."""


def edges(settings: Settings, *, metrics: Metrics | None = None) -> Edges:
    """The Kafka consumer of ``kafka.topics``, ``processing.dead_letter_topic``, RocksDB
    at ``store.path`` and, with ``store.changelog``, the changelog topics.

    The store, the dead-letter producer and the changelog are opened now; the
    consumer when the loop opens the source. The caller closes them with
    :meth:`Edges.close <dedupe_consumer.contracts.Edges.close>` (the consumer
    does, for the edges it builds itself).
    """
    metrics = metrics or Metrics()
    closers: list[Callable[[], None]] = []
    try:
        store = RocksStore(
            settings.store.path,
            retention_ms=int(settings.dedupe.retention.total_seconds() * 1000),
            block_cache_mb=settings.store.block_cache_mb,
        )
        closers.append(store.close)
        dead_letters = KafkaDeadLetters(settings)
        closers.append(dead_letters.close)
        changelog = None
        if settings.store.changelog:
            changelog = Changelog(
                settings.kafka.connection(),
                settings.kafka.group_id,
                settings.dedupe.retention,
                f"dedupe-consumer.{settings.kafka.group_id}.{store.instance_id}",
                settings.kafka.producer,
                store_path=str(settings.store.path),
            )
            closers.append(changelog.close)
    except BaseException:
        for close in reversed(closers):
            close()
        raise

    def open_source(listener: AssignmentListener) -> Source:
        return KafkaSource(settings, listener, metrics=metrics, changelog=changelog)

    return Edges(
        source=open_source,
        dead_letters=dead_letters,
        store=store,
        changelog=changelog,
        # Keep polling well inside max.poll.interval.ms: a slow batch is cut and its
        # rest re-read, instead of costing the group membership.
        walk_budget_s=WALK_BUDGET_SHARE * settings.kafka.max_poll_interval_ms / 1000,
        max_record_bytes=settings.kafka.max_message_bytes,
        closers=tuple(closers),
    )
