"""The one processing engine: batch → watermark/ID check → (claim) → handle → persist.

Every way of using dedupe_consumer (the library, the sidecar, replays) feeds
batches of :class:`~dedupe_consumer.models.SourceMessage` into
:meth:`Engine.process` and commits what it returns. The engine knows nothing
about Kafka: it decides each offset, makes the decisions durable in one synced
store write together with each partition's watermark, and only then returns the
offsets that are safe to commit (invariant 1: commit after persist).

A batch goes through five phases:

1. *classify*: replays (offset <= watermark), IDs, one multi-get per partition,
   duplicates and conflicts; no side effects yet;
2. *claim* (claim mode only): persist an ``in-progress`` claim for every event
   about to reach the handler, synced, so a crash during phase 3 leaves a
   trace that becomes an *uncertain outcome* instead of a silent repeat;
3. *walk*: handler calls, retries, dead letters, on ``processing.concurrency``
   worker threads (:mod:`~dedupe_consumer.handler_pool`). The walk's unit is a
   *lane*: the events of one key (``ordering = "key"``; without a key, of one
   event ID) or of one partition (``"partition"``, or concurrency 1), handled
   strictly in offset order, one at a time; lanes run in parallel. Meanwhile the
   consuming thread keeps the group membership (``keep_alive``: a poll that reads one
   batch ahead, then pauses) and serves rebalances: a partition revoked mid-walk starts
   no new event, its running calls are waited for (bounded), and what it decided
   is persisted and committed before the revocation returns;
4. *settle*: per partition, in offset order, the decisions become records; the
   watermark is the end of the contiguous run of decided offsets. Events decided
   above a gap (a stop, a cut, a revocation) keep their records: a redelivery of
   them is found by ID lookup (a duplicate), never handled twice (invariant 2);
5. *persist*: dead letters flushed, then the changelog, then one synced
   WriteBatch with records, released claims, staged effects and watermarks.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import threading
import time
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Generator,
    Mapping,
    Sequence,
)
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import partial
from itertools import islice
from typing import Any, Literal, TypeVar, cast

import structlog

from dedupe_consumer._faults import fault_point
from dedupe_consumer.config import DedupeSettings, ProcessingSettings
from dedupe_consumer.contracts import BatchResult, PartitionLog
from dedupe_consumer.dead_letters import REDRIVE_HEADER, DeadLetter, DeadLetterSink
from dedupe_consumer.effects import Effects, OutputError, check_topic
from dedupe_consumer.errors import (
    ConfigError,
    DeadLetterError,
    MissingEventIdError,
    NotOwnerError,
    OffsetRegressionError,
    PermanentError,
    RegistryWaitStopped,
    RetryableError,
)
from dedupe_consumer.handler import Handler
from dedupe_consumer.handler_pool import HandlerPool
from dedupe_consumer.ids import (
    InvalidId,
    InvalidPayload,
    MissingId,
    hash_id,
    parse_id_source,
    reads_payload,
)
from dedupe_consumer.models import (
    BatchStats,
    DeadLetterReason,
    Decision,
    Event,
    SourceMessage,
    TopicPartition,
    as_bytes,
    header_pairs,
    message_timestamp,
    timestamp_of,
)
from dedupe_consumer.observability import Metrics
from dedupe_consumer.observability.tracing import EventSpan, EventTracing
from dedupe_consumer.partitioners import placed_by_a_common_partitioner, placing_rule
from dedupe_consumer.payloads import Decoded, PayloadDecoder, SchemaRegistryUnavailableError
from dedupe_consumer.responses import ResponseRefused, as_response, check_reply_to, send_reply
from dedupe_consumer.scope import split_origin
from dedupe_consumer.store import (
    EPOCH,
    RECORDED_AS,
    IdRecord,
    Output,
    ProcessedStore,
    RecordStatus,
    Response,
    StateChangelog,
    WriteSet,
)

log = structlog.get_logger("dedupe_consumer.engine")

_FULL_CHECKS = 1000
"""Keyed messages of a partition checked one by one against the common partitioners..."""
_SAMPLE = 64
"""...after which one offset in this many is checked."""

_LONGEST_CHECKED_KEY = 1024
"""Longer keys are not checked: murmur2 in Python costs about 0.3 ms per KiB."""

_BUSY_REVOKED_SWEEP = 256
"""Records of revoked partitions examined per batch (without a changelog)."""

_STORE_SIZE_EVERY_S = 2.0
"""``dedupe_store_size_bytes`` is read from RocksDB after a persist at most this often."""

_KEEP_ALIVE_S = 0.2
"""While handler calls run, the consuming thread serves the group this often."""

_TEARDOWN_WAIT_S = 30.0
"""How long teardown waits for a worker (one may be held by a hung call)."""

_REVOKE_WAIT_S = 30.0
"""How long a revocation waits for the partition's running calls, without a walk budget."""


def payload_digest(value: bytes | None) -> bytes:
    """8-byte digest stored with each ID to tell a true duplicate from a reused ID."""
    return hashlib.blake2b(value or b"", digest_size=8).digest()


class _Stop(Exception):
    """Internal: stop deciding; persist what was decided so far."""


class _Cut(_Stop):
    """Internal: the walk ran out of time; persist the prefix, re-read the rest."""


@dataclass(slots=True)
class _Item:
    """One message of the batch: what phase 1 found out about it, and how it was decided."""

    message: SourceMessage
    offset: int
    decision: Decision | None = None
    """Known in phase 1 (replay, duplicate, conflict, no usable ID); None: the walk
    decides it (handled or dead-lettered) and sets it then."""
    event_id: str | None = None
    digest: bytes = b""
    decoded: Decoded | None = None
    """Its payload, once opened (for the ID in phase 1, else for the handler)."""
    letter: DeadLetter | None = None
    """Its dead letter, once it is dead-lettered (or a conflict to dead-letter)."""
    fail: MissingEventIdError | None = None
    found_claim: IdRecord | None = None
    """An ``in-progress`` claim of this ID found in the store (claim mode): an
    uncertain outcome, resolved by ``processing.on_uncertain``."""
    first_offset: int | None = None
    """A duplicate or conflict: the offset at which this ID was first decided."""
    first: _Item | IdRecord | None = None
    """A duplicate: its ID's decided record, or the event of this batch (or of a carried
    lane) that decides it; where its stored response is read from."""
    response: Response | None = None
    """Decided handled: what ``handle`` returned, kept in the ID record."""
    staged: dict[bytes, bytes | None] | None = None
    """Decided handled: the writes its handler (or reconcile) staged."""
    outputs: list[Output] | None = None
    """Decided handled: the messages its handler (or reconcile) emitted."""
    walked: bool = False
    """Decided by the walk (handled or dead-lettered there): its ID gets a record."""
    uncertain: bool = False
    """Its claim was found in progress (claim mode): counted in ``BatchStats.uncertain``."""
    running: bool = False
    """Its handler call is in progress on a worker (or about to start)."""
    carried: bool = False
    """Its lane outlived its batch (see :class:`_Lane`): decided later, written then."""
    retries: int = 0
    """Calls of its handler (or reconcile) that failed and were tried again."""
    span: EventSpan | None = None
    """With tracing on: its span while it is being decided."""


@dataclass(eq=False)
class _Lane:
    """Events of one partition with one key (or one ID), decided in offset order.

    A lane may outlive its batch: when every other lane of the batch is done and it
    only waits out a retry's backoff, the batch settles without it. It is *carried*
    then: its undecided events hold the partition's watermark (the committed offset
    stops before the first of them) while later batches go on; events of the same
    key in later batches join it, so the key stays in order; each event it decides
    is written with the next batch (or the next idle drain).
    """

    tp: TopicPartition
    key: object
    items: list[_Item]
    position: int = 0
    """The next event to start."""
    staged: dict[bytes, bytes | None] = field(default_factory=dict)
    """What this lane's earlier events staged (their handlers' reads see it)."""
    parked: bool = False
    """Waiting out a retry's backoff: its batch need not wait for it."""
    carried: bool = False
    gone: bool = False
    """Its partition was revoked or lost: no event starts, a backoff ends at once."""
    closed: bool = False
    """Done: no event may join it any more."""


@dataclass(eq=False)
class _Batch:
    """A batch being walked: shared by the consuming thread and the workers."""

    plan: dict[TopicPartition, list[_Item]]
    now_ms: int
    claimed: WriteSet
    changed: threading.Condition
    """The engine's: every lane's state changes under it (see :meth:`Engine._lane`)."""
    lanes: list[_Lane] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    """Set when no further event may start: a stop request, a cut, an error."""
    cut: bool = False
    error: BaseException | None = None
    crash: BaseException | None = None
    """A BaseException on a worker (SystemExit, KeyboardInterrupt...): raised from the
    walk, and nothing of the batch is persisted, as if the process had died there."""
    revoked_stats: dict[str, BatchStats] = field(default_factory=dict)
    """What revocations during the walk settled (and persisted), for the batch's result."""
    revoked_ids: list[str] = field(default_factory=list)
    gone: set[TopicPartition] = field(default_factory=set)
    """Partitions revoked or lost during the walk: none of their events starts any more,
    and the end of the batch does not settle them (a revocation did already)."""

    def running(self, tps: Sequence[TopicPartition] | None = None) -> int:
        """Lanes of ``tps`` (None: of every partition) not closed yet."""
        return sum(1 for lane in self.lanes if not lane.closed and (tps is None or lane.tp in tps))

    def wait(self, tps: Sequence[TopicPartition], timeout: float) -> bool:
        """Wait until the lanes of ``tps`` are closed."""
        with self.changed:
            return self.changed.wait_for(lambda: self.running(tps) == 0, timeout)

    def fail(self, error: BaseException | None, *, cut: bool = False) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.cut = self.cut or cut
        self.stop.set()


@dataclass(slots=True)
class _Called:
    """A user call (``handle`` or ``reconcile``) that returned: its result and staged writes."""

    result: object
    effects: dict[bytes, bytes | None]
    outputs: list[Output]
    response: Response | None = None


_RECORD_BYTES = 25
"""An ID record without its response (``store.base.IdRecord``)."""
_EFFECT_OVERHEAD = 512
"""Bytes a changelog record needs besides its key and value (record and batch headers)."""


