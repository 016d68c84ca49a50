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
from dedupe_consumer.kafka.permissions import check_permissions
from dedupe_consumer.kafka.repartition import (
    HoppedSource,
    Repartitioner,
    ensure_by_id_topics,
    refuse_mixed_scopes,
)
from dedupe_consumer.kafka.source import KafkaSource
from dedupe_consumer.observability import Metrics
from dedupe_consumer.scope import stage_settings
from dedupe_consumer.store import RocksStore

WALK_BUDGET_SHARE = 0.6
"""The share of ``max.poll.interval.ms`` one batch may spend in handlers."""


def edges(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    stopping: Callable[[], bool] | None = None,
) -> Edges:
    """The Kafka consumer of ``kafka.topics``, ``processing.dead_letter_topic``, RocksDB
    at ``store.path`` and, with ``store.changelog``, the changelog topics. With
    ``dedupe.scope = "topic"``, the consumer reads the by-id topics, fed by the hop
    (:mod:`dedupe_consumer.kafka.repartition`), which runs while the source is open.

    The store, the dead-letter producer and the changelog are opened now; the
    consumer when the loop opens the source. The caller closes them with
    :meth:`Edges.close <dedupe_consumer.contracts.Edges.close>` (the consumer
    does, for the edges it builds itself). ``stopping()`` true cuts the start-up
    checks that wait for the brokers short (a stop asked for during start-up).
    """
    metrics = metrics or Metrics()
    # Topic scope: the engine's side (its source, group and changelog) is the by-id topics'.
    by_id = settings.dedupe.scope == "topic"
    stage = stage_settings(settings) if by_id else settings
    # On a cluster with ACLs, a missing right stops the start here, named, with its fix.
    check_permissions(settings, stopping=stopping)
    closers: list[Callable[[], None]] = []
    try:
        store = RocksStore(
            settings.store.path,
            retention_ms=int(settings.dedupe.retention.total_seconds() * 1000),
            block_cache_mb=settings.store.block_cache_mb,
        )
        closers.append(store.close)
        dead_letters = KafkaDeadLetters(settings, stopping=stopping)
        closers.append(dead_letters.close)
        changelog = None
        if settings.store.changelog:
            changelog = Changelog(
                stage.kafka.connection(),
                stage.kafka.group_id,
                stage.dedupe.retention,
                f"dedupe-consumer.{stage.kafka.group_id}.{store.instance_id}",
                stage.kafka.producer,
                store_path=str(stage.store.path),
            )
            closers.append(changelog.close)
    except BaseException:
        for close in reversed(closers):
            close()
        raise

    def open_source(listener: AssignmentListener) -> Source:
        refuse_mixed_scopes(settings)  # a group runs one scope
        if not by_id:
            return KafkaSource(settings, listener, metrics=metrics, changelog=changelog)
        partitions = ensure_by_id_topics(settings)  # before the stage subscribes to them
        hop = Repartitioner(
            settings,
            partitions,
            f"dedupe-consumer.{settings.kafka.group_id}.hop.{store.instance_id}",
            metrics,
        )
        hop.start()
        try:
            return HoppedSource(
                KafkaSource(stage, listener, metrics=metrics, changelog=changelog), hop
            )
        except BaseException:
            hop.stop()
            raise

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
