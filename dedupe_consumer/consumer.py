"""``DedupeConsumer``: the loop that drives the engine from a source.

poll → ``Engine.process`` (decide, persist) → commit → repeat. The loop holds
the offsets that are durable but not yet committed; a failed commit is logged
and retried with the next batch, never fatal: the watermark in the store
already covers those offsets (invariant 2), so a restart skips them anyway.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import structlog
from confluent_kafka import KafkaException

from dedupe_consumer._faults import fault_point
from dedupe_consumer.config import Settings
from dedupe_consumer.dead_letters import DeadLetterSink
from dedupe_consumer.engine import BatchResult, Engine
from dedupe_consumer.handler import Handler
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.kafka.logs import kafka_error_fields
from dedupe_consumer.models import BatchStats, TopicPartition
from dedupe_consumer.observability import Metrics, configure_logging
from dedupe_consumer.observability.progress import ProgressLog
from dedupe_consumer.sources import PartitionLog, Source, SourceFactory
from dedupe_consumer.store import ProcessedStore, RocksStore

log = structlog.get_logger("dedupe_consumer")


class DedupeConsumer:
    """Runs ``handler`` once per unseen event ID of ``settings.kafka.topics``.

    ``source``, ``dead_letters`` and ``store`` default to Kafka, a Kafka
    dead-letter topic and RocksDB at ``store.path``; the replay harness passes
    its own, and the engine and this loop stay the same.
    """

    def __init__(
        self,
        handler: Handler,
        settings: Settings,
        *,
        source: SourceFactory | None = None,
        dead_letters: DeadLetterSink | None = None,
        store: ProcessedStore | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._source_factory = source
        self._dead_letters = dead_letters
        self._store = store
        self._pending: dict[TopicPartition, int] = {}
        self._engine: Engine | None = None
        self._changelog: Changelog | None = None
        self._stop = threading.Event()
        self.totals = BatchStats()

    # -- assignment listener ---------------------------------------------------------------

    def on_assigned(
        self,
        tps: Sequence[TopicPartition],
        logs: Mapping[TopicPartition, PartitionLog] | None = None,
    ) -> Mapping[TopicPartition, int | None]:
        assert self._engine is not None
        return self._engine.assign(tps, logs)

    def on_revoked(self, tps: Sequence[TopicPartition]) -> Mapping[TopicPartition, int]:
        assert self._engine is not None
        self._engine.release(tps)
        return {tp: self._pending.pop(tp) for tp in tps if tp in self._pending}

    def on_lost(self, tps: Sequence[TopicPartition]) -> None:
        assert self._engine is not None
        self._engine.release(tps)
        for tp in tps:
            self._pending.pop(tp, None)

    # -- the loop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the event in hand, persist and commit what is decided, then return."""
        self._stop.set()
        if self._engine is not None:
            self._engine.request_stop()

    def run(
        self,
        *,
        until: Callable[[BatchStats], bool] | None = None,
        on_batch: Callable[[BatchResult], None] | None = None,
        install_signal_handlers: bool = True,
    ) -> BatchStats:
        """Consume until stopped (SIGTERM/SIGINT, :meth:`stop`, or ``until(totals)``).

        Logging follows ``observability.log_level`` and ``log_format`` unless the
        application configured structlog itself first (then its set-up is kept).
        """
        settings = self.settings
        if not structlog.is_configured():
            configure_logging(settings.observability.log_level, settings.observability.log_format)
        store = self._store or RocksStore(
            settings.store.path,
            retention_ms=int(settings.dedupe.retention.total_seconds() * 1000),
            block_cache_mb=settings.store.block_cache_mb,
        )
        dead_letters = self._dead_letters
        owned_dead_letters = None
        if dead_letters is None:
            from dedupe_consumer.kafka import KafkaDeadLetters

            dead_letters = owned_dead_letters = KafkaDeadLetters(settings)
        changelog = None
        if self._source_factory is None and settings.store.changelog:
            changelog = Changelog(
                settings.kafka.connection(),
                settings.kafka.group_id,
                settings.dedupe.retention,
                f"dedupe-consumer.{settings.kafka.group_id}.{store.instance_id}",
                settings.kafka.producer,
                store_path=str(settings.store.path),
            )
        walk_budget_s = None
        if self._source_factory is None:
            # Keep polling well inside max.poll.interval.ms: a slow batch is cut and its
            # rest re-read, instead of costing the group membership.
            poll_interval_ms = int(settings.kafka.consumer.get("max.poll.interval.ms", 300_000))
            walk_budget_s = 0.6 * poll_interval_ms / 1000
        engine = self._engine = Engine(
            self.handler,
            settings,
            store,
            dead_letters,
            metrics=self.metrics,
            changelog=changelog,
            walk_budget_s=walk_budget_s,
        )
        if self._stop.is_set():
            engine.request_stop()
        restore = self._install_signals() if install_signal_handlers else None
        port, host = settings.observability.metrics_port, settings.observability.metrics_host
        metrics_server = None if port is None else self.metrics.serve(port, host)
        self.handler.setup()
        source: Source | None = None
        try:
            self._changelog = changelog
            source = self._open_source()
            progress = ProgressLog(settings.observability.progress_interval)
            batch_size = settings.processing.batch_size
            timeout_s = settings.processing.poll_timeout.total_seconds()
            while not engine.stopping:
                progress.tick(self.totals)
                messages = source.poll(batch_size, timeout_s)
                if not messages:
                    engine.idle()
                    self._commit(source)  # retry a commit that failed earlier
                    if until is not None and until(self.totals):
                        break
                    continue
                result = engine.process(messages)
                self._pending.update(result.commits)
                self._commit(source)
                if result.rewind:
                    try:
                        source.seek(result.rewind)
                    except KafkaException as exc:  # revoked meanwhile: its new owner reads it
                        log.warning(
                            "seek_failed",
                            error=str(exc),
                            offsets={str(tp): o for tp, o in result.rewind.items()},
                        )
                fault_point("after_commit")
                self.totals.merge(result.stats)
                if on_batch is not None:
                    on_batch(result)
                if result.error is not None:
                    raise result.error
                if until is not None and until(self.totals):
                    break
        finally:
            if source is not None:
                self._commit(source)
                source.close()
            store.close() if self._store is None else None
            if owned_dead_letters is not None:
                owned_dead_letters.close()
            if changelog is not None:
                changelog.close()
            self.handler.teardown()
            if restore is not None:
                restore()
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            log.info(
                "stopped",
                consumed=self.totals.consumed,
                handled=self.totals.handled,
                duplicates=self.totals.duplicates,
                replays=self.totals.replays,
                dead_lettered=self.totals.dead_lettered,
                conflicts=self.totals.conflicts,
            )
        return self.totals

    def _open_source(self) -> Source:
        if self._source_factory is not None:
            return self._source_factory(self)
        from dedupe_consumer.kafka import KafkaSource

        source = KafkaSource(self.settings, self, metrics=self.metrics)
        if self._changelog is not None:
            # Each changelog transaction commits the source offsets with the group
            # metadata of the batch's poll: the broker fences a stale owner.
            self._changelog.group_metadata = source.consumer_group_metadata
            self._changelog.live_group_metadata = source.live_group_metadata
            self._changelog.on_offsets_committed = source.committed_in_transaction
        return source

    def _commit(self, source: Source) -> None:
        if not self._pending:
            return
        offsets = dict(self._pending)
        for attempt in range(3):
            try:
                source.commit(offsets)
            except KafkaException as exc:
                self.metrics.commit_failures.inc()
                log.warning(
                    "commit_failed",
                    **kafka_error_fields(exc),
                    attempt=attempt + 1,
                    note="offsets stay covered by the durable watermark",
                )
                time.sleep(0.1 * (attempt + 1))
                continue
            for tp, offset in offsets.items():
                if self._pending.get(tp) == offset:
                    del self._pending[tp]
            return

    def _stop_on_signal(self, signum: int) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        self.stop()

    def _install_signals(self) -> Callable[[], None] | None:
        # _stop_on_signal runs on a thread of its own, never inside the signal frame.
        from dedupe_consumer.signals import install_stop_handlers

        return install_stop_handlers(self._stop_on_signal)
