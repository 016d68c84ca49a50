"""``DedupeConsumer``: the loop that drives the engine from a source.

poll → ``Engine.process`` (decide, persist) → commit → repeat. The consumer is
the composition root: it runs against :class:`~dedupe_consumer.contracts.Edges`
(source, dead-letter sink, store, changelog) that it is given, or builds with
:func:`dedupe_consumer.kafka.edges`. The source owns the offsets that are
durable but not committed yet; a failed commit
(:class:`~dedupe_consumer.errors.CommitError`) is logged and retried by the
source later, never fatal: the watermark in the store already covers those
offsets (invariant 2), so a restart skips them anyway.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import structlog

from dedupe_consumer._faults import fault_point
from dedupe_consumer.config import (
    DedupeSettings,
    ObservabilitySettings,
    PayloadSettings,
    ProcessingSettings,
    Settings,
    StoreSettings,
    TracingSettings,
)
from dedupe_consumer.contracts import BatchResult, Edges, PartitionLog, Source
from dedupe_consumer.engine import Engine
from dedupe_consumer.errors import CommitError, ConfigError, RegistryWaitStopped
from dedupe_consumer.handler import Handler
from dedupe_consumer.models import BatchStats, TopicPartition
from dedupe_consumer.observability import Metrics, configure_logging
from dedupe_consumer.observability.progress import ProgressLog
from dedupe_consumer.observability.tracing import EventTracing, start_tracing
from dedupe_consumer.payloads import PayloadDecoder

log = structlog.get_logger("dedupe_consumer")

PartitionHook = Callable[[Sequence[TopicPartition]], object]
"""Called with the partitions assigned, revoked or lost (see :meth:`DedupeConsumer.on_assign`)."""

_Hook = TypeVar("_Hook", bound=Callable[..., object])


class LoopSettings(Protocol):
    """The sections the loop and the engine read: :class:`~dedupe_consumer.Settings` has
    them; a replay passes just these (it has no ``[kafka]``)."""

    @property
    def dedupe(self) -> DedupeSettings: ...
    @property
    def processing(self) -> ProcessingSettings: ...
    @property
    def store(self) -> StoreSettings: ...
    @property
    def payload(self) -> PayloadSettings: ...
    @property
    def observability(self) -> ObservabilitySettings: ...


@dataclass(frozen=True)
class _Hooks:
    """What extensions registered (see :meth:`DedupeConsumer.on_assign` and co.)."""

    assign: list[PartitionHook] = field(default_factory=list)
    revoke: list[PartitionHook] = field(default_factory=list)
    lost: list[PartitionHook] = field(default_factory=list)
    stop: list[Callable[[], object]] = field(default_factory=list)


class _Listener:
    """The loop's side of the source's rebalance callbacks: the engine, then the hooks."""

    def __init__(self, engine: Engine, hooks: _Hooks) -> None:
        self.engine = engine
        self.hooks = hooks

    def prepare(self, tps: Sequence[TopicPartition]) -> Sequence[TopicPartition]:
        return self.engine.prepare(tps)

    def restore(self, tp: TopicPartition, stopping: Callable[[], bool]) -> int:
        return self.engine.restore(tp, stopping)

    def on_restore_cancelled(self, tps: Sequence[TopicPartition]) -> None:
        self.engine.cancel_restore(tps)

    def on_assigned(
        self,
        tps: Sequence[TopicPartition],
        logs: Mapping[TopicPartition, PartitionLog] | None = None,
        restored: Mapping[TopicPartition, int] | None = None,
    ) -> Mapping[TopicPartition, int | None]:
        starts = self.engine.assign(tps, logs, restored)  # hooks see partitions ready
        for hook in self.hooks.assign:
            hook(tps)
        return starts

    def on_revoked(self, tps: Sequence[TopicPartition]) -> Mapping[TopicPartition, int]:
        commits = self.engine.release(tps)
        _call_hooks(self.hooks.revoke, tps, "on_revoke")
        return commits

    def on_lost(self, tps: Sequence[TopicPartition]) -> None:
        self.engine.release(tps, lost=True)
        _call_hooks(self.hooks.lost, tps, "on_lost")


def _call_hooks(hooks: list[PartitionHook], tps: Sequence[TopicPartition], kind: str) -> None:
    """The partitions go whatever a hook does: a failing one is logged, the rest still run."""
    for hook in hooks:
        try:
            hook(tps)
        except Exception:
            log.exception("hook_failed", hook=kind, partitions=[str(tp) for tp in tps])


def _each(*steps: Callable[[], object] | None) -> None:
    """Run every step; raise the first failure once all have run."""
    failure: BaseException | None = None
    for step in steps:
        if step is None:
            continue
        try:
            step()
        except BaseException as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


class DedupeConsumer:
    """Runs ``handler`` once per unseen event ID of ``settings.kafka.topics``.

    ``edges`` default to :func:`dedupe_consumer.kafka.edges`: the Kafka consumer,
    the dead-letter topic, RocksDB at ``store.path`` and the changelog, built by
    :meth:`run` and closed when it returns. Edges passed in (a replay's, say)
    stay the caller's to close; the engine and this loop are the same either way.
    """

    def __init__(
        self,
        handler: Handler,
        settings: LoopSettings,
        *,
        edges: Edges | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if edges is None and not isinstance(settings, Settings):
            raise ConfigError(
                f"DedupeConsumer got {type(settings).__name__} without edges=: consuming "
                "from Kafka needs the whole Settings (with [kafka]); pass edges= to run on "
                "something else (e.g. dedupe_consumer.replay.edges(...))"
            )
        self.handler = handler
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._edges = edges
        self._hooks = _Hooks()
        self._engine: Engine | None = None
        self._stop = threading.Event()
        self.totals = BatchStats()

    # -- hooks for extensions --------------------------------------------------------------

    def on_assign(self, hook: _Hook) -> _Hook:
        """Call ``hook(partitions)`` after partitions are assigned and their state restored.

        Runs on the consuming thread, inside the poll. An exception it raises stops
        :meth:`run` (the partitions are not ready for you). Returns ``hook`` (usable as
        a decorator).
        """
        self._hooks.assign.append(hook)
        return hook

    def on_revoke(self, hook: _Hook) -> _Hook:
        """Call ``hook(partitions)`` when partitions are revoked, before their offsets are
        committed and they go. An exception it raises is logged (``hook_failed``): the
        partitions go all the same. Returns ``hook``."""
        self._hooks.revoke.append(hook)
        return hook

    def on_lost(self, hook: _Hook) -> _Hook:
        """Call ``hook(partitions)`` when partitions were lost (taken away without a
        revocation: nothing is committed for them). Returns ``hook``."""
        self._hooks.lost.append(hook)
        return hook

    def on_stop(self, hook: _Hook) -> _Hook:
        """Call ``hook()`` when a stop is requested (:meth:`stop`, SIGTERM/SIGINT), after the
        engine was told to stop; on the thread that asked. Returns ``hook``."""
        self._hooks.stop.append(hook)
        return hook

    # -- the loop --------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Finish the event in hand, persist and commit what is decided, then return."""
        self._stop.set()
        if self._engine is not None:
            self._engine.request_stop()
        for hook in self._hooks.stop:
            hook()

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
        payloads = PayloadDecoder.from_settings(  # a protobuf class that cannot load: here
            settings.payload,
            cloudevents=settings.dedupe.id_source == "cloudevents",
            stopping=self._stop,
        )
        tracing = self._start_tracing()  # a configuration error before anything is opened
        edges = self._edges
        if edges is None:  # the default: built here, so closed here
            assert isinstance(settings, Settings)  # checked in __init__
            from dedupe_consumer.kafka import edges as kafka_edges

            try:
                edges = kafka_edges(settings, metrics=self.metrics, stopping=self._stop.is_set)
            except BaseException:
                if tracing is not None:
                    tracing.close()
                raise
        source: Source | None = None
        restore: Callable[[], None] | None = None
        metrics_server = None
        started = False
        self._engine = None
        try:
            engine = self._engine = Engine(
                self.handler,
                settings.dedupe,
                settings.processing,
                edges.store,
                edges.dead_letters,
                sweep_keys=settings.store.sweep_keys,
                revoked_state_grace=settings.store.revoked_state_grace,
                max_record_bytes=edges.max_record_bytes,
                metrics=self.metrics,
                changelog=edges.changelog,
                walk_budget_s=edges.walk_budget_s,
                outputs=edges.outputs,
                tracing=tracing,
                payloads=payloads,
            )
            if self._stop.is_set():
                engine.request_stop()
            restore = self._install_signals() if install_signal_handlers else None
            port, host = settings.observability.metrics_port, settings.observability.metrics_host
            metrics_server = None if port is None else self.metrics.serve(port, host)
            engine.setup_handler()
            started = True
            if engine.stopping:  # stopped during start-up: nothing read, no group to join
                return self.totals
            source = edges.source(_Listener(engine, self._hooks))
            progress = ProgressLog(settings.observability.progress_interval)
            batch_size = settings.processing.batch_size
            timeout_s = settings.processing.poll_timeout.total_seconds()
            done = False
            try:
                while not done and not engine.stopping:
                    progress.tick(self.totals)
                    messages = source.poll(batch_size, timeout_s)
                    if not messages:
                        # Nothing new: the batch being persisted is waited for, so an idle
                        # consumer has everything durable and committed.
                        self._apply(source, engine.drain(), on_batch)
                        engine.idle()
                        done = until is not None and until(self.totals)
                        continue
                    # Decides this batch while the one before becomes durable, and returns
                    # what is durable now (invariant 1: commit after persist).
                    self._apply(source, engine.pipeline(messages, source.keep_alive), on_batch)
                    done = until is not None and until(self.totals)
                self._apply(source, engine.drain(final=True), on_batch)
            except RegistryWaitStopped:
                # A stop request ended a wait for the Schema Registry while a batch's IDs
                # were read (phase 1): nothing of that batch was decided. It is a stop, not
                # a failure: the cleanup below drains what was decided before it and
                # commits what is durable, as it does after any error.
                if not self._stop.is_set():
                    raise
                log.info("stopped_while_waiting_for_the_schema_registry")
        finally:
            # Each step runs even if one before it failed: a RocksDB lock left held would
            # stop the next start. The first failure is raised after the last step.
            _each(
                # The persister done before the source goes: its transaction needs the
                # group's metadata, and what it made durable is committed by close.
                self._engine.drain if self._engine is not None else None,
                source.close if source is not None else None,  # commits what is durable
                edges.close if self._edges is None else None,
                engine.teardown_handler if started else None,
                self._engine.close if self._engine is not None else None,
                restore,
                metrics_server.shutdown if metrics_server is not None else None,
                metrics_server.server_close if metrics_server is not None else None,
                tracing.close if tracing is not None else None,  # the last spans exported
            )
            if started:
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

    def _start_tracing(self) -> EventTracing | None:
        """``[tracing]``: a tracer when enabled (a replay's settings have no such section)."""
        section = getattr(self.settings, "tracing", None)
        if not isinstance(section, TracingSettings) or not section.enabled:
            return None
        kafka = getattr(self.settings, "kafka", None)
        return start_tracing(section, group_id=None if kafka is None else kafka.group_id)

    def _apply(
        self,
        source: Source,
        result: BatchResult,
        on_batch: Callable[[BatchResult], None] | None,
    ) -> None:
        """Commit what became durable, re-read what was not decided, count, report."""
        self._commit(source, result.commits)  # {}: retries a commit that failed earlier
        if not (result.commits or result.rewind or result.stats.consumed or result.error):
            return
        if result.rewind:
            source.seek(result.rewind)
        fault_point("after_commit")
        self.totals.merge(result.stats)
        if on_batch is not None:
            on_batch(result)
        if result.error is not None:
            raise result.error

    def _commit(self, source: Source, offsets: Mapping[TopicPartition, int]) -> None:
        try:
            source.commit(offsets)
        except CommitError as exc:
            self.metrics.commit_failures.inc()
            log.warning(
                "commit_failed",
                error=str(exc),
                error_code=exc.code,
                offsets={str(tp): o for tp, o in (exc.offsets or offsets).items()},
                note="offsets stay covered by the durable watermark; the source commits "
                "them again with the next batch or idle poll, at revocation or close",
            )

    def _stop_on_signal(self, signum: int) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        self.stop()

    def _install_signals(self) -> Callable[[], None] | None:
        # _stop_on_signal runs on a thread of its own, never inside the signal frame.
        from dedupe_consumer.signals import install_stop_handlers

        return install_stop_handlers(self._stop_on_signal)
