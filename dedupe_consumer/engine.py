"""The one processing engine: batch → watermark/ID check → handle → persist.

Every way of using dedupe_consumer (the library, the sidecar, replays) feeds
batches of :class:`~dedupe_consumer.models.SourceMessage` into
:meth:`Engine.process` and commits what it returns. The engine knows nothing
about Kafka: it decides each offset, makes the decisions durable in one synced
store write together with each partition's watermark, and only then returns the
offsets that are safe to commit (invariant 1: commit after persist).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import structlog

from dedupe_consumer._faults import fault_point
from dedupe_consumer.config import Settings
from dedupe_consumer.dead_letters import DeadLetter, DeadLetterSink
from dedupe_consumer.errors import MissingEventIdError, PermanentError
from dedupe_consumer.handler import Handler
from dedupe_consumer.ids import MissingId, hash_id, parse_id_source
from dedupe_consumer.models import (
    BatchStats,
    Decision,
    Event,
    SourceMessage,
    TopicPartition,
    as_bytes,
    header_pairs,
    message_timestamp,
)
from dedupe_consumer.observability import Metrics
from dedupe_consumer.store import Changelog, ProcessedStore, Status, StoredDecision, Verdicts

log = structlog.get_logger("dedupe_consumer.engine")


def payload_digest(value: bytes | None) -> bytes:
    """8-byte digest stored with each ID to tell a true duplicate from a reused ID."""
    return hashlib.blake2b(value or b"", digest_size=8).digest()


@dataclass(slots=True)
class BatchResult:
    stats: BatchStats
    commits: dict[TopicPartition, int]
    """Next offset to consume per partition: durable decisions cover everything below."""
    error: BaseException | None = None
    """Set when the batch stopped early on a fatal condition (after persisting the prefix)."""
    handled_ids: list[str] = field(default_factory=list)


class _Stop(Exception):
    """Internal: stop deciding; persist what was decided so far."""


class Engine:
    """Decides offsets. Not thread-safe: one engine per consumer loop."""

    def __init__(
        self,
        handler: Handler,
        settings: Settings,
        store: ProcessedStore,
        dead_letters: DeadLetterSink,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        changelog: Changelog | None = None,
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.store = store
        self.dead_letters = dead_letters
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.changelog = changelog
        self._extract = parse_id_source(settings.dedupe.id_source)
        self._watermarks: dict[TopicPartition, int | None] = {}
        self._stopping = threading.Event()
        self._sweep_budget = settings.store.sweep_keys

    # -- assignment ------------------------------------------------------------------------

    def assign(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Take ownership of partitions; return where each should resume (watermark + 1)."""
        starts: dict[TopicPartition, int | None] = {}
        if self.changelog is not None and tps:
            self.changelog.ensure_topics({tp.topic for tp in tps})
            for tp in tps:  # state travels with the partition: catch up before deciding
                self.changelog.restore(tp, self.store, self.store.changelog_position(tp))
        for tp in tps:
            wm = self.store.watermark(tp)
            self._watermarks[tp] = wm
            starts[tp] = None if wm is None else wm + 1
        log.info("partitions_assigned", partitions=[str(t) for t in tps], resume=starts)
        return starts

    def release(self, tps: Sequence[TopicPartition]) -> None:
        """Forget partitions (revoked or lost): their messages are no longer ours to decide."""
        for tp in tps:
            self._watermarks.pop(tp, None)

    @property
    def assigned(self) -> list[TopicPartition]:
        return list(self._watermarks)

    def request_stop(self) -> None:
        """Finish the event in hand, then stop deciding (used by SIGTERM/SIGINT)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- the batch -------------------------------------------------------------------------

    def process(self, messages: Sequence[SourceMessage]) -> BatchResult:
        started = time.monotonic()
        now_ms = int(self.clock() * 1000)
        by_tp: dict[TopicPartition, list[SourceMessage]] = {}
        for message in messages:
            tp = TopicPartition(message.topic() or "", message.partition() or 0)
            if tp in self._watermarks:  # a revoked partition's leftovers belong to its new owner
                by_tp.setdefault(tp, []).append(message)

        decided: dict[TopicPartition, list[tuple[str, StoredDecision]]] = {}
        watermarks: dict[TopicPartition, int] = {}
        handled_ids: list[str] = []
        error: BaseException | None = None
        per_topic: dict[str, BatchStats] = {}
        try:
            for tp, batch in by_tp.items():
                topic_stats = per_topic.setdefault(tp.topic, BatchStats())
                self._decide_partition(
                    tp, batch, now_ms, topic_stats, decided, watermarks, handled_ids
                )
        except _Stop as stop:
            error = stop.__cause__

        if watermarks:
            self.dead_letters.flush()  # a dead-lettered decision must not outlive its letter
            persist_started = time.monotonic()
            positions = self._write_changelog(decided, watermarks)
            self.store.persist(decided, watermarks, positions)
            self.metrics.persist_seconds.observe(time.monotonic() - persist_started)
            for tp, offset in watermarks.items():
                self._watermarks[tp] = offset
                self.metrics.watermark.labels(tp.topic, str(tp.partition)).set(offset)
            fault_point("after_persist")
            written = sum(len(v) for v in decided.values())
            deleted = self.store.sweep_expired(now_ms, 2 * written + 64)
            if deleted:
                self.metrics.expired_deleted.inc(deleted)
        stats = BatchStats()
        for topic, topic_stats in per_topic.items():
            self.metrics.record(topic, topic_stats)
            stats.merge(topic_stats)
        self.metrics.batch_seconds.observe(time.monotonic() - started)
        commits = {tp: offset + 1 for tp, offset in watermarks.items()}
        return BatchResult(stats, commits, error, handled_ids)

    def _write_changelog(
        self, decided: Verdicts, watermarks: dict[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        """Make the batch durable in the changelog first; return positions safe to record.

        A position only advances when our write directly follows what we already
        applied; otherwise the next restore simply re-reads (idempotent).
        """
        if self.changelog is None:
            return {}
        delivered = self.changelog.write(decided, watermarks)
        return {
            tp: last + 1
            for tp, (first, last) in delivered.items()
            if self.store.changelog_position(tp) in (None, first)
        }

    def idle(self) -> None:
        """Called when a poll returned nothing: let the retention sweep catch up."""
        deleted = self.store.sweep_expired(int(self.clock() * 1000), self._sweep_budget)
        if deleted:
            self.metrics.expired_deleted.inc(deleted)

    def _decide_partition(
        self,
        tp: TopicPartition,
        batch: list[SourceMessage],
        now_ms: int,
        stats: BatchStats,
        decided: dict[TopicPartition, list[tuple[str, StoredDecision]]],
        watermarks: dict[TopicPartition, int],
        handled_ids: list[str],
    ) -> None:
        wm = self._watermarks.get(tp)
        fresh: list[tuple[SourceMessage, str | None, str | None]] = []  # msg, id, missing-reason
        for message in batch:
            offset = message.offset() or 0
            if wm is not None and offset <= wm:
                stats.add(Decision.REPLAY)
                continue
            try:
                fresh.append((message, self._extract(message), None))
            except MissingId as why:
                fresh.append((message, None, str(why)))
        if not fresh:
            return

        unique = list(dict.fromkeys(eid for _, eid, _ in fresh if eid is not None))
        found = dict(zip(unique, self.store.lookup(tp, unique, now_ms), strict=True))
        records = decided.setdefault(tp, [])
        for message, eid, missing in fresh:
            if self._stopping.is_set():
                raise _Stop
            offset = message.offset() or 0
            if eid is None:
                eid = self._on_missing_id(message, missing or "no id")
                if eid is None:
                    stats.add(Decision.DEAD_LETTERED)
                    stats.by_reason["missing-id"] = stats.by_reason.get("missing-id", 0) + 1
                    watermarks[tp] = offset
                    continue
                if eid not in found:
                    found[eid] = self.store.lookup(tp, [eid], now_ms)[0]
            value = as_bytes(message.value())
            digest = payload_digest(value)
            prior = found.get(eid)
            if prior is not None:
                self._on_seen(message, eid, digest, prior, stats)
                watermarks[tp] = offset
                continue
            status, reason = self._handle(message, eid, value)
            stats.add(Decision.HANDLED if status is Status.HANDLED else Decision.DEAD_LETTERED)
            if reason:
                stats.by_reason[reason] = stats.by_reason.get(reason, 0) + 1
            else:
                handled_ids.append(eid)
            record = StoredDecision(status, offset, now_ms, digest)
            found[eid] = record
            records.append((eid, record))
            watermarks[tp] = offset

    def _on_missing_id(self, message: SourceMessage, why: str) -> str | None:
        policy = self.settings.dedupe.on_missing_id
        if policy == "hash":
            try:
                return hash_id(message)
            except MissingId as missing:
                why = f"{why}; {missing}"
        elif policy == "fail":
            error = MissingEventIdError(
                f"{message.topic()}[{message.partition()}]@{message.offset()}: {why} "
                f"(id_source={self.settings.dedupe.id_source!r}, on_missing_id='fail')"
            )
            raise _Stop from error
        log.warning(
            "missing_event_id",
            topic=message.topic(),
            partition=message.partition(),
            offset=message.offset(),
            reason=why,
        )
        self.dead_letters.send(message, DeadLetter("missing-id", None, "MissingId", why, 0))
        return None

    def _on_seen(
        self,
        message: SourceMessage,
        eid: str,
        digest: bytes,
        prior: StoredDecision,
        stats: BatchStats,
    ) -> None:
        if prior.digest == digest:
            stats.add(Decision.DUPLICATE)
            return
        stats.add(Decision.CONFLICT)
        log.warning(
            "conflicting_duplicate",
            event_id=eid,
            topic=message.topic(),
            partition=message.partition(),
            offset=message.offset(),
            first_offset=prior.offset,
        )
        if self.settings.dedupe.on_conflict == "dead-letter":
            self.dead_letters.send(
                message,
                DeadLetter(
                    "conflicting-duplicate",
                    eid,
                    "ConflictingDuplicate",
                    f"event id already decided at offset {prior.offset} with another payload",
                    0,
                ),
            )

    def _handle(self, message: SourceMessage, eid: str, value: bytes | None) -> tuple[Status, str]:
        """Call the handler with retries. Returns (status, dead-letter reason or '')."""
        try:
            payload = self.handler.parse(value)
        except ValueError as invalid:
            return self._dead_letter(message, eid, "invalid-payload", invalid, 0)
        processing = self.settings.processing
        base = Event(
            id=eid,
            topic=message.topic() or "",
            partition=message.partition() or 0,
            offset=message.offset() or 0,
            key=as_bytes(message.key()),
            value=value,
            headers=tuple(header_pairs(message)),
            timestamp=message_timestamp(message),
            payload=payload,
        )
        attempts = processing.max_retries + 1
        for attempt in range(1, attempts + 1):
            event = base if attempt == 1 else replace(base, attempt=attempt)
            try:
                self.handler.handle(event)
            except PermanentError as permanent:
                return self._dead_letter(message, eid, "permanent-error", permanent, attempt)
            except Exception as failure:
                if attempt == attempts:
                    return self._dead_letter(message, eid, "retries-exhausted", failure, attempt)
                self.metrics.handler_retries.labels(event.topic).inc()
                delay = min(
                    processing.retry_backoff.total_seconds() * 2 ** (attempt - 1),
                    processing.retry_backoff_max.total_seconds(),
                )
                log.warning(
                    "handler_retry",
                    event_id=eid,
                    topic=event.topic,
                    partition=event.partition,
                    offset=event.offset,
                    attempt=attempt,
                    error=f"{type(failure).__name__}: {failure}",
                    retry_in_s=delay,
                )
                if self._stopping.wait(delay):
                    raise _Stop from None
            else:
                fault_point("after_handler")
                return Status.HANDLED, ""
        raise AssertionError("unreachable")  # pragma: no cover

    def _dead_letter(
        self, message: SourceMessage, eid: str, reason: str, error: BaseException, attempts: int
    ) -> tuple[Status, str]:
        log.error(
            "dead_lettered",
            event_id=eid,
            reason=reason,
            topic=message.topic(),
            partition=message.partition(),
            offset=message.offset(),
            error=f"{type(error).__name__}: {error}",
            attempts=attempts,
        )
        self.dead_letters.send(
            message, DeadLetter(reason, eid, type(error).__name__, str(error), attempts)
        )
        return Status.DEAD_LETTERED, reason