class Engine:
    """Decides offsets. Not thread-safe: one engine per consumer loop."""

    def __init__(
        self,
        handler: Handler,
        dedupe: DedupeSettings,
        processing: ProcessingSettings,
        store: ProcessedStore,
        dead_letters: DeadLetterSink,
        *,
        sweep_keys: int,
        revoked_state_grace: timedelta,
        max_record_bytes: int = 1_000_000,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        changelog: StateChangelog | None = None,
        walk_budget_s: float | None = None,
        outputs: list[Output] | None = None,
        tracing: EventTracing | None = None,
        payloads: PayloadDecoder | None = None,
    ) -> None:
        """``sweep_keys`` and ``revoked_state_grace`` are ``[store]``'s;
        ``payloads`` opens each value as ``[payload]`` says (None: raw values, and
        CloudEvents with ``id_source = "cloudevents"``);
        ``max_record_bytes`` is the largest changelog record (the producer's
        ``message.max.bytes``), which bounds a staged effect. ``tracing``: a span per
        decided event (:mod:`dedupe_consumer.observability.tracing`); None: off."""
        self.handler = handler
        self._tracing = tracing
        self.walk_budget_s = walk_budget_s
        """How long one batch may start handler calls before the rest is re-read (the
        calls running then are waited for), and how long a revocation waits for its
        partitions' running calls. The Kafka edges set it below ``max.poll.interval.ms``;
        the membership is kept meanwhile by ``keep_alive``, however long a call takes."""
        self.dedupe = dedupe
        self.processing = processing
        self.store = store
        self.dead_letters = dead_letters
        self.metrics = metrics or Metrics()
        self.metrics.retention_seconds.set(dedupe.retention.total_seconds())
        self._store_size_at = float("-inf")  # dedupe_store_size_bytes last set
        self.clock = clock
        self.changelog = changelog
        self.claims = processing.mode == "claim"
        self._extract = parse_id_source(dedupe.id_source)
        self._payloads = payloads or PayloadDecoder(cloudevents=dedupe.id_source == "cloudevents")
        self._reads_payload = reads_payload(self._extract)
        """The ID is read from the opened payload: it is opened in phase 1."""
        self._by_id = dedupe.scope == "topic"
        """Topic scope: the engine reads by-id topics (see :mod:`dedupe_consumer.scope`)."""
        self._staged_by_id_warned = False
        self._watermarks: dict[TopicPartition, int | None] = {}
        self._next: dict[TopicPartition, int] = {}
        """Per owned partition, an offset that is safe to commit (everything before it is
        decided or was committed): what a changelog transaction commits to be fenced."""
        self._orphans: dict[TopicPartition, _Orphan] = {}
        """Walked batches whose transaction the group fenced, kept per partition in case
        this instance owns the partition again with nobody having written meanwhile."""
        self._partition_counts: dict[str, int] = {}
        self._placing_rules: dict[str, set[str]] = {}
        """Per topic: the common partitioners that alone explain some of its messages."""
        self._mixed_warned: set[str] = set()
        """Each assigned topic's partition count, as the source last reported it."""
        self._mismatch_warned: set[str] = set()
        self._partitioner_checked: dict[TopicPartition, int] = {}
        self._revoked: dict[TopicPartition, float] = {}
        """Partitions with local state that we do not own, and since when (clock seconds)."""
        self._revoked_listed = False
        self._restoring: set[TopicPartition] = set()
        """Partitions being restored (:meth:`prepare` to :meth:`assign`): not owned yet,
        and their state is not to be dropped as a revoked partition's."""
        self._stopping = threading.Event()
        self._sweep_budget = sweep_keys
        self._revoked_grace_s = revoked_state_grace.total_seconds()
        self._walk_deadline: float | None = None
        self._batch: _Batch | None = None
        self._keep_alive: Callable[[], None] | None = None
        # A staged effect becomes one changelog record: refuse it at stage() time if it
        # cannot fit, so the attempt fails instead of the batch's changelog transaction.
        self._max_effect_bytes = max_record_bytes - _EFFECT_OVERHEAD
        # Emitted messages are produced in the changelog's transaction: none without one.
        self._output_limit = changelog.output_limit if changelog is not None else None
        self._refused_outputs = frozenset({processing.dead_letter_topic})
        self._max_response_bytes = dedupe.max_response_bytes
        self._responds = (
            dedupe.store_responses
            or processing.reply_on_duplicate
            or processing.reply_topic is not None
        )
        """What ``handle`` (or ``reconcile``) returns is the event's response: stored in
        its ID record and sent as the reply. Off: return values are ignored."""
        self._result_warned = False
        self._answers_duplicates = processing.reply_on_duplicate or (
            type(handler).on_duplicate is not Handler.on_duplicate
        )
        """A duplicate needs its stored response: a reply is sent again, or the handler
        implements ``on_duplicate``."""
        self._kept_outputs = outputs
        """Without a changelog (a replay): where emitted messages go once persisted."""
        self._unemittable = (
            None
            if changelog is not None or outputs is not None
            else "event.emit needs store.changelog = true: an output is produced in the "
            "transaction that persists its event's decision, which is the changelog's"
        )
        self._sends_replies = self._unemittable is None
        """Without a transaction (no changelog), responses are stored, never sent."""
        self._replies = self._responds and self._sends_replies
        """Responses are on and can be sent: a request's reply-to header matters."""
        _refuse_coroutines(handler)
        if (
            self.claims
            and processing.on_uncertain == "reconcile"
            and type(handler).reconcile is Handler.reconcile
        ):
            raise ConfigError(
                "processing.on_uncertain = 'reconcile' needs the handler to implement "
                f"reconcile(event) -> bool; {type(handler).__name__} does not"
            )
        self._pool = HandlerPool(processing.concurrency)  # threads: after the checks
        self._async_lanes = inspect.iscoroutinefunction(handler.handle)
        """``async def handle``: lanes run on the event loop, not on worker threads."""
        self._persister = ThreadPoolExecutor(1, thread_name_prefix="dedupe-persist")
        self._pending: _Pending | None = None
        """The write being made durable on the persister while the next batches are decided."""
        self._filling: _Pending | None = None
        """Batches decided since, gathered into the next write."""
        self._pending_overlay = _Overlay()
        self._filling_overlay = _Overlay()
        self._failures = 0
        """Writes that failed (fenced, or an error): a batch decided on top of one of them
        (classified while it was not durable) is never persisted."""
        self._last_failure: BaseException | None = None
        self._broken: BaseException | None = None
        """A write failed with an error: nothing decided after it is persisted."""
        self._drained: list[BatchResult] = []
        """Results of persisted batches not yet handed to the loop (see :meth:`drain`)."""
        self._lanes_changed = threading.Condition(threading.RLock())
        """Guards the state of every lane and the carried lanes' bookkeeping below."""
        self._carried: dict[tuple[TopicPartition, object], _Lane] = {}
        """Lanes that outlived their batch and are not closed, by partition and key."""
        self._held: dict[TopicPartition, dict[int, _Item]] = {}
        """Events of carried lanes not written yet, by partition and offset: the
        partition's watermark stays below the first of them."""
        self._held_ids: dict[TopicPartition, dict[str, tuple[int, bytes]]] = {}
        """Their IDs (offset, digest): a later copy of one is its duplicate."""
        self._held_open = 0
        """Carried events not decided yet: past ``processing.max_unpersisted``, a batch
        waits for them (see :meth:`_walk`)."""
        self._carried_done: list[tuple[TopicPartition, _Item]] = []
        """Carried events decided, for the next write."""
        self._carry_rewind: dict[TopicPartition, int] = {}
        """Where partitions are read again from: carried events a lane gave back."""
        self._given_back: dict[TopicPartition, int] = {}
        self._unanswered: dict[TopicPartition, list[_Item]] = {}
        """Duplicates to answer above an event a carried lane holds: their reply must
        commit with their offset, which the watermark cannot pass yet. Answered by the
        first write whose watermark covers them (see :meth:`_wait_for_cover`)."""
        """The first offset given back, per partition, until a batch reads it again: the
        watermark stays before it meanwhile."""
        self._carry_released: dict[TopicPartition, list[str]] = {}
        """Claims of carried events that end undecided (a stop, a give-back): released
        with the next write, so a restart does not find them uncertain."""
        self._carry_error: BaseException | None = None
        """What stopped a carried lane (a lost dead letter, a bug): the consumer stops."""
        self._carry_crash: BaseException | None = None
        self._covered: dict[TopicPartition, int] = {}
        """Per partition, the end of the run of offsets decided or carried: the
        watermark, once no carried event holds it back."""

    # -- assignment ------------------------------------------------------------------------

    def assign(
        self,
        tps: Sequence[TopicPartition],
        logs: Mapping[TopicPartition, PartitionLog] | None = None,
        restored: Mapping[TopicPartition, int] | None = None,
    ) -> dict[TopicPartition, int | None]:
        """Take ownership of partitions; return where each should resume (watermark + 1).

        ``logs`` (from the Kafka source) lets a partition whose offsets went back below
        its watermark be caught here, before its new events are taken for replays.

        ``restored``: the partitions' state was already restored (by :meth:`restore`
        after :meth:`prepare`, off the polling thread), with that many changelog records
        each. Without it, the restore runs here, one partition after the other.
        """
        if restored is None:
            restored = {tp: self.restore(tp) for tp in self.prepare(tps)}
        else:  # restored beside the loop: a write may be in flight on the persister since
            self._settle_all()  # the changelog producer and the store are ours alone now
        for tp, applied in restored.items():
            self._restoring.discard(tp)
            orphan = self._orphans.pop(tp, None)
            if orphan is not None and applied == 0:
                self._adopt(tp, orphan.write, live=True)
        starts: dict[TopicPartition, int | None] = {}

        for tp in tps:
            wm = self.store.watermark(tp)
            start = None if wm is None else wm + 1
            partition_log = logs.get(tp) if logs is not None else None
            if partition_log is not None:
                wm, start = self._check_offsets(tp, wm, partition_log)
            if self.changelog is not None:
                epoch = self.store.epoch(tp)
                if epoch is not None:
                    self.changelog.epochs[tp] = epoch
            self._watermarks[tp] = wm
            self._revoked.pop(tp, None)
            starts[tp] = start
            if partition_log is not None and partition_log.partitions is not None:
                self._note_partition_count(tp.topic, partition_log.partitions)
        log.info(
            "partitions_assigned",
            partitions=[str(t) for t in tps],
            resume={str(tp): o for tp, o in starts.items()},
        )
        self._measure_store()
        return starts

    def prepare(self, tps: Sequence[TopicPartition]) -> list[TopicPartition]:
        """Get ready to restore ``tps``; return those whose state comes from the changelog.

        Until :meth:`assign` takes them, they are neither owned nor revoked: nothing of
        this instance writes their state but their :meth:`restore`.
        """
        self._settle_all()  # the changelog producer and the store are ours alone now
        for topic in {tp.topic for tp in tps}:
            self.metrics.topic_seen(topic, self.processing.on_uncertain)
        if self.changelog is None or not tps:
            return []
        self.changelog.ensure_topics({tp.topic for tp in tps})
        for tp in tps:
            self._revoked.pop(tp, None)  # its state is being built again, not dropped
            self._restoring.add(tp)
        return list(tps)

    def restore(self, tp: TopicPartition, stopping: Callable[[], bool] | None = None) -> int:
        """Catch ``tp``'s state up from the changelog (state travels with the partition).

        Safe on another thread than the polling one, several partitions at once: it
        writes only ``tp``'s state. Returns the changelog records applied; a ``stopping``
        that turns true ends it early (:class:`RestoreCancelled`).
        """
        if self.changelog is None:
            return 0
        restore_started = time.monotonic()
        applied = self.changelog.restore(tp, self.store, stopping=stopping)
        self.metrics.restore_seconds.labels(tp.topic).observe(time.monotonic() - restore_started)
        return applied

    def cancel_restore(self, tps: Sequence[TopicPartition]) -> None:
        """Restores of ``tps`` were stopped (the partitions went): their partial state is
        dropped after the grace period, like any revoked partition's."""
        now = self.clock()
        for tp in tps:
            if tp in self._restoring:
                self._restoring.discard(tp)
                self._revoked[tp] = now

    def _note_partition_count(self, topic: str, count: int) -> None:
        known = self._partition_counts.get(topic)
        self._partition_counts[topic] = count
        if known is not None and known != count:
            log.warning(
                "partition_count_changed",
                topic=topic,
                old=known,
                new=count,
                consequence="keys now hash to other partitions: an event ID sent again may "
                "reach a partition that never saw it and be handled again (dedupe is per "
                "partition)",
            )

    def _check_partitioner(self, tp: TopicPartition, items: Sequence[_Item]) -> None:
        """Count keyed messages that no common partitioner would have put on ``tp``."""
        count = self._partition_counts.get(tp.topic)
        if count is None or count <= 1 or self._by_id:  # a by-id topic is placed by ID
            return
        mismatched = checked = 0
        placed: dict[str, int] = {}
        seen = self._partitioner_checked.get(tp, 0)
        for item in items:
            # Every message of a partition's first _FULL_CHECKS, then one in _SAMPLE:
            # murmur2 in Python costs microseconds, and a producer's rule rarely changes.
            if seen + checked >= _FULL_CHECKS and item.offset % _SAMPLE:
                continue
            key = as_bytes(item.message.key())
            if not key or len(key) > _LONGEST_CHECKED_KEY:
                continue
            checked += 1
            if not placed_by_a_common_partitioner(key, tp.partition, count):
                mismatched += 1
                continue
            rule = placing_rule(key, tp.partition, count)
            if rule is not None:
                placed[rule] = placed.get(rule, 0) + 1
        self._partitioner_checked[tp] = seen + checked
        if checked:
            self.metrics.partitioner_checked.labels(tp.topic).inc(checked)
        for rule, n in placed.items():
            self.metrics.partitioner_placed.labels(tp.topic, rule).inc(n)
        self._note_placing_rules(tp, placed)
        if not mismatched:
            return
        self.metrics.partitioner_mismatches.labels(tp.topic).inc(mismatched)
        if tp.topic not in self._mismatch_warned:
            self._mismatch_warned.add(tp.topic)
            log.warning(
                "partitioner_mismatch",
                topic=tp.topic,
                partition=tp.partition,
                partitions=count,
                messages=mismatched,
                consequence="these keys are not where librdkafka's default (CRC32) or Java's "
                "(murmur2) partitioner puts them: a producer with another partitioner, an "
                "explicit partition, or added partitions. Dedupe is per partition, so the "
                "same event ID sent by another producer may be handled again; see the "
                "docs/concepts.md (Dedupe scope). Counted in dedupe_partitioner_mismatch_total",
            )

    def _note_placing_rules(self, tp: TopicPartition, placed: Mapping[str, int]) -> None:
        """Warn once per topic when its messages show both common partitioners at work."""
        rules = self._placing_rules.setdefault(tp.topic, set())
        rules.update(placed)
        if len(rules) < 2 or tp.topic in self._mixed_warned:
            return
        self._mixed_warned.add(tp.topic)
        log.warning(
            "partitioners_mixed",
            topic=tp.topic,
            partition=tp.partition,
            consequence="some producers of this topic place keys with librdkafka's default "
            "(CRC32) and others with Java's (murmur2): the same key (event ID) sent by one "
            "and by the other lands on two partitions, and dedupe per partition handles it "
            "twice. Set dedupe.scope = 'topic' (docs/scope.md), or one partitioner for all "
            "producers (librdkafka: partitioner = murmur2_random). Counted in "
            "dedupe_partitioner_placed_total",
        )

    def _check_offsets(
        self, tp: TopicPartition, wm: int | None, partition_log: PartitionLog
    ) -> tuple[int | None, int | None]:
        """The watermark and start of ``tp`` once its log is known to be the one it covers.

        Offsets at or below the watermark are replays only in the log the watermark was
        taken in. A topic deleted and created again (a new topic ID) or a log that now
        ends at or below the watermark (truncated, or recreated where topic IDs are not
        known) reuses them: ``processing.on_offset_regression`` decides.
        """
        epoch = self.store.epoch(tp)
        topic_id = partition_log.topic_id
        known_id, generation = EPOCH.unpack(epoch) if epoch is not None else (None, 0)
        if wm is None or known_id is None:
            if topic_id is not None and topic_id != known_id:
                self.store.set_epoch(tp, EPOCH.pack(topic_id, 0), reset_watermark=False)
            if wm is None:
                return None, None  # nothing decided here: nothing to mistake for a replay
        why = None
        if topic_id is not None and known_id is not None and topic_id != known_id:
            why = "the topic was deleted and created again (its topic ID changed)"
        elif partition_log.high <= wm:
            why = (
                f"the partition's log now ends at offset {partition_log.high}, at or below "
                f"the stored watermark {wm} (the topic was truncated or recreated)"
            )
        if why is None:
            return wm, wm + 1
        self.metrics.offset_regressions.labels(tp.topic).inc()
        if self.processing.on_offset_regression == "fail":
            log.error("offset_regression", partition=str(tp), reason=why, watermark=wm)
            raise OffsetRegressionError(
                f"{tp}: {why}. Its new events at offsets up to {wm} would be taken for "
                "replays of events already decided, and never handled. If the topic was "
                "recreated or truncated on purpose, set processing.on_offset_regression = "
                "'reset' (or DEDUPE_PROCESSING__ON_OFFSET_REGRESSION=reset) to start this "
                "partition's watermark over from the start of its log "
                "(decided event IDs are kept, so events sent again stay duplicates); "
                "otherwise restore the topic's data before starting the consumer again"
            )
        same_log = topic_id is None or known_id is None or topic_id == known_id
        resume = partition_log.low
        if (
            topic_id is not None
            and topic_id == known_id
            and partition_log.retained_from is not None
        ):
            # A truncated log still holds events decided long ago: their IDs may have
            # expired, so re-reading them could handle them twice. Only events within
            # the retention window are re-read (a lookup tells which were decided).
            resume = max(resume, partition_log.retained_from)
        new_epoch = EPOCH.pack(topic_id or known_id or bytes(16), generation + 1 if same_log else 0)
        if self.changelog is not None:
            # The changelog's old watermark must not come back at the next restore: the
            # new epoch, marked as a reset, drops it there.
            self.changelog.reset_epoch(tp, new_epoch, self.store)
        self.store.set_epoch(tp, new_epoch, reset_watermark=True)
        log.warning(
            "offset_regression_reset",
            partition=str(tp),
            reason=why,
            old_watermark=wm,
            resume=resume,
            note="decided event IDs are kept for dedupe.retention: events sent again within "
            "it stay duplicates; in a truncated log, events older than it are not re-read",
        )
        return None, resume

    def release(
        self, tps: Sequence[TopicPartition], *, lost: bool = False
    ) -> dict[TopicPartition, int]:
        """Forget partitions (revoked or lost): their messages are no longer ours to decide.

        During a walk (a rebalance served by ``keep_alive``), a revoked partition starts
        no new event; its running calls are waited for (bounded by the walk budget), and
        what it decided is persisted now. Returns the offsets to commit before it goes.
        A lost partition's decisions are dropped: it is someone else's already.
        """
        commits: dict[TopicPartition, int] = {}
        try:
            self._settle_all()
        except Exception as failed:  # never out of a rebalance callback: the next
            # batch raises it (nothing decided after the failed write is persisted)
            log.error("persist_failed", error=f"{type(failed).__name__}: {failed}")
        for earlier in self._drained:  # what the pending batch made durable of them
            for tp in tps:
                earlier.rewind.pop(tp, None)
                offset = earlier.commits.pop(tp, None)
                if offset is not None and not lost:
                    commits[tp] = offset
        if not lost:
            for tp in tps:  # still ours until this callback returns: persist it now
                self._adopt_before_revoke(tp)
        batch = self._batch
        if batch is not None:
            mine = [tp for tp in tps if tp in batch.plan and tp not in batch.gone]
            if mine:
                commits.update(self._settle_revoked(batch, mine, lost=lost))
        commits.update(self._release_carried(tps, lost=lost))
        now = self.clock()
        for tp in tps:
            self._watermarks.pop(tp, None)
            self._next.pop(tp, None)
            orphan = self._orphans.get(tp)
            if orphan is not None:
                orphan.released = True  # only a restore that reads nothing new revives it
            self._revoked[tp] = now  # its local state goes after the grace period
        return commits

    @property
    def assigned(self) -> list[TopicPartition]:
        return list(self._watermarks)

    def request_stop(self) -> None:
        """Finish the events in hand, then stop deciding (used by SIGTERM/SIGINT)."""
        self._stopping.set()

    def setup_handler(self) -> None:
        """``handler.setup()`` on a worker (the only one at concurrency 1), awaited if async."""
        self._pool.run(self.handler.setup)

    def teardown_handler(self) -> None:
        """``handler.teardown()``, given up after a while if a hung call holds the workers."""
        try:
            self._pool.run(self.handler.teardown, timeout=_TEARDOWN_WAIT_S)
        except TimeoutError as hung:
            log.error("teardown_not_run", error=str(hung), reason="a handler call never returned")

    def close(self) -> None:
        """Stop the workers (a call still running finishes on its own) and the persister."""
        self._abandon_carried()
        self._pool.close()
        self._persister.shutdown(wait=True)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def idle(self) -> None:
        """Called when a poll returned nothing: let the retention sweep catch up.

        Expired IDs found are removed in a write of their own (changelog tombstones,
        then the local delete), only when there are some. With a changelog, the
        transaction must commit a safe offset of some owned partition to be fenced
        if this instance is no longer the owner: before the first batch since the
        assignment, none is known and nothing is swept. Revoked partitions are
        tended first (:meth:`_tend_revoked`).
        """
        self._settle_all()
        self._tend_revoked(idle=True)
        self._measure_store()
        owned = list(self._watermarks)
        if not owned or (self.changelog is not None and not self._next):
            return
        share = max(1, self._sweep_budget // len(owned))
        write = WriteSet()
        self._sweep(int(self.clock() * 1000), dict.fromkeys(owned, share), write)
        if write:
            try:
                self._persist(write)
            except NotOwnerError as fenced:
                log.warning("changelog_fenced", error=str(fenced), during="retention sweep")

    def _tend_revoked(self, *, idle: bool) -> None:
        """Bound the disk taken by partitions we no longer own (invariant 5).

        With a changelog, a partition revoked for longer than
        ``store.revoked_state_grace`` is dropped: the changelog holds its state, and a
        later assignment restores it from the changelog's start. Without one, dropping
        would lose its dedupe state, so its expired records are swept instead.
        Partitions found in the store at start-up count as revoked then.
        """
        now = self.clock()
        if not self._revoked_listed:
            self._revoked_listed = True
            for tp in self.store.partitions():
                if tp not in self._watermarks and tp not in self._restoring:
                    self._revoked.setdefault(tp, now)
        if not self._revoked:
            return
        if self.changelog is None:
            # A busy consumer never idles: a small share per batch, the rest when idle.
            budget = self._sweep_budget if idle else _BUSY_REVOKED_SWEEP
            share = max(1, budget // len(self._revoked))
            sweep_started = time.monotonic()
            deleted = self.store.sweep_expired(int(now * 1000), dict.fromkeys(self._revoked, share))
            self.metrics.sweep_seconds.observe(time.monotonic() - sweep_started)
            if deleted:  # not ours: deleted locally only, never tombstoned in the changelog
                self.metrics.expired_deleted.inc(deleted)
            return
        grace = self._revoked_grace_s
        for tp, since in list(self._revoked.items()):
            if now - since >= grace:
                self.store.drop_partition(tp, self.changelog.position_key(tp))
                self.changelog.epochs.pop(tp, None)
                del self._revoked[tp]
                log.info("revoked_partition_dropped", partition=str(tp), revoked_s=now - since)

    def _sweep(self, now_ms: int, budgets: dict[TopicPartition, int], write: WriteSet) -> None:
        """Add expired IDs to ``write`` as deletions (tombstones in the changelog)."""
        sweep_started = time.monotonic()
        found = self.store.find_expired(now_ms, budgets)
        self.metrics.sweep_seconds.observe(time.monotonic() - sweep_started)
        for tp, ids in found.items():
            # Not the IDs decided in this write or in the one still being persisted: an
            # expired record found on disk may have been decided anew since.
            decided = {event_id for event_id, _ in write.records.get(tp, [])}
            for overlay in (self._pending_overlay, self._filling_overlay):
                decided.update(overlay.records.get(tp, ()))
            gone = [event_id for event_id in ids if event_id not in decided]
            if gone:
                write.released.setdefault(tp, []).extend(gone)
                self.metrics.expired_deleted.inc(len(gone))

    # -- the batch -------------------------------------------------------------------------

    def process(
        self,
        messages: Sequence[SourceMessage],
        keep_alive: Callable[[], None] | None = None,
    ) -> BatchResult:
        """Decide ``messages`` and make them durable; return what may be committed.

        The synchronous form of :meth:`pipeline` followed by :meth:`drain`.
        """
        return _merged([self.pipeline(messages, keep_alive), self.drain(final=True)])

    def drain(self, *, final: bool = False) -> BatchResult:
        """Make every decided batch durable, and what carried lanes decided; return what
        became durable since the last result (empty when nothing did).

        ``final`` (the end of a run, or :meth:`process`) or a stop: carried lanes are
        waited for first (bounded like a revocation)."""
        self._raise_carry_crash()
        if final or self.stopping:
            with self._lanes_changed:
                if not self._lanes_changed.wait_for(
                    lambda: all(lane.closed for lane in self._carried.values()),
                    self.walk_budget_s or _REVOKE_WAIT_S,
                ):
                    log.warning(
                        "stopped_with_calls_running",
                        running=sum(1 for lane in self._carried.values() if not lane.closed),
                        consequence="their events stay undecided and are read again",
                    )
                    self._abandon_carried()
                    if not self.stopping:  # the engine goes on (Engine.process): read
                        # them again, unless a call of theirs still runs
                        for lane in list(self._carried.values()):
                            self._give_back(lane, keep_running=True)
        carried = self._collect_carried(int(self.clock() * 1000))
        if carried is not None:
            carried.failures = self._failures
            self._hand_over(carried)
        self._settle_all()
        drained, self._drained = self._drained, []
        return _merged(drained)

    def pipeline(
        self,
        messages: Sequence[SourceMessage],
        keep_alive: Callable[[], None] | None = None,
    ) -> BatchResult:
        """Decide ``messages`` while the batch before is made durable; hand them to the
        persister; return what became durable since the last result.

        The previous batch's changelog transaction and synced write run on the
        persister thread while this batch is classified (lookups see its records
        through an overlay) and walked; it is waited for before this batch is handed
        over, so at most one batch is in flight and offsets come back only once
        durable (invariant 1). Everything else (claims, rebalances, idle sweeps,
        stops) waits for it first. ``keep_alive`` is called on this thread while
        handler calls run (the Kafka source polls, reading one batch ahead and then
        pausing its partitions: heartbeats, rebalances).
        """
        self._keep_alive = keep_alive
        started = time.monotonic()
        if self._broken is not None:
            raise self._broken
        failures = self._failures
        if self.claims:
            # Claims wait for every write before them: wait before classifying, so this
            # batch is decided on durable state only.
            self._settle_all()
        for tp, orphan in list(self._orphans.items()):
            if not orphan.released:  # still ours since it was fenced: try once more
                del self._orphans[tp]
                self._adopt(tp, orphan.write, live=False)
        now_ms = int(self.clock() * 1000)
        grouped: dict[tuple[str | None, int | None], list[_Item]] = {}
        for message in messages:
            key = (message.topic(), message.partition())
            items = grouped.get(key)
            if items is None:
                items = grouped[key] = []
            items.append(_Item(message, message.offset() or 0))
        plan: dict[TopicPartition, list[_Item]] = {}
        for (topic, partition), items in grouped.items():
            tp = TopicPartition(topic or "", partition or 0)
            if tp in self._watermarks:  # a revoked partition's leftovers belong to its new owner
                plan[tp] = items
        for tp, items in plan.items():
            self._check_partitioner(tp, items)
            self._classify(tp, items, now_ms)
            wm = self._watermarks.get(tp)
            # This batch was fetched from its first offset on: what lies before it is
            # decided (<= watermark) or was committed before.
            start = items[0].offset if wm is None else max(items[0].offset, wm + 1)
            self._next[tp] = max(self._next.get(tp, start), start)
            given_back = self._given_back.get(tp)
            if given_back is not None and items[0].offset <= given_back:
                del self._given_back[tp]  # read again from it: this batch covers it
            with self._lanes_changed:  # never past an event a carried lane holds
                first = self._first_undecided(tp)
                if first is not None:
                    self._next[tp] = min(self._next[tp], first)
        if self._failures != failures:
            # A write failed while this batch was polled: read it again after the rewind.
            self._drained.append(self._rewound(plan, started))
            return self.drain()
        try:
            decided = self._decide_batch(plan, now_ms, started)
        except NotOwnerError as fenced:  # in the claim phase: nothing walked yet
            self._settle_all()
            self._drained.append(self._fenced(plan, fenced, None, started))
            return self.drain()
        decided.failures = failures
        self._hand_over(decided)
        drained, self._drained = self._drained, []
        return _merged(drained)

    def _not_persisted(self, decided: _Pending) -> BatchResult:
        """A batch decided on top of a write that failed: never persisted on its own."""
        failure = self._last_failure
        if isinstance(failure, NotOwnerError):
            return self._fenced(
                decided.plan, failure, decided.write, decided.started, decided.rewind
            )
        return self._rewound(decided.plan, decided.started, decided.rewind)

    def _rewound(
        self,
        plan: dict[TopicPartition, list[_Item]],
        started: float,
        also: Mapping[TopicPartition, int] | None = None,
    ) -> BatchResult:
        """Nothing of ``plan`` is persisted: read it again from its first offsets (or
        from ``also``'s, where earlier: a given-back event's)."""
        self.metrics.batch_seconds.observe(time.monotonic() - started)
        # An absorbed plan (carried events, gathered batches) is not in offset order.
        rewind = {tp: min(i.offset for i in items) for tp, items in plan.items() if items}
        for tp, offset in (also or {}).items():
            rewind[tp] = min(offset, rewind.get(tp, offset))
        for tp, offset in rewind.items():  # nothing from there on is safe to commit
            if tp in self._next:
                self._next[tp] = min(self._next[tp], offset)
            covered = self._covered.get(tp)
            if covered is not None and covered >= offset:
                self._covered[tp] = offset - 1
        self._drop_unanswered(rewind)  # read again, answered then
        return BatchResult(BatchStats(), {}, None, [], rewind)

    def _drop_unanswered(self, rewind: Mapping[TopicPartition, int]) -> None:
        """Waiting duplicates at or above ``rewind``'s offsets are read again: forgotten."""
        with self._lanes_changed:
            for tp, offset in rewind.items():
                waiting = self._unanswered.get(tp)
                if waiting:
                    self._unanswered[tp] = [i for i in waiting if i.offset < offset]

    def _fenced(
        self,
        plan: dict[TopicPartition, list[_Item]],
        fenced: NotOwnerError,
        write: WriteSet | None,
        started: float,
        also: Mapping[TopicPartition, int] | None = None,
    ) -> BatchResult:
        """The group fenced the batch's transaction: it may be a zombie's. Persist nothing.

        The partitions are read again from the batch's first offsets. The walked
        batch is kept per partition: if this instance owns a partition again and
        the changelog shows that nobody wrote it meanwhile, the batch is still
        valid and is persisted then, so its events are not handled twice.
        """
        result = self._rewound(plan, started, also)
        if write is not None:
            for tp in plan:
                part = _part(write, tp)
                if part.watermarks or part.records:  # records only: a carried lane held it
                    orphan = self._orphans.get(tp)
                    if orphan is not None and not orphan.released:
                        _extend(orphan.write, part)  # decided on top of it: after it
                    else:
                        self._orphans[tp] = _Orphan(part)
        log.error(
            "changelog_fenced",
            error=str(fenced),
            partitions=sorted(str(tp) for tp in plan),
            consequence="the batch's decisions and effects were not persisted; it is kept "
            "in case this instance owns the partitions again and nobody wrote them "
            "meanwhile, else its events are read and handled again",
        )
        return result

    def _adopt(self, tp: TopicPartition, write: WriteSet, *, live: bool) -> None:
        """Persist a fenced batch of ``tp`` now that this instance owns ``tp`` again."""
        self._settle_all()
        durable = self.store.watermark(tp)
        watermark = write.watermarks.get(tp)
        if durable is not None and watermark is not None and durable >= watermark:
            log.warning(
                "fenced_batch_dropped",
                partition=str(tp),
                reason="the partition's watermark is already past it",
            )
            return
        try:
            self._persist(write, live=live)
        except NotOwnerError as again:
            log.warning(
                "fenced_batch_dropped",
                partition=str(tp),
                error=str(again),
                consequence="its events are read and handled again",
            )
            return
        if watermark is not None:
            self._watermarks[tp] = watermark
            self._next[tp] = watermark + 1
        log.info(
            "fenced_batch_persisted",
            partition=str(tp),
            watermark=watermark,
            reason="this instance owns the partition again and nobody wrote its changelog "
            "meanwhile: the batch's decisions still hold",
        )

    def _adopt_before_revoke(self, tp: TopicPartition) -> None:
        """A batch of ``tp`` fenced by a generation that moved on while it was in flight.

        A rebalance bumps the group generation before it revokes anything: a write
        on the persister in that moment is refused although this instance still owns
        ``tp``. In the revoke callback it still does, so the kept batch is persisted
        now (in the current generation), not left for the next owner to handle again.
        """
        orphan = self._orphans.get(tp)
        if orphan is None or orphan.released:
            return
        del self._orphans[tp]
        try:
            self._adopt(tp, orphan.write, live=True)
        except Exception as failed:  # never out of a rebalance callback: the next owner
            # reads the batch again
            log.error(
                "fenced_batch_dropped",
                partition=str(tp),
                error=f"{type(failed).__name__}: {failed}",
                consequence="its events are read and handled again by the next owner",
            )

    def _decide_batch(
        self, plan: dict[TopicPartition, list[_Item]], now_ms: int, started: float
    ) -> _Pending:
        claimed = self._claim(plan, now_ms) if self.claims else WriteSet()
        self._walk_deadline = (
            None if self.walk_budget_s is None else time.monotonic() + self.walk_budget_s
        )
        batch = self._batch = _Batch(plan, now_ms, claimed, self._lanes_changed)
        try:
            self._walk(batch)
        finally:
            self._batch = None
        self._raise_carry_crash()
        carried = self._collect_carried(now_ms)  # first: this batch's watermark follows
        owned = [tp for tp in plan if tp not in batch.gone]
        write, rewind, per_topic, handled_ids = self._settle(batch, owned)
        for topic, stats in batch.revoked_stats.items():
            per_topic.setdefault(topic, BatchStats()).merge(stats)
        handled_ids.extend(batch.revoked_ids)
        error = batch.error
        if batch.cut:
            self.metrics.walks_cut.inc()
            log.warning(
                "batch_cut",
                rewind={str(tp): o for tp, o in rewind.items()},
                reason="handlers ran past the walk budget; the rest is re-read",
            )
        plan = {tp: plan[tp] for tp in owned}
        claimed = _only(batch.claimed, owned)

        if write:
            # Each partition sweeps twice what it writes: deletion keeps pace with inserts
            # wherever the load lands (invariant 5). Expired IDs go in this same write.
            budgets = {tp: 2 * len(records) + 32 for tp, records in write.records.items()}
            self._sweep(now_ms, budgets, write)
        decided = _Pending(write, plan, claimed, per_topic, handled_ids, rewind, error, started)
        if carried is None:
            return decided
        carried.started = started
        carried.absorb(decided)  # carried events are older: first in the plan and write
        return carried

    def _raise_carry_crash(self) -> None:
        """A carried lane's handler raised a BaseException (SystemExit...): as if the
        process died there, nothing more is persisted."""
        crash = self._carry_crash
        if crash is not None:
            raise crash

    def _hand_over(self, decided: _Pending) -> None:
        """Queue a decided batch for durability (group commit).

        It joins the batches gathered while the persister is busy; they go to the
        persister together, as one write, as soon as it is free. Past
        ``processing.max_unpersisted`` events, or when the loop must act on this batch
        now (an error, a cut, a stop), this waits for the persister.
        """
        if self._broken is not None:
            raise self._broken  # nothing decided after a failed write is persisted
        if self._failures != decided.failures:
            # A write it was decided on top of failed meanwhile: kept with it (fenced), or
            # read again.
            self._drained.append(self._not_persisted(decided))
            return
        if self._filling is None:
            self._filling = decided
        else:
            self._filling.absorb(decided)
        self._filling_overlay.add(decided.write)
        urgent = decided.error is not None or bool(decided.rewind) or self.stopping
        pending = self._pending
        if (
            pending is not None
            and not urgent
            and not (pending.future is not None and pending.future.done())
            and self._filling.events < self.processing.max_unpersisted
        ):
            return  # the persister is busy: keep gathering
        self._settle_pending()
        self._submit_filling()
        if urgent:
            self._settle_pending()  # the loop acts on it now: seek, stop, raise

    def _settle_all(self) -> None:
        """Make everything decided durable (or fenced). Everything but the walk of the
        next batch (claims, rebalances, idle sweeps, stops) waits for this first."""
        self._settle_pending()
        if self._broken is not None:
            self._drop_filling()
            raise self._broken
        if self._filling is not None:
            self._submit_filling()
            self._settle_pending()

    def _submit_filling(self) -> None:
        """Start making the gathered batches durable on the persister, as one write.

        When the write before was fenced, they were decided in the same stale
        generation: nothing of them is kept, they are read again."""
        assert self._pending is None
        pending, self._filling = self._filling, None
        if pending is None:
            return
        # Handlers of a walk in progress read effects through the overlays: the gathered
        # ones stay visible until they are durable (pending first, then filling cleared).
        self._pending_overlay = self._filling_overlay
        self._filling_overlay = _Overlay()
        write = pending.write
        if not write:
            self._pending_overlay = _Overlay()
            self._drained.append(self._finish(pending))
            return
        pending.next = dict(self._next)  # now: the next batch moves _next on
        fence = self._fence_offsets(write, pending.next)
        pending.future = self._persister.submit(self._make_durable, pending, fence)
        self._pending = pending

    def _make_durable(
        self, pending: _Pending, fence: dict[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        """On the persister: dead letters, changelog, synced store write. Returns the
        source offsets the changelog transaction committed."""
        write = pending.write
        fault_point("before_persist")
        try:
            committed = self._persist(write, fence)
        except DeadLetterError as unsent:
            # A letter that could not be made durable: keep every other decision, so a
            # restart neither repeats a handled event nor loses the lost letter's.
            if not _cut_before(unsent.failed, pending.plan, write, self._watermarks):
                raise
            # Events a carried lane still decides (or a call still running) keep theirs.
            keep = {
                i.event_id
                for items in pending.plan.values()
                for i in items
                if i.carried or i.running
            }
            _release_undecided(pending.claimed, write, keep=keep)
            log.error("dead_letter_failed", error=str(unsent), stopping=True)
            pending.error = unsent
            # Nothing is queued: the flush is a no-op.
            committed = self._persist(write, self._fence_offsets(write, pending.next))
        fault_point("after_persist")
        return committed

    def _settle_pending(self) -> None:
        """Wait until the write on the persister is durable (or fenced); keep its result
        for the loop."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        seen = self._failures
        try:
            self._drained.append(self._finish(pending))
        finally:
            self._pending_overlay = _Overlay()
            if self._failures != seen:  # the gathered batches were decided on top of it
                self._drop_filling()

    def _drop_filling(self) -> None:
        """The gathered batches go the way of the failed write they were decided on:
        after a fence, kept with it in case this instance owns the partitions again
        and nobody wrote meanwhile; after an error, dropped (the consumer stops)."""
        filling, self._filling = self._filling, None
        self._filling_overlay = _Overlay()
        if filling is not None:
            self._drained.append(self._not_persisted(filling))

    def _finish(self, pending: _Pending) -> BatchResult:
        """On the consuming thread, once ``pending`` is durable: watermarks, metrics, and
        the offsets to commit."""
        write = pending.write
        committed: dict[TopicPartition, int] = {}
        if pending.future is not None:
            try:
                committed = pending.future.result()
            except NotOwnerError as fenced:
                pending.fenced = fenced
                self._last_failure = fenced
                self._failures += 1
                return self._fenced(pending.plan, fenced, write, pending.started, pending.rewind)
            except BaseException as failed:
                self._failures += 1
                self._broken = self._last_failure = failed
                raise
            if pending.error is not None:  # persisted up to a fatal event only
                self._failures += 1
                self._last_failure = pending.error
            for tp, offset in write.watermarks.items():
                if tp in self._watermarks:  # not released meanwhile
                    self._watermarks[tp] = offset
                    self._next[tp] = max(self._next.get(tp, 0), offset + 1)
                    self.metrics.watermark.labels(tp.topic, str(tp.partition)).set(offset)
        self._tend_revoked(idle=False)
        total = BatchStats()
        for topic, stats in pending.per_topic.items():
            self.metrics.record(topic, stats)
            total.merge(stats)
        self.metrics.batch_seconds.observe(time.monotonic() - pending.started)
        # Offsets that the changelog transaction committed need no second commit.
        commits = {
            tp: offset + 1
            for tp, offset in write.watermarks.items()
            if committed.get(tp) != offset + 1
        }
        return BatchResult(total, commits, pending.error, pending.handled_ids, pending.rewind)

    # -- phase 1: classify -----------------------------------------------------------------

    def _classify(self, tp: TopicPartition, items: list[_Item], now_ms: int) -> None:
        wm = self._watermarks.get(tp)
        for overlay in (self._pending_overlay, self._filling_overlay):
            # Decided, durable once the writes before it are (a later write never is first).
            ahead = overlay.watermarks.get(tp)
            if ahead is not None and (wm is None or ahead > wm):
                wm = ahead
        with self._lanes_changed:
            held = dict(self._held.get(tp, {}))
            held_ids = dict(self._held_ids.get(tp, {}))
            # a duplicate waiting to be answered is decided as well
            held.update((item.offset, item) for item in self._unanswered.get(tp, ()))
        fresh: list[_Item] = []
        for item in items:
            if (wm is not None and item.offset <= wm) or item.offset in held:
                # decided, or being decided by its carried lane (read again after a seek)
                item.decision = Decision.REPLAY
                continue
            try:
                if self._reads_payload:
                    item.decoded = self._payloads.open(item.message)
                item.event_id = self._extract(item.message, item.decoded)
            except SchemaRegistryUnavailableError:
                raise  # nobody's fault yet: stop, and read it again after a restart
            except MissingId as why:
                self._on_missing_id(item, why)
            except Exception as unreadable:  # this message's fault, never the partition's
                text = f"cannot read the event ID: {type(unreadable).__name__}: {unreadable}"
                self._on_missing_id(item, InvalidId(text))
            if item.event_id is not None:
                decoded = item.decoded
                content = as_bytes(item.message.value()) if decoded is None else decoded.content()
                item.digest = payload_digest(content)
                fresh.append(item)
        if not fresh:
            return
        unique = list(dict.fromkeys(i.event_id for i in fresh if i.event_id is not None))
        found = dict(zip(unique, self.store.lookup(tp, unique, now_ms), strict=True))
        unpersisted: set[str] = set()
        for overlay in (self._pending_overlay, self._filling_overlay):  # not durable yet
            decided = overlay.records.get(tp)
            if decided:
                hits = [i for i in unique if i in decided]
                found.update((i, decided[i]) for i in hits)
                unpersisted.update(hits)
        # An ID a carried lane holds is decided there: a later copy is its duplicate.
        first: dict[str, tuple[int, bytes, _Item | IdRecord | None]] = {
            i: (*held_ids[i], held.get(held_ids[i][0])) for i in unique if i in held_ids
        }
        for item in fresh:
            event_id = item.event_id
            assert event_id is not None
            seen = first.get(event_id)
            earlier = found.get(event_id) if seen is None else seen[2]
            if (
                isinstance(earlier, IdRecord)
                and earlier.status is RecordStatus.DEAD_LETTERED
                and _redriven(item.message)
            ):  # a dead letter redriven: eligible once more (the first such copy)
                first[event_id] = (item.offset, item.digest, item)
                continue
            if seen is not None:  # seen earlier in this batch
                self._on_seen(item, *seen)
                continue
            record = found.get(event_id)
            if record is None:
                first[event_id] = (item.offset, item.digest, item)
                continue
            # Later copies in this batch compare with the decided record, not with us.
            first[event_id] = (record.offset, record.digest, record)
            if record.status is RecordStatus.IN_PROGRESS:
                item.found_claim = record  # uncertain: the walk applies processing.on_uncertain
                continue
            if record.offset == item.offset and event_id in unpersisted:
                # The same message again, decided moments ago in this log (a seek back):
                # what its watermark will say once durable.
                item.decision = Decision.REPLAY
                continue
            self._on_seen(item, record.offset, record.digest, record)
        self._observe_ages(tp, fresh, now_ms)

    def _observe_ages(self, tp: TopicPartition, items: list[_Item], now_ms: int) -> None:
        """How old the record a duplicate matched was (0 for a copy in the same batch):
        ``dedupe_duplicate_age_seconds``, to tune ``dedupe.retention`` from real traffic."""
        ages = [
            max(0, now_ms - i.first.decided_at_ms) / 1000 if isinstance(i.first, IdRecord) else 0.0
            for i in items
            if i.decision is Decision.DUPLICATE
        ]
        if ages:
            histogram = self.metrics.duplicate_age.labels(tp.topic)
            for age in ages:
                histogram.observe(age)

    def _on_missing_id(self, item: _Item, missing: MissingId) -> None:
        message = item.message
        policy = self.dedupe.on_missing_id
        why = str(missing)
        if policy == "hash":
            try:
                item.event_id = hash_id(message)
                return
            except MissingId as unhashable:
                why = f"{why}; {unhashable}"
        elif policy == "fail":
            item.fail = MissingEventIdError(
                f"{message.topic()}[{message.partition()}]@{message.offset()}: {why} "
                f"(id_source={self.dedupe.id_source!r}, on_missing_id='fail')"
            )
            item.decision = Decision.DEAD_LETTERED  # never reached: the walk stops first
            return
        item.decision = Decision.DEAD_LETTERED
        item.letter = DeadLetter(missing.reason, None, type(missing).__name__, why, 0)

    def _on_seen(
        self,
        item: _Item,
        first_offset: int,
        first_digest: bytes,
        first: _Item | IdRecord | None = None,
    ) -> None:
        item.first_offset = first_offset
        if item.digest == first_digest:
            item.decision = Decision.DUPLICATE
            item.first = first
            return
        item.decision = Decision.CONFLICT
        if self.dedupe.on_conflict == "dead-letter":
            item.letter = DeadLetter(
                DeadLetterReason.CONFLICTING_DUPLICATE,
                item.event_id,
                "ConflictingDuplicate",
                f"event id already decided at offset {first_offset} with another payload",
                0,
            )

    # -- phase 2: claim --------------------------------------------------------------------

    def _claim(self, plan: dict[TopicPartition, list[_Item]], now_ms: int) -> WriteSet:
        claims = WriteSet()
        for tp, items in plan.items():
            todo = [
                (i.event_id, IdRecord(RecordStatus.IN_PROGRESS, i.offset, now_ms, i.digest))
                for i in items
                # An uncertain event keeps its old claim: releasing it on a stop would
                # erase the only evidence that its handler may have run.
                if i.decision is None and i.event_id is not None and i.found_claim is None
            ]
            if todo:
                claims.records[tp] = todo
        if claims:
            # Claims go through the changelog producer too, and may re-commit offsets
            # that only the batches before make safe: those are durable first.
            self._settle_all()
            self._persist(claims)  # a second synced write: the price of knowing
            fault_point("after_claim")
        return claims

    # -- phase 3: walk ---------------------------------------------------------------------

    def _walk(self, batch: _Batch) -> None:
        """Run the batch's lanes on the workers; serve the group until they are done.

        A lane that only waits out a backoff does not hold the batch: it is carried
        (see :class:`_Lane`), unless the carried events not decided yet are past
        ``processing.max_unpersisted``: then the batch waits for them too.
        """
        with self._lanes_changed:
            batch.lanes = [
                lane for tp, items in batch.plan.items() for lane in self._lanes(tp, items)
            ]
        if self._async_lanes:
            self._pool.start_on_loop([self._run_lane_async(batch, lane) for lane in batch.lanes])
        else:
            for lane in batch.lanes:
                self._pool.submit(partial(self._run_lane, batch, lane))
        bound = self.processing.max_unpersisted

        lanes = batch.lanes
        closed = 0  # lanes[:closed] are closed (for good): each check starts past them

        def done() -> bool:
            nonlocal closed
            if self._carry_crash is not None:
                return True  # raised below, as if the process had died there
            while closed < len(lanes) and lanes[closed].closed:
                closed += 1
            return self._held_open <= bound and all(
                lane.closed or lane.parked or lane.tp in batch.gone
                for lane in islice(lanes, closed, None)
            )

        abandon_at: float | None = None
        while True:
            with self._lanes_changed:
                if self._lanes_changed.wait_for(done, _KEEP_ALIVE_S):
                    self._carry(batch)
                    break
            if self._keep_alive is not None:
                self._keep_alive()  # may revoke partitions: see release()
            if self._stopping.is_set():
                # A stop waits for running calls, but not for ever: a hung one is left
                # undecided (read again on restart; its claim, in claim mode, kept).
                now = time.monotonic()
                abandon_at = abandon_at or now + (self.walk_budget_s or _REVOKE_WAIT_S)
                if now > abandon_at:
                    log.warning(
                        "stopped_with_calls_running",
                        running=batch.running(),
                        consequence="their events stay undecided and are read again",
                    )
                    break
        if batch.crash is not None:
            raise batch.crash
        self._raise_carry_crash()

    def _carry(self, batch: _Batch) -> None:
        """Under the lanes' lock, at the end of a walk: its lanes still open go on
        without it; their undecided events are held (see :class:`_Lane`)."""
        for lane in batch.lanes:
            if lane.closed or lane.tp in batch.gone:
                continue
            lane.carried = True
            self._carried[(lane.tp, lane.key)] = lane
            self._hold(lane.tp, lane.items[max(0, lane.position - 1) :])

    def _hold(self, tp: TopicPartition, items: Sequence[_Item]) -> None:
        """Under the lanes' lock: ``items`` (undecided) belong to a carried lane now."""
        held = self._held.setdefault(tp, {})
        ids = self._held_ids.setdefault(tp, {})
        for item in items:
            if item.walked:
                continue
            item.carried = True
            held[item.offset] = item
            assert item.event_id is not None
            ids.setdefault(item.event_id, (item.offset, item.digest))
            self._held_open += 1

    def _lanes(self, tp: TopicPartition, items: list[_Item]) -> list[_Lane]:
        """Under the lanes' lock: the events of a partition that need the handler, cut
        into new lanes; an event whose key has a carried lane joins that lane instead.

        Each lane is handled in offset order, one event at a time. Nothing after an
        event whose missing ID stops the partition (``on_missing_id = "fail"``) starts.
        """
        todo: list[_Item] = []
        for item in items:
            if item.fail is not None:
                break
            if item.decision is None:
                todo.append(item)
        if not todo:
            return []
        grouped: dict[object, list[_Item]] = {}
        if self._pool.concurrency == 1 or self.processing.ordering == "partition":
            grouped[None] = todo
        else:
            for item in todo:
                key = item.message.key()
                grouped.setdefault(("id", item.event_id) if key is None else key, []).append(item)
        lanes: list[_Lane] = []
        for lane_key, lane_items in grouped.items():
            carried = self._carried.get((tp, lane_key))
            if carried is not None and carried.closed and not self._still_held(carried):
                del self._carried[(tp, lane_key)]  # its decisions are written (or overlaid)
                carried = None
            if carried is None or carried.gone:
                lanes.append(_Lane(tp, lane_key, lane_items))
            elif not carried.closed:
                carried.items.extend(lane_items)  # after the key's earlier events
                self._hold(tp, lane_items)
            else:  # done, its decisions not written yet: the key's events read its writes
                lanes.append(_Lane(tp, lane_key, lane_items, staged=dict(carried.staged)))
        return lanes

    def _run_lane(self, batch: _Batch, lane: _Lane) -> None:
        """On a worker: decide the lane's events in order until done or told to stop."""
        _drive(self._lane(batch, lane), self._stopping, self._pool, self._waiting(lane))

    async def _run_lane_async(self, batch: _Batch, lane: _Lane) -> None:
        """On the event loop (an ``async def`` handler): the same lane, its calls awaited
        here instead of by a worker thread blocked on each."""
        await _drive_async(self._lane(batch, lane), self._stopping, self._pool, self._waiting(lane))

    def _waiting(self, lane: _Lane) -> _Waiting:
        """How ``lane``'s waits are seen: parked during a backoff (its batch need not wait
        for it), ended at once when its partition goes."""
        return _Waiting(partial(self._set_parked, lane), lambda: lane.gone)

    def _lane(self, batch: _Batch, lane: _Lane) -> _Steps[None]:
        """Decide the lane's events in order until done or told to stop; yields where it
        waits (a user call, a backoff), so a thread or the event loop can drive it.

        Events may join the lane while it runs (see :meth:`_lanes`); it closes, under
        the lanes' lock, only when none is left. Once carried, it answers to the
        engine (a stop, a revocation), no longer to its batch.
        """
        tp = lane.tp
        changed = self._lanes_changed
        try:
            while True:
                with changed:  # whether to go on, and closing if not, in one step: an
                    # event joins only a lane that is not closed (see _lanes)
                    if (
                        lane.position >= len(lane.items)
                        or lane.gone
                        or (not lane.carried and (batch.stop.is_set() or tp in batch.gone))
                    ):
                        self._close(lane)
                        return
                    if self._stopping.is_set():
                        self._close(lane)
                        if lane.carried:  # its events stay held: read again after the restart
                            self._release_claims(lane)
                        else:
                            batch.fail(None)
                        return
                    if (
                        not lane.carried
                        and self._walk_deadline is not None
                        and time.monotonic() > self._walk_deadline
                    ):
                        self._close(lane)
                        batch.fail(None, cut=True)
                        return
                    item = lane.items[lane.position]
                    lane.position += 1
                    item.running = True
                if self._tracing is not None:
                    decision = yield from self._traced_walk(tp, item, lane.staged)
                else:
                    try:
                        decision = yield from self._walk_one(tp, item, lane.staged)
                    except BaseException:
                        item.running = False  # undecided: its claim may go
                        raise
                with changed:
                    item.decision = decision
                    item.walked = True
                    item.running = False  # after the decision: a settle sees one or the other
                    if item.carried and self._held.get(tp, {}).get(item.offset) is item:
                        self._carried_done.append((tp, item))  # written with the next batch
                        self._held_open -= 1
                        changed.notify_all()  # a walk may wait for the bound
                    # (no wake-up per decision otherwise: waiters wait for lanes to close
                    # or park, and a wake-up per event costs the consuming thread the GIL)
                if decision is Decision.HANDLED and item.staged:
                    lane.staged.update(item.staged)
        except _Cut:
            self._close(lane)
            if lane.carried:
                self._give_back(lane)
            else:
                batch.fail(None, cut=True)
        except _Stop as stop:
            self._close(lane)
            if lane.gone:
                pass  # revoked or lost: the revocation settles what it decided
            elif lane.carried:
                if stop.__cause__ is not None:
                    self._carry_error = self._carry_error or stop.__cause__
                    self._give_back(lane)
                else:  # a stop: held, read again after the restart
                    self._release_claims(lane)
            else:
                batch.fail(stop.__cause__)
        except Exception as bug:  # never lose it on a worker: the batch stops on it
            self._close(lane)
            log.exception("walk_failed", partition=str(tp))
            if lane.carried:
                self._carry_error = self._carry_error or bug
                self._give_back(lane)
            else:
                batch.fail(bug)
        except BaseException as crash:
            self._close(lane)
            if lane.carried:
                self._carry_crash = crash
            else:
                batch.crash = crash
                batch.stop.set()
        finally:
            self._close(lane)

    def _close(self, lane: _Lane) -> None:
        """No event starts or joins ``lane`` any more (the lock is re-entrant). A carried
        lane stays registered until its decisions are collected (see :meth:`_lanes`)."""
        with self._lanes_changed:
            lane.closed = True
            self._lanes_changed.notify_all()

    def _abandon_carried(self) -> None:
        """No carried lane starts another call (or waits out its backoff): the engine is
        done with them. Their undecided events stay held, read again after a restart."""
        with self._lanes_changed:
            for lane in self._carried.values():
                if not lane.closed:
                    lane.gone = True
                    self._release_claims(lane)
            self._lanes_changed.notify_all()

    def _release_claims(self, lane: _Lane) -> None:
        """Claim mode: the claims of ``lane``'s events that end undecided, with no call
        of theirs running, go with the next write."""
        if not self.claims:
            return
        with self._lanes_changed:
            held = self._held.get(lane.tp, {})
            ids = [
                item.event_id
                for item in lane.items[max(0, lane.position - 1) :]
                if not item.walked
                and not item.running
                and item.event_id is not None
                and held.get(item.offset) is item
            ]
            if ids:
                self._carry_released.setdefault(lane.tp, []).extend(ids)

    def _set_parked(self, lane: _Lane, parked: bool) -> None:
        with self._lanes_changed:
            lane.parked = parked
            self._lanes_changed.notify_all()

    def _give_back(self, lane: _Lane, *, keep_running: bool = False) -> None:
        """A carried lane stopped early: its undecided events are read again (but, with
        ``keep_running``, one whose call still runs: it stays held)."""
        with self._lanes_changed:
            tp = lane.tp
            held = self._held.get(tp, {})
            ids = self._held_ids.get(tp, {})
            self._release_claims(lane)
            for item in lane.items[max(0, lane.position - 1) :]:
                if item.walked or (keep_running and item.running):
                    continue
                if held.get(item.offset) is not item:
                    continue
                del held[item.offset]
                self._held_open -= 1
                waiting = self._unanswered.get(tp)
                if waiting:  # read again after it, like it
                    self._unanswered[tp] = [i for i in waiting if i.offset < item.offset]
                self._given_back[tp] = min(self._given_back.get(tp, item.offset), item.offset)
                if item.event_id is not None and ids.get(item.event_id, (None,))[0] == item.offset:
                    del ids[item.event_id]
                self._carry_rewind[tp] = min(self._carry_rewind.get(tp, item.offset), item.offset)
                covered = self._covered.get(tp)
                if covered is not None and covered >= item.offset:
                    self._covered[tp] = item.offset - 1
            self._lanes_changed.notify_all()

    def _settle(
        self, batch: _Batch, tps: Sequence[TopicPartition]
    ) -> tuple[WriteSet, dict[TopicPartition, int], dict[str, BatchStats], list[str]]:
        """Turn the decisions of ``tps`` into a write: records, effects, watermarks.

        Per partition in offset order: the watermark moves over the contiguous run of
        decided offsets; an event decided in phase 1 (replay, duplicate, no ID) counts
        only inside that run (else it is re-read and decided then); an event decided
        by the walk is recorded wherever it lies. Returns the write, where each
        partition with a gap is to be re-read from, the stats and the handled IDs.
        """
        write = WriteSet()
        rewind: dict[TopicPartition, int] = {}
        per_topic: dict[str, BatchStats] = {}
        handled_ids: list[str] = []
        for tp in tps:
            stats = per_topic.setdefault(tp.topic, BatchStats())
            records: list[tuple[str, IdRecord]] = []
            effects: dict[bytes, bytes | None] = {}
            outputs: list[Output] = []
            covered: int | None = None
            gap: int | None = None
            for item in batch.plan[tp]:
                if item.carried:  # its carried lane decides it; it holds the watermark
                    if gap is None:
                        covered = item.offset
                    continue
                if item.running:  # abandoned by a revocation or a stop: undecided
                    if gap is None:
                        gap = item.offset
                    continue
                if item.walked:
                    _record(item, batch.now_ms, records, effects, outputs, stats, handled_ids)
                elif gap is None and (cover := self._cover(tp, item)) != "now":
                    if cover == "again":  # past the bound of waiting duplicates
                        gap = item.offset
                        continue
                    # "wait": answered by the write that commits its offset
                elif gap is None and item.decision is not None and item.fail is None:
                    try:
                        self._walk_decided(tp, item, stats, outputs)
                    except Exception as unsent:  # not even a letter without its value
                        batch.fail(unsent)
                        gap = item.offset
                        continue
                else:
                    if item.fail is not None:
                        batch.fail(item.fail)
                    if gap is None:
                        gap = item.offset
                    continue
                if gap is None:
                    covered = item.offset
            if records:
                write.records[tp] = records
            if effects:
                write.effects[tp] = list(effects.items())
            if outputs:
                write.outputs[tp] = outputs
            if covered is not None:
                self._covered[tp] = covered
            failed = self._answer_waiting(tp, stats, outputs, batch.plan[tp])
            if failed is not None:
                batch.fail(failed[1])
                gap = failed[0] if gap is None else min(gap, failed[0])
            if outputs and tp not in write.outputs:
                write.outputs[tp] = outputs
            self._cap_watermark(write, tp)
            if gap is not None:
                rewind[tp] = gap
        # A call still running (a revocation that stopped waiting) keeps its claim: its
        # effect may happen, and the next owner must find it uncertain, not unseen. So
        # does an event of a carried lane: it is decided later.
        keep = {i.event_id for tp in tps for i in batch.plan[tp] if i.running or i.carried}
        _release_undecided(_only(batch.claimed, tps), write, keep=keep)
        return write, rewind, per_topic, handled_ids

    def _cover(self, tp: TopicPartition, item: _Item) -> Literal["now", "wait", "again"]:
        """When a phase-1 decision is written: ``"now"``, in this write. A duplicate to
        answer above an event a carried lane holds (its first copy, or any other)
        ``"wait"``s: its reply must commit with its offset, and this write's watermark
        stops below the held event; it holds the watermark until a write can cover it
        (its first copy is decided by then, if it was held). Past
        ``processing.max_unpersisted`` waiting, ``"again"``: read again (memory stays
        bounded)."""
        if item.decision is not Decision.DUPLICATE or not self._answers_duplicates:
            return "now"
        with self._lanes_changed:
            first = self._first_undecided(tp, waiting=False)
            if first is None or first > item.offset:
                return "now"
            waiting = self._unanswered.setdefault(tp, [])
            if len(waiting) >= self.processing.max_unpersisted:
                return "again"
            item.carried = True
            waiting.append(item)  # in offset order: read in order
        return "wait"

    def _answerable(self, tp: TopicPartition) -> bool:
        """Under the lanes' lock: a duplicate of ``tp`` waits, and no held event is below it."""
        waiting = self._unanswered.get(tp)
        if not waiting:
            return False
        first = self._first_undecided(tp, waiting=False)
        return first is None or waiting[0].offset < first

    def _answer_waiting(
        self, tp: TopicPartition, stats: BatchStats, outputs: list[Output], plan: list[_Item]
    ) -> tuple[int, Exception] | None:
        """Answer the duplicates of ``tp`` no held event is below any more (into
        ``outputs``; added to ``plan``, the items of the write they are in). Returns
        the offset and error of one whose dead letter failed (it and the rest are read
        again), or None."""
        with self._lanes_changed:
            waiting = self._unanswered.get(tp)
            if not waiting:
                return None
            first = self._first_undecided(tp, waiting=False)
            ready = [i for i in waiting if first is None or i.offset < first]
            if not ready:
                return None
            self._unanswered[tp] = waiting[len(ready) :]
        for item in ready:
            item.carried = False
            plan.append(item)
            try:
                self._walk_decided(tp, item, stats, outputs)
            except Exception as unsent:  # not even a letter: it and the rest read again
                covered = self._covered.get(tp)
                if covered is not None and covered >= item.offset:
                    self._covered[tp] = item.offset - 1
                return item.offset, unsent
        return None

    def _cap_watermark(self, write: WriteSet, tp: TopicPartition) -> None:
        """Set ``tp``'s watermark in ``write``: the end of the covered run, but before
        the first event a carried lane still holds; never back."""
        covered = self._covered.get(tp)
        if covered is None:
            return
        with self._lanes_changed:
            first = self._first_undecided(tp)
        watermark = covered if first is None else min(covered, first - 1)
        current = self._watermarks.get(tp)
        if watermark >= 0 and (current is None or watermark > current):
            write.watermarks[tp] = watermark

    def _first_undecided(self, tp: TopicPartition, *, waiting: bool = True) -> int | None:
        """Under the lanes' lock: ``tp``'s first offset a carried lane holds or gave back
        (or, with ``waiting``, a duplicate waits to be answered at)."""
        held = self._held.get(tp)
        firsts = [min(held)] if held else []
        given_back = self._given_back.get(tp)
        if given_back is not None:
            firsts.append(given_back)
        if waiting and self._unanswered.get(tp):
            firsts.append(self._unanswered[tp][0].offset)
        return min(firsts) if firsts else None

    def _still_held(self, lane: _Lane) -> bool:
        """Under the lanes' lock: an event of ``lane`` is held (not written yet)."""
        held = self._held.get(lane.tp, {})
        return any(held.get(item.offset) is item for item in lane.items)

    def _collect_carried(
        self, now_ms: int, tps: Collection[TopicPartition] | None = None
    ) -> _Pending | None:
        """What carried lanes decided since the last write (of ``tps``, default: every
        owned partition), as a write of its own, with where to read again from."""
        with self._lanes_changed:
            wanted = set(self._watermarks) if tps is None else set(tps)
            done = [(tp, item) for tp, item in self._carried_done if tp in wanted]
            rewind = {tp: o for tp, o in self._carry_rewind.items() if tp in wanted}
            released = {tp: ids for tp, ids in self._carry_released.items() if tp in wanted}
            for tp in released:
                del self._carry_released[tp]
            error, self._carry_error = self._carry_error, None
            self._carried_done = [(tp, i) for tp, i in self._carried_done if tp not in wanted]
            for tp in rewind:
                del self._carry_rewind[tp]
            for tp, item in done:
                self._held.get(tp, {}).pop(item.offset, None)
                ids = self._held_ids.get(tp, {})
                if item.event_id is not None and ids.get(item.event_id, (-1,))[0] == item.offset:
                    del ids[item.event_id]
            for key, lane in list(self._carried.items()):
                if lane.closed and not self._still_held(lane):
                    del self._carried[key]
            answerable = {tp for tp in wanted if self._answerable(tp)}
            if not done and not rewind and not released and error is None and not answerable:
                return None
        write = WriteSet()
        plan: dict[TopicPartition, list[_Item]] = {}
        per_topic: dict[str, BatchStats] = {}
        handled_ids: list[str] = []
        for tp, item in done:
            plan.setdefault(tp, []).append(item)
        for tp in answerable:
            plan.setdefault(tp, [])
        for tp, items in plan.items():
            items.sort(key=lambda i: i.offset)
            records: list[tuple[str, IdRecord]] = []
            effects: dict[bytes, bytes | None] = {}
            outputs: list[Output] = []
            stats = per_topic.setdefault(tp.topic, BatchStats())
            for item in items:
                _record(item, now_ms, records, effects, outputs, stats, handled_ids)
            failed = self._answer_waiting(tp, stats, outputs, items)
            if failed is not None:
                error = error or failed[1]
                rewind[tp] = min(rewind.get(tp, failed[0]), failed[0])
            if records:
                write.records[tp] = records
            if effects:
                write.effects[tp] = list(effects.items())
            if outputs:
                write.outputs[tp] = outputs
        for tp, claims in released.items():
            decided = {event_id for event_id, _ in write.records.get(tp, [])}
            write.released[tp] = [i for i in claims if i not in decided]
        for tp in set(plan) | set(rewind):
            self._cap_watermark(write, tp)
        return _Pending(
            write, plan, WriteSet(), per_topic, handled_ids, rewind, error, time.monotonic()
        )

    def _release_carried(
        self, tps: Sequence[TopicPartition], *, lost: bool
    ) -> dict[TopicPartition, int]:
        """Carried lanes of partitions that go: none starts another event, and a backoff
        ends at once. Revoked: their running calls are waited for (bounded), what they
        decided is persisted now; lost: dropped. Returns the offsets to commit."""
        gone = set(tps)
        with self._lanes_changed:
            lanes = [lane for lane in self._carried.values() if lane.tp in gone]
            for lane in lanes:
                lane.gone = True
            self._lanes_changed.notify_all()
            carrying = bool(lanes) or any(
                self._held.get(tp) or self._carry_released.get(tp) for tp in gone
            )
        commits: dict[TopicPartition, int] = {}
        if carrying and not lost:
            with self._lanes_changed:
                closed = self._lanes_changed.wait_for(
                    lambda: all(lane.closed for lane in lanes),
                    self.walk_budget_s or _REVOKE_WAIT_S,
                )
            if not closed:
                log.warning(
                    "revoked_with_calls_running",
                    partitions=sorted(str(tp) for tp in gone),
                    running=sum(1 for lane in lanes if not lane.closed),
                    consequence="their events are left undecided: the new owner handles them "
                    "again if they complete here (plain mode) or finds their claims (claim mode)",
                )
            commits = self._persist_carried(gone)
        with self._lanes_changed:
            for key in [key for key, lane in self._carried.items() if lane.tp in gone]:
                del self._carried[key]
            for tp in gone:
                held = self._held.pop(tp, {})
                self._held_open -= sum(1 for item in held.values() if not item.walked)
                self._unanswered.pop(tp, None)
                self._held_ids.pop(tp, None)
                self._covered.pop(tp, None)
                self._carry_rewind.pop(tp, None)
                self._given_back.pop(tp, None)
                self._carry_released.pop(tp, None)
            self._carried_done = [(tp, i) for tp, i in self._carried_done if tp not in gone]
        return commits

    def _persist_carried(self, tps: set[TopicPartition]) -> dict[TopicPartition, int]:
        """In a revocation: persist what the carried lanes of ``tps`` decided; an event
        still undecided keeps its claim only while its call runs."""
        pending = self._collect_carried(int(self.clock() * 1000), tps)
        write = pending.write if pending is not None else WriteSet()
        if self.claims:
            with self._lanes_changed:
                for tp in tps:
                    undecided = [
                        item.event_id
                        for item in self._held.get(tp, {}).values()
                        if not item.walked and not item.running and item.event_id is not None
                    ]
                    if undecided:
                        write.released.setdefault(tp, []).extend(undecided)
        committed = self._persist_in_revocation(write)
        if committed is None:
            return {}
        if pending is not None:
            total = BatchStats()
            for topic, stats in pending.per_topic.items():
                self.metrics.record(topic, stats)
                total.merge(stats)
            self._drained.append(BatchResult(total, {}, None, pending.handled_ids, {}))
        return {
            tp: offset + 1
            for tp, offset in write.watermarks.items()
            if committed.get(tp) != offset + 1
        }

    def _persist_in_revocation(self, write: WriteSet) -> dict[TopicPartition, int] | None:
        """Persist ``write`` in a revoke callback (the group metadata of now); the offsets
        its transaction committed, or None when nothing was made durable."""
        if not write:
            return None
        try:
            return self._persist(write, live=True)
        except NotOwnerError as fenced:
            log.warning("changelog_fenced", error=str(fenced), during="revocation")
        except Exception as failed:  # a lost dead letter, a store error: never out of a
            # rebalance callback. Nothing of it is durable: the next owner reads it again.
            log.error("revocation_persist_failed", error=f"{type(failed).__name__}: {failed}")
        return None

    def _settle_revoked(
        self, batch: _Batch, tps: list[TopicPartition], *, lost: bool
    ) -> dict[TopicPartition, int]:
        """A rebalance took ``tps`` during the walk: settle them now, before they go."""
        with self._lanes_changed:  # a lane checks these under the lock before each event
            batch.gone.update(tps)
            for lane in batch.lanes:
                if lane.tp in batch.gone:
                    lane.gone = True  # and a backoff of it ends at once
            self._lanes_changed.notify_all()
        if lost:
            log.warning(
                "lost_during_walk",
                partitions=[str(tp) for tp in tps],
                consequence="their decisions in this batch are dropped: the new owner reads "
                "them again",
            )
            return {}
        if not batch.wait(tps, self.walk_budget_s or _REVOKE_WAIT_S):
            log.warning(
                "revoked_with_calls_running",
                partitions=[str(tp) for tp in tps],
                running=batch.running(tps),
                consequence="their events are left undecided: the new owner handles them "
                "again if they complete here (plain mode) or finds their claims (claim mode)",
            )
        write, _, per_topic, handled_ids = self._settle(batch, tps)
        committed = self._persist_in_revocation(write)
        if committed is None:
            return {}
        for topic, stats in per_topic.items():
            batch.revoked_stats.setdefault(topic, BatchStats()).merge(stats)
        batch.revoked_ids.extend(handled_ids)
        for tp, offset in write.watermarks.items():
            self._watermarks[tp] = offset
        return {
            tp: offset + 1
            for tp, offset in write.watermarks.items()
            if committed.get(tp) != offset + 1
        }

    def _walk_one(
        self, tp: TopicPartition, item: _Item, staged: dict[bytes, bytes | None]
    ) -> _Steps[Decision]:
        """Decide one event. An error on its behalf is its own: it never stops the partition.

        Only a dead letter that cannot be sent at all stops the walk (the decided
        prefix is persisted).
        """
        try:
            try:
                return (yield from self._decide(tp, item, staged))
            except (_Stop, DeadLetterError):
                raise
            except Exception as failure:  # not the handler's (that is retried): ours
                log.exception(
                    "event_failed",
                    event_id=item.event_id,
                    topic=tp.topic,
                    partition=tp.partition,
                    offset=item.offset,
                )
                return (
                    yield from self._dead_letter(
                        item,
                        DeadLetterReason.INTERNAL_ERROR,
                        type(failure).__name__,
                        str(failure),
                        0,
                    )
                )
        except _Stop:
            raise
        except Exception as unsent:
            # Not even a letter without its value was accepted: persist the decisions
            # before this event and stop, rather than loop on it or skip it unrecorded.
            raise _Stop from unsent

    def _traced_walk(
        self, tp: TopicPartition, item: _Item, staged: dict[bytes, bytes | None]
    ) -> _Steps[Decision]:
        """:meth:`_walk_one` in the event's span: current while it is decided (the handler's
        own spans nest under it, its log lines carry its IDs), ended with the decision."""
        tracing = self._tracing
        assert tracing is not None
        span = item.span = tracing.start(item.message, item.offset, item.event_id)
        token = tracing.current(span)
        try:
            decision = yield from self._walk_one(tp, item, staged)
        except BaseException:
            item.running = False  # undecided: its claim may go
            tracing.restore(token)
            item.span = None
            tracing.end(span, "undecided", retries=item.retries)  # read again later
            raise
        tracing.restore(token)
        self._end_span(item, decision)
        return decision

    def _end_span(self, item: _Item, decision: Decision) -> None:
        tracing, span = self._tracing, item.span
        if tracing is None or span is None:
            return
        item.span = None
        letter = item.letter if decision is Decision.DEAD_LETTERED else None
        tracing.end(
            span,
            "uncertain"
            if item.uncertain
            else "dead-lettered"
            if letter is not None
            else str(decision),
            retries=item.retries,
            reason=None if letter is None else str(letter.reason),
            error=None if letter is None else letter.error_class,
            first_offset=item.first_offset,
            policy=self.processing.on_uncertain if item.uncertain else None,
        )

    def _walk_decided(
        self, tp: TopicPartition, item: _Item, stats: BatchStats, outputs: list[Output]
    ) -> None:
        """Count an event decided in phase 1 (a replay, a duplicate, a conflict, a
        missing ID), answering or dead-lettering it, in its span with tracing on."""
        tracing = self._tracing
        if tracing is None:
            self._count_decided(tp, item, stats, outputs)
            return
        span = item.span = tracing.start(item.message, item.offset, item.event_id)
        token = tracing.current(span)
        try:
            self._count_decided(tp, item, stats, outputs)
        except BaseException:
            tracing.restore(token)
            item.span = None
            tracing.end(span, "undecided")
            raise
        tracing.restore(token)
        assert item.decision is not None
        self._end_span(item, Decision.DEAD_LETTERED if item.letter is not None else item.decision)

    def _count_decided(
        self, tp: TopicPartition, item: _Item, stats: BatchStats, outputs: list[Output]
    ) -> None:
        assert item.decision is not None
        message = item.message
        if item.decision is Decision.DUPLICATE and self._answers_duplicates:
            self._answer_duplicate(tp, item, outputs)
        if item.decision is Decision.CONFLICT:
            log.warning(
                "conflicting_duplicate",
                event_id=item.event_id,
                topic=message.topic(),
                partition=message.partition(),
                offset=item.offset,
                first_offset=item.first_offset,
            )
        if item.letter is not None:
            reason = item.letter.reason
            if item.event_id is None:  # missing-id, invalid-id, invalid-payload (not JSON)
                log.warning(
                    "missing_event_id",
                    topic=message.topic(),
                    partition=message.partition(),
                    offset=item.offset,
                    reason=item.letter.error_message,
                    dead_letter_reason=reason,
                )
            stats.by_reason[reason] = stats.by_reason.get(reason, 0) + 1
            if item.span is not None and self._tracing is not None:
                item.letter = replace(item.letter, traceparent=self._tracing.traceparent(item.span))
            self.dead_letters.send(message, item.letter)
            # One outcome per offset: a dead-lettered conflict is a dead letter (reason
            # conflicting-duplicate), only a skipped one counts as a conflict.
            stats.add(Decision.DEAD_LETTERED)
            return
        stats.add(item.decision)

    def _answer_duplicate(self, tp: TopicPartition, item: _Item, outputs: list[Output]) -> None:
        """``Handler.on_duplicate`` with the stored response; with
        ``processing.reply_on_duplicate``, the response again as the reply (an output
        of this batch's transaction). A reply that cannot be sent dead-letters the
        duplicate (``output-failed``): the requester is never left without a trace."""
        if item.first_offset == item.offset:
            # This very message, decided before (read again after a seek back while a
            # carried lane held the watermark below it), or a recreated topic's message
            # at the same offset: not answered twice (a duplicate all the same).
            return
        first = item.first
        decided = isinstance(first, IdRecord) or (
            first is not None and first.decision is Decision.HANDLED and not first.running
        )
        # Else dead-lettered, or still being decided (its own reply answers the request).
        stored = first.response if decided and first is not None else None
        event = self._event(tp, item, None, None)
        try:
            self.handler.on_duplicate(event, stored)
        except Exception as failure:  # the duplicate is skipped all the same
            log.warning(
                "on_duplicate_failed",
                event_id=item.event_id,
                topic=tp.topic,
                partition=tp.partition,
                offset=item.offset,
                error=f"{type(failure).__name__}: {failure}",
            )
        if stored is None or not self.processing.reply_on_duplicate:
            return
        effects = self._effects(tp, {})
        try:
            send_reply(stored, event, effects, self.processing)
        except OutputError as unsendable:
            item.letter = DeadLetter(
                DeadLetterReason.OUTPUT_FAILED,
                item.event_id,
                type(unsendable).__name__,
                f"the reply to a duplicate cannot be sent: {unsendable}",
                0,
            )
            return
        outputs.extend(o._replace(answers=item.offset) for o in effects.outputs)

    def _effects(self, tp: TopicPartition, batch_effects: dict[bytes, bytes | None]) -> Effects:
        """A call's transactional effects: reads see ``batch_effects``, then the store."""
        processing = self.processing
        limit = self._output_limit
        return Effects(
            partial(self._effect, tp),
            batch_effects,
            self._max_effect_bytes,
            topic_limit=(
                limit
                if limit is None or not processing.create_output_topics
                else partial(limit, create=True)
            ),
            unemittable=self._unemittable,
            refused_topics=self._refused_outputs,
            max_outputs=processing.max_outputs_per_event,
        )

    def _decide(
        self,
        tp: TopicPartition,
        item: _Item,
        batch_effects: dict[bytes, bytes | None],
    ) -> _Steps[Decision]:
        """Handle one unseen (or uncertain) event; returns how it ended.

        Handled: what it staged is in ``item.staged``. Dead-lettered: its letter is
        in ``item.letter``.
        """
        assert item.event_id is not None
        if item.found_claim is not None:  # an in-progress claim from a process that died
            item.uncertain = True
            return (yield from self._resolve_uncertain(tp, item, batch_effects))
        return (yield from self._handle(tp, item, batch_effects))

    def _resolve_uncertain(
        self, tp: TopicPartition, item: _Item, batch_effects: dict[bytes, bytes | None]
    ) -> _Steps[Decision]:
        claim = item.found_claim
        assert claim is not None and item.event_id is not None
        policy = self.processing.on_uncertain
        lease_ms = int(self.processing.claim_lease.total_seconds() * 1000)
        age_ms = int(self.clock() * 1000) - claim.decided_at_ms
        if age_ms < lease_ms:  # another owner may still hold the claim: wait out its lease
            wait_s = (lease_ms - age_ms) / 1000
            cut = False
            if self._walk_deadline is not None:
                left = self._walk_deadline - time.monotonic()
                if left < wait_s:  # never wait past the walk budget: re-read it later
                    wait_s, cut = max(0.0, left), True
            if (yield _Wait(wait_s)):
                raise _Stop
            if cut:
                raise _Cut
        self.metrics.uncertain.labels(tp.topic, policy).inc()
        log.warning(
            "uncertain_outcome",
            event_id=item.event_id,
            topic=tp.topic,
            partition=tp.partition,
            offset=item.offset,
            claimed_at_offset=claim.offset,
            claim_age_ms=age_ms,
            policy=policy,
        )
        if policy == "skip":
            return Decision.HANDLED
        if policy == "dead-letter":
            return (
                yield from self._dead_letter(
                    item,
                    DeadLetterReason.UNCERTAIN,
                    "UncertainOutcome",
                    "a claim was found in progress: the handler may or may not have completed",
                    0,
                )
            )
        if policy == "reconcile":
            called = yield from self._attempts(
                tp,
                item,
                batch_effects,
                self.handler.reconcile,
                "reconcile",
                permanent_reason=DeadLetterReason.RECONCILE_FAILED,
                exhausted_reason=DeadLetterReason.RECONCILE_FAILED,
                respond=True,
            )
            if isinstance(called, Decision):
                return called
            if called.response is not None or called.result:
                # it happened (True, or a response, even an empty one): recorded as handled,
                # with what reconcile staged
                item.staged, item.outputs = called.effects, called.outputs
                item.response = called.response  # a response reconcile returned (not True)
                return Decision.HANDLED
        return (yield from self._handle(tp, item, batch_effects))

    def _payload(self, item: _Item) -> object:
        """The handler's payload: ``parse`` of the raw value, or ``validate`` of the decoded
        record (decoded once: phase 1 may have opened it for the ID)."""
        if item.decoded is None:
            if self._payloads.plain:
                return self.handler.parse(as_bytes(item.message.value()))
            item.decoded = self._payloads.open(item.message)
        decoded = item.decoded
        if decoded.raw:
            return self.handler.parse(decoded.record())
        return self.handler.validate(decoded.record())

    def _event(
        self, tp: TopicPartition, item: _Item, payload: object, effects: Effects | None
    ) -> Event:
        message = item.message
        assert item.event_id is not None
        headers = tuple(header_pairs(message))
        topic, partition, offset = tp.topic, tp.partition, item.offset
        timestamp = message_timestamp(message)
        if self._by_id:  # read from a by-id topic: the handler sees where it was sent
            headers, origin = split_origin(headers)
            if origin is not None:
                topic, partition, offset, stamp = origin
                timestamp = None if stamp is None else timestamp_of(stamp)
        return Event(
            id=item.event_id,
            topic=topic,
            partition=partition,
            offset=offset,
            key=as_bytes(message.key()),
            value=as_bytes(message.value()),
            headers=headers,
            timestamp=timestamp,
            payload=payload,
            cloudevent=None if item.decoded is None else item.decoded.cloudevent,
            effects=effects,
        )

    def _handle(
        self, tp: TopicPartition, item: _Item, batch_effects: dict[bytes, bytes | None]
    ) -> _Steps[Decision]:
        """Call the handler with retries."""
        called = yield from self._attempts(
            tp,
            item,
            batch_effects,
            self.handler.handle,
            "handler",
            permanent_reason=DeadLetterReason.PERMANENT_ERROR,
            exhausted_reason=DeadLetterReason.RETRIES_EXHAUSTED,
            respond=True,
        )
        if isinstance(called, Decision):
            return called
        fault_point("after_handler")
        item.staged, item.outputs = called.effects, called.outputs
        item.response = called.response
        if called.effects and self._by_id and not self._staged_by_id_warned:
            self._staged_by_id_warned = True
            log.warning(
                "staged_effects_in_topic_scope",
                topic=tp.topic,
                consequence="staged state is kept per by-id partition, which the event ID "
                "chooses: state keyed by the event ID is whole, state keyed by anything else "
                "(an account, the producers' key) is split over the by-id partitions; see "
                "docs/scope.md",
            )
        return Decision.HANDLED

    def _attempts(
        self,
        tp: TopicPartition,
        item: _Item,
        batch_effects: dict[bytes, bytes | None],
        call: Callable[[Event], object],
        what: str,
        *,
        permanent_reason: DeadLetterReason,
        exhausted_reason: DeadLetterReason,
        respond: bool = False,
    ) -> _Steps[_Called | Decision]:
        """Parse the payload, then ``call(event)`` with retries and backoff.

        Returns what the call returned with its staged writes, or
        ``Decision.DEAD_LETTERED``: ``invalid-payload`` when parsing fails (whatever
        it raises), ``permanent_reason`` when the call raises ``PermanentError``,
        ``exhausted_reason`` when its last retry fails (``output-failed`` when that
        was an output that could not be produced). ``respond``: what the call returns
        is the event's response (stored, and sent as the reply: see
        :mod:`dedupe_consumer.responses`); one too large is dead-lettered at once.
        """
        try:
            payload = self._payload(item)
        except RegistryWaitStopped:
            raise _Stop from None  # a stop request: decided so far is kept, no error
        except SchemaRegistryUnavailableError as down:
            raise _Stop from down  # nobody's fault yet: decided so far is kept, then stop
        except InvalidPayload as undecodable:  # not the wire format, an unknown schema
            return (
                yield from self._dead_letter(
                    item, undecodable.reason, type(undecodable).__name__, str(undecodable), 0
                )
            )
        except Exception as invalid:  # a ValueError by contract; anything else is the same
            return (
                yield from self._dead_letter(
                    item, DeadLetterReason.INVALID_PAYLOAD, type(invalid).__name__, str(invalid), 0
                )
            )
        processing = self.processing
        attempts = processing.max_retries + 1
        # Reads see this lane's earlier staged writes, then the store.
        effects = self._effects(tp, batch_effects)
        base = self._event(tp, item, payload, effects)
        if item.span is not None and self._tracing is not None:  # the span current in it
            call = self._tracing.in_span(item.span, call)
        for attempt in range(1, attempts + 1):
            effects.staged = {}  # a failed attempt's writes are dropped here
            effects.outputs = []  # and its outputs
            event = base if attempt == 1 else replace(base, attempt=attempt)
            try:
                if respond and self._replies:  # no call while the reply could not
                    refused = self._refused_outputs | {tp.topic, event.topic}  # go there
                    check_reply_to(event, processing, refused, self._output_limit)
                result = yield _Call(call, event)
            except PermanentError as permanent:
                return (
                    yield from self._dead_letter(
                        item,
                        permanent_reason,
                        type(permanent).__name__,
                        str(permanent),
                        attempt,
                    )
                )
            except Exception as failure:
                if attempt == attempts:
                    return (
                        yield from self._dead_letter(
                            item,
                            DeadLetterReason.OUTPUT_FAILED
                            if isinstance(failure, OutputError)
                            else exhausted_reason,
                            type(failure).__name__,
                            str(failure),
                            attempt,
                        )
                    )
                self.metrics.handler_retries.labels(tp.topic).inc()
                item.retries += 1
                delay = processing.retry_backoff.total_seconds() * 2 ** (attempt - 1)
                asked = failure.retry_after if isinstance(failure, RetryableError) else None
                if isinstance(asked, int | float) and asked > delay:  # the downstream's
                    delay = float(asked)  # wish (NaN and negatives are no wish)
                delay = min(delay, processing.retry_backoff_max.total_seconds())
                log.warning(
                    f"{what}_retry",
                    event_id=event.id,
                    topic=tp.topic,
                    partition=tp.partition,
                    offset=item.offset,
                    attempt=attempt,
                    error=f"{type(failure).__name__}: {failure}",
                    retry_in_s=delay,
                )
                if (yield _Wait(delay, park=True)):
                    raise _Stop from None
            else:
                called = _Called(result, effects.staged, effects.outputs)
                if not respond or not self._responds:
                    return called
                return (yield from self._with_response(tp, item, event, effects, called, attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _with_response(
        self,
        tp: TopicPartition,
        item: _Item,
        event: Event,
        effects: Effects,
        called: _Called,
        attempt: int,
    ) -> _Steps[_Called | Decision]:
        """A call that succeeded, with its response (see :meth:`_respond`): whatever the
        response meets, the call is not made again; the event is dead-lettered instead."""
        try:
            called.response = self._respond(tp, event, effects, called.result)
        except ResponseRefused as refused:
            reason = (
                DeadLetterReason.RESPONSE_TOO_LARGE
                if refused.too_large
                else DeadLetterReason.PERMANENT_ERROR
            )
            return (
                yield from self._dead_letter(
                    item, reason, type(refused).__name__, str(refused), attempt
                )
            )
        except OutputError as unsendable:
            return (
                yield from self._dead_letter(
                    item,
                    DeadLetterReason.OUTPUT_FAILED,
                    type(unsendable).__name__,
                    f"the reply cannot be sent: {unsendable}",
                    attempt,
                )
            )
        return called

    def _respond(
        self, tp: TopicPartition, event: Event, effects: Effects, result: object
    ) -> Response | None:
        """``result`` as the event's response (None: not one), sent as the reply when it
        has a destination. Bounded by ``dedupe.max_response_bytes`` and by what one
        changelog record can carry besides the ID and the record."""
        record_room = self._max_effect_bytes - _RECORD_BYTES - len(event.id.encode())
        limit, limit_name = self._max_response_bytes, "dedupe.max_response_bytes"
        if record_room < limit:
            limit, limit_name = record_room, "one changelog record: message.max.bytes"
        response = as_response(result, max(limit, 0), limit_name)
        if response is None:
            if result is not None and not isinstance(result, bool):
                self._warn_not_a_response(result)
            return None
        if self._sends_replies:
            if response.topic is not None:  # the handler's choice: checked like a header's
                check_topic(response.topic, self._refused_outputs | {tp.topic, event.topic})
            effects.max_outputs = None  # the reply is not one of the handler's outputs
            send_reply(response, event, effects, self.processing)
        return response

    def _warn_not_a_response(self, result: object) -> None:
        if self._result_warned:
            return
        self._result_warned = True
        log.warning(
            "handler_result_not_stored",
            handler=type(self.handler).__name__,
            returned=type(result).__name__,
            consequence="handle returned something that is not a response (bytes, str, a "
            "pydantic model or dedupe_consumer.Response): it is not stored nor sent as a "
            "reply; return None when there is no response",
        )

    def _dead_letter(
        self,
        item: _Item,
        reason: DeadLetterReason,
        error_class: str,
        error_message: str,
        attempts: int,
    ) -> _Steps[Decision]:
        """Send ``item``'s dead letter (kept in ``item.letter``); it is decided dead-lettered."""
        message = item.message
        log.error(
            "dead_lettered",
            event_id=item.event_id,
            reason=reason,
            topic=message.topic(),
            partition=message.partition(),
            offset=item.offset,
            error=f"{error_class}: {error_message}",
            attempts=attempts,
        )
        item.letter = DeadLetter(
            reason,
            item.event_id,
            error_class,
            error_message,
            attempts,
            None
            if item.span is None or self._tracing is None
            else self._tracing.traceparent(item.span),
        )
        # A step of its own: a send may wait (a full queue, a flush in progress), which
        # must never stall the event loop of async handlers.
        yield _Call(partial(self.dead_letters.send, message), item.letter)
        return Decision.DEAD_LETTERED

    def _effect(self, tp: TopicPartition, key: bytes) -> bytes | None:
        """A staged effect's value: the latest not yet durable, else the store's."""
        for overlay in (self._filling_overlay, self._pending_overlay):
            staged = overlay.effects.get(tp)
            if staged is not None and key in staged:
                return staged[key]
        return self.store.effect(tp, key)

    # -- phase 4: persist ------------------------------------------------------------------

    def _persist(
        self,
        write: WriteSet,
        fence: Mapping[TopicPartition, int] | None = None,
        *,
        live: bool = False,
    ) -> dict[TopicPartition, int]:
        """Make ``write`` durable; return the source offsets its transaction committed.

        ``fence``: the offsets its changelog transaction commits (default: from now)."""
        self.dead_letters.flush()  # a dead-lettered decision must not outlive its letter
        started = time.monotonic()
        committed: dict[TopicPartition, int] = {}
        if self.changelog is not None:
            # The changelog first: it must never be behind what any instance did. Its
            # transaction commits the source offsets too, so that the broker fences it
            # if the group has moved on (NotOwnerError: nothing is persisted then).
            if fence is None:
                fence = self._fence_offsets(write)
            committed = self.changelog.write(write, self.store, fence, live=live)
            self.metrics.changelog_write_seconds.observe(time.monotonic() - started)
        self.store.persist(write)
        if self.changelog is None and self._kept_outputs is not None:
            for outputs in write.outputs.values():
                self._kept_outputs.extend(outputs)
        self.metrics.persist_seconds.observe(time.monotonic() - started)
        self._measure_store()
        return committed

    def _measure_store(self) -> None:
        """Set ``dedupe_store_size_bytes`` (at most every couple of seconds: RocksDB
        estimates it from its files). After writes, and when idle or assigned, so a
        consumer restarted on a large store shows its size before its first write."""
        now = time.monotonic()
        if now - self._store_size_at < _STORE_SIZE_EVERY_S:
            return
        self._store_size_at = now
        size = getattr(self.store, "approximate_size", None)  # RocksStore's, not a test's
        if callable(size):
            self.metrics.store_bytes.set(size())

    def _fence_offsets(
        self, write: WriteSet, safe: Mapping[TopicPartition, int] | None = None
    ) -> dict[TopicPartition, int]:
        """The offsets a changelog transaction commits: this write's, or safe re-commits.

        A write without a new watermark (claims, tombstones) re-commits a safe
        offset of its partitions, or of any owned partition: the broker checks the
        group generation of the whole commit, which is what fences a zombie.
        ``safe``: the safe offsets when the write was handed over (default ``_next``).
        """
        safe = dict(self._next if safe is None else safe)
        with self._lanes_changed:  # never past an event a carried lane holds or gave back
            for tp, offset in safe.items():
                first = self._first_undecided(tp)
                if first is not None and first < offset:
                    safe[tp] = first
        offsets = {tp: o for tp, o in safe.items() if tp in write.partitions()}
        offsets.update({tp: o + 1 for tp, o in write.watermarks.items()})
        if not offsets and safe:
            tp, offset = next(iter(safe.items()))
            offsets[tp] = offset
        return offsets


def _redriven(message: SourceMessage) -> bool:
    """A copy of a dead letter, redriven (``dedupe-consumer dlq redrive``)."""
    return any(name == REDRIVE_HEADER for name, _ in header_pairs(message))


def _refuse_coroutines(handler: Handler) -> None:
    """``parse`` and ``on_duplicate`` run on the consuming thread: they must be plain ``def``."""
    for name in ("parse", "on_duplicate"):
        method = getattr(handler, name)
        if inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method):
            raise ConfigError(
                f"{type(handler).__name__}.{name} is `async def`: {name} must be plain `def` "
                "(handle, reconcile, setup and teardown may be async)"
            )


def _record(
    item: _Item,
    now_ms: int,
    records: list[tuple[str, IdRecord]],
    effects: dict[bytes, bytes | None],
    outputs: list[Output],
    stats: BatchStats,
    handled_ids: list[str],
) -> None:
    """An event the walk decided: its ID record, what it staged and emitted, how it counts."""
    decision = item.decision
    assert decision is not None and item.event_id is not None
    response = item.response if decision is Decision.HANDLED else None
    records.append(
        (
            item.event_id,
            IdRecord(RECORDED_AS[decision], item.offset, now_ms, item.digest, response),
        )
    )
    stats.uncertain += item.uncertain
    if decision is Decision.HANDLED:
        if item.staged:
            effects.update(item.staged)
        if item.outputs:
            outputs.extend(item.outputs)
        handled_ids.append(item.event_id)
    else:
        assert item.letter is not None
        reason = item.letter.reason
        stats.by_reason[reason] = stats.by_reason.get(reason, 0) + 1
    stats.add(decision)


def _only(write: WriteSet, tps: Sequence[TopicPartition]) -> WriteSet:
    """The share of ``write`` that belongs to ``tps``."""
    part = WriteSet()
    for tp in tps:
        if tp in write.records:
            part.records[tp] = write.records[tp]
        if tp in write.released:
            part.released[tp] = write.released[tp]
        if tp in write.effects:
            part.effects[tp] = write.effects[tp]
        if tp in write.outputs:
            part.outputs[tp] = write.outputs[tp]
        if tp in write.watermarks:
            part.watermarks[tp] = write.watermarks[tp]
    return part


@dataclass(slots=True)
class _Orphan:
    write: WriteSet
    released: bool = False
    """The partition was revoked or lost since: only a restore on reassignment revives it."""


def _part(write: WriteSet, tp: TopicPartition) -> WriteSet:
    """The share of ``write`` that belongs to ``tp``."""
    return _only(write, [tp])


def _release_undecided(
    claimed: WriteSet, write: WriteSet, keep: set[str | None] | None = None
) -> None:
    """Claims of events that were never decided must not read as uncertain later
    (except ``keep``: events whose call is still running)."""
    for tp, claims in claimed.records.items():
        decided = {event_id for event_id, _ in write.records.get(tp, [])}
        undecided = [
            event_id
            for event_id, _ in claims
            if event_id not in decided and (keep is None or event_id not in keep)
        ]
        if undecided:
            write.released[tp] = undecided
        else:
            write.released.pop(tp, None)


def _cut_before(
    failed: Sequence[tuple[str, int, int]],
    plan: dict[TopicPartition, list[_Item]],
    write: WriteSet,
    watermarks: dict[TopicPartition, int | None],
) -> bool:
    """Keep in ``write`` every decision but those whose dead letter was lost.

    The watermark of each partition stops before its first lost letter, so that
    event is redelivered; the events decided after it stay durable as ID records
    (a redelivery of them is a duplicate by lookup, never a second call).
    Returns False when no lost letter is named (nothing can be kept safely).
    """
    first: dict[TopicPartition, int] = {}
    lost: set[tuple[TopicPartition, int]] = set()
    for topic, partition, offset in failed:
        tp = TopicPartition(topic, partition)
        first[tp] = min(first.get(tp, offset), offset)
        lost.add((tp, offset))
    if not first:
        return False
    for tp, offset in first.items():
        if tp in write.records:
            write.records[tp] = [(i, r) for i, r in write.records[tp] if (tp, r.offset) not in lost]
        if tp in write.outputs:  # a duplicate from the cut on is read and answered again
            write.outputs[tp] = [
                o for o in write.outputs[tp] if o.answers is None or o.answers < offset
            ]
        items = plan.get(tp)
        current = watermarks.get(tp)
        # Below the first lost letter, and never above the settled prefix (a gap of
        # undecided events may lie below the letter: a stop, a cut, a revocation).
        last = min(offset - 1, write.watermarks.get(tp, offset - 1))
        if tp in write.watermarks and items and last >= min(i.offset for i in items):
            if current is None or last > current:
                write.watermarks[tp] = last
            else:
                del write.watermarks[tp]
        else:
            write.watermarks.pop(tp, None)
    return True


@dataclass
class _Pending:
    """A decided batch on its way to durability."""

    write: WriteSet
    plan: dict[TopicPartition, list[_Item]]
    claimed: WriteSet
    per_topic: dict[str, BatchStats]
    handled_ids: list[str]
    rewind: dict[TopicPartition, int]
    error: BaseException | None
    started: float
    next: dict[TopicPartition, int] = field(default_factory=dict)
    """The safe offsets when it was handed over (what its transaction may re-commit)."""
    future: Future[dict[TopicPartition, int]] | None = None
    fenced: NotOwnerError | None = None
    failures: int = 0
    """The engine's count of failed writes when this batch was classified."""

    @property
    def events(self) -> int:
        return sum(len(items) for items in self.plan.values())

    def absorb(self, later: _Pending) -> None:
        """Gather ``later`` (decided after this) into this write."""
        _extend(self.write, later.write)
        _extend(self.claimed, later.claimed)
        for tp, items in later.plan.items():
            self.plan.setdefault(tp, []).extend(items)
        for topic, stats in later.per_topic.items():
            self.per_topic.setdefault(topic, BatchStats()).merge(stats)
        self.handled_ids.extend(later.handled_ids)
        for tp, offset in later.rewind.items():
            self.rewind[tp] = min(offset, self.rewind.get(tp, offset))
        self.error = self.error or later.error


def _extend(write: WriteSet, later: WriteSet) -> None:
    """Append ``later`` to ``write``, as one atomic write that ends as the two in order.

    A write applies its records before its released IDs, so an ID that one of them
    records and the other releases keeps only the later of the two.
    """
    for tp, records in later.records.items():
        recorded = {event_id for event_id, _ in records}
        released = write.released.get(tp)
        if released:
            write.released[tp] = [i for i in released if i not in recorded]
        write.records.setdefault(tp, []).extend(records)
    for tp, ids in later.released.items():
        gone = set(ids)
        earlier = write.records.get(tp)
        if earlier:
            write.records[tp] = [(i, r) for i, r in earlier if i not in gone]
        write.released.setdefault(tp, []).extend(ids)
    for tp, changes in later.effects.items():
        write.effects.setdefault(tp, []).extend(changes)
    for tp, outputs in later.outputs.items():
        write.outputs.setdefault(tp, []).extend(outputs)
    write.watermarks.update(later.watermarks)
    write.changelog_positions.update(later.changelog_positions)


class _Overlay:
    """Records and staged effects decided but not durable yet, seen before the store's."""

    def __init__(self) -> None:
        self.records: dict[TopicPartition, dict[str, IdRecord | None]] = {}
        """None: released (deleted by the write)."""
        self.effects: dict[TopicPartition, dict[bytes, bytes | None]] = {}
        self.watermarks: dict[TopicPartition, int] = {}

    def add(self, write: WriteSet) -> None:
        """In the order the store applies a write: records, released IDs, effects."""
        for tp, records in write.records.items():
            self.records.setdefault(tp, {}).update(records)
        for tp, ids in write.released.items():
            self.records.setdefault(tp, {}).update(dict.fromkeys(ids))
        for tp, changes in write.effects.items():
            self.effects.setdefault(tp, {}).update(changes)
        self.watermarks.update(write.watermarks)


def _merged(results: Sequence[BatchResult]) -> BatchResult:
    """One result for several batches, in the order they were decided."""
    if len(results) == 1:
        return results[0]
    total = BatchStats()
    commits: dict[TopicPartition, int] = {}
    rewind: dict[TopicPartition, int] = {}
    handled: list[str] = []
    error: BaseException | None = None
    for result in results:
        total.merge(result.stats)
        commits.update(result.commits)
        for tp, offset in result.rewind.items():
            rewind[tp] = min(offset, rewind.get(tp, offset))
        handled.extend(result.handled_ids)
        error = error or result.error
    for tp, offset in rewind.items():  # re-read from there: nothing above it is committed
        if commits.get(tp, -1) > offset:
            del commits[tp]
    return BatchResult(total, commits, error, handled, rewind)


@dataclass(frozen=True)
class _Call:
    """A lane's step: call ``fn(arg)`` (a user hook with its event, or a dead letter's
    send); the driver sends back what it returned (awaited if it is awaitable) or throws
    in what it raised."""

    fn: Callable[[Any], object]
    event: object


@dataclass(frozen=True)
class _Wait:
    """A lane's step: wait ``seconds`` (a backoff, a lease); the driver sends back True
    when the consumer is stopping or the lane's partition went (the wait ends then)."""

    seconds: float
    park: bool = False
    """A retry's backoff: the lane's batch need not wait for it (see :class:`_Lane`)."""


@dataclass(frozen=True)
class _Waiting:
    """What a driver tells about a lane's waits, and asks."""

    parked: Callable[[bool], None]
    """Told True while a ``park`` wait runs, then False."""
    cancelled: Callable[[], bool]
    """True once the lane's partition went: the wait ends."""


_R = TypeVar("_R")
_Steps = Generator[_Call | _Wait, object, _R]
"""A lane's work: one code path, driven by a worker thread or by the event loop."""


def _drive(
    steps: _Steps[_R], stopping: threading.Event, pool: HandlerPool, waiting: _Waiting
) -> _R:
    """Run ``steps`` on this thread: calls made here (an awaitable awaited on the loop),
    waits on ``stopping``."""
    reply: object = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.send(reply) if error is None else steps.throw(error)
        except StopIteration as done:
            return cast(_R, done.value)
        reply, error = None, None
        if isinstance(step, _Wait):
            if step.park:
                waiting.parked(True)
            try:
                reply = _wait_unless(stopping, step.seconds, waiting.cancelled)
            finally:
                if step.park:
                    waiting.parked(False)
            continue
        try:
            reply = pool.call(step.fn, step.event)
        except BaseException as raised:
            error = raised


async def _coroutine(awaitable: Awaitable[object]) -> object:
    return await awaitable


async def _drive_async(
    steps: _Steps[_R], stopping: threading.Event, pool: HandlerPool, waiting: _Waiting
) -> _R:
    """Run ``steps`` on the event loop: coroutine calls awaited here, plain ones on a
    thread (never blocking the loop), waits as sleeps that end when stopping."""
    reply: object = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.send(reply) if error is None else steps.throw(error)
        except StopIteration as done:
            return cast(_R, done.value)
        reply, error = None, None
        if isinstance(step, _Wait):
            if step.park:
                waiting.parked(True)
            try:
                reply = await _sleep_unless(stopping, step.seconds, waiting.cancelled)
            finally:
                if step.park:
                    waiting.parked(False)
            continue
        try:
            if inspect.iscoroutinefunction(step.fn):
                # A task of its own: context variables the call sets stay with it.
                reply = await asyncio.create_task(
                    cast(Coroutine[Any, Any, object], step.fn(step.event))
                )
            else:  # never on the loop: on a worker of the pool (at concurrency 1, the
                # thread that ran setup), its outcome handed back as a value
                reply = await pool.call_on_worker(step.fn, step.event)
                if inspect.isawaitable(reply):
                    reply = await asyncio.create_task(_coroutine(reply))
        except asyncio.CancelledError as cancelled:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the lane itself is cancelled: not the call's outcome
            # The call raised it (a timeout inside the handler, say): a failure like any
            error = RuntimeError(f"the call was cancelled: {cancelled!r}")
        except BaseException as raised:
            error = raised


def _wait_unless(stopping: threading.Event, seconds: float, cancelled: Callable[[], bool]) -> bool:
    """Block for ``seconds``; True (at once, or within 50 ms) when the consumer is
    stopping or ``cancelled()`` says so."""
    deadline = time.monotonic() + seconds
    while not cancelled():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if stopping.wait(min(left, 0.05)):
            return True
    return True


async def _sleep_unless(
    stopping: threading.Event, seconds: float, cancelled: Callable[[], bool]
) -> bool:
    """Sleep ``seconds``; True (at once, or within 50 ms) when the consumer is stopping
    or ``cancelled()`` says so."""
    deadline = time.monotonic() + seconds
    while not stopping.is_set() and not cancelled():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(left, 0.05))
    return True
