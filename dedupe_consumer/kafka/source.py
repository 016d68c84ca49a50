"""The Kafka consumer as a source of batches.

The source owns the confluent-kafka ``Consumer`` and translates its rebalance
callbacks into the listener calls the runner understands. Offsets are never
auto-committed or auto-stored: the only commits are the ones the runner asks
for after the engine has persisted the decisions they cover.

It is also the one owner of offsets that are durable but not committed yet
(:attr:`KafkaSource.uncommitted`): a commit is asynchronous, so only the
source learns whether it went through. It retries failed ones, commits a
revoked partition's synchronously before it goes, forgets a lost partition's,
and drops those a changelog transaction committed. Kafka's exceptions stop
here: :meth:`KafkaSource.commit` raises the library's
:class:`~dedupe_consumer.errors.CommitError`.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicCollection,
)
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, not in __all__
    AdminClient,
    OffsetSpec,
)

from dedupe_consumer.config import Settings
from dedupe_consumer.contracts import AssignmentListener, PartitionLog
from dedupe_consumer.errors import CommitError
from dedupe_consumer.kafka.changelog import Changelog, RestoreCancelled
from dedupe_consumer.kafka.logs import (
    kafka_error_fields,
    kafka_log_config,
    plain_offset,
)
from dedupe_consumer.kafka.permissions import AUTHORIZATION_FAILED, consuming_refused
from dedupe_consumer.kafka.topics import controller_known
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.observability import Metrics

log = structlog.get_logger("dedupe_consumer.kafka")
_UUID = struct.Struct(">QQ")
READ_AHEAD_BYTES = 32 * 1024 * 1024
"""At most this many value bytes are read ahead while a batch is walked (see
:meth:`KafkaSource.keep_alive`)."""
LAG_EVERY_S = 1.0
"""``dedupe_consumer_lag`` is refreshed at most this often (from a poll)."""
RESTORE_THREADS = 4
"""Partitions restored at once (each with its own changelog reader)."""
PLACE_WAIT_S = 5.0
"""How long a restored partition with a watermark waits for the group's commit to be
readable before it starts after the watermark (asked at each poll, 0.5 s at most)."""
RESTORE_STOP_WAIT_S = 30.0
"""How long a revocation waits for a stopped restore to end (it checks every second)."""


@dataclass
class _Restore:
    """A partition assigned paused while its state is restored on a worker thread."""

    tp: TopicPartition
    log: PartitionLog | None
    future: Future[int]
    cancelled: threading.Event


@dataclass
class _Unplaced:
    """A restored partition, owned and paused until its start is known and sought."""

    partition: KafkaTopicPartition
    start: int | None
    """The watermark + 1 (None: no watermark; the group's commit alone decides)."""
    log: PartitionLog | None
    since: float
    """When its restore was taken (``time.monotonic()``)."""
    placed: bool = False
    """Its start is set in ``partition.offset`` (the seek may still be refused)."""
    deferred: bool = False
    refused: bool = False


def _kafka_offsets(offsets: Mapping[TopicPartition, int]) -> list[KafkaTopicPartition]:
    return [KafkaTopicPartition(tp.topic, tp.partition, o) for tp, o in offsets.items()]


def _tp(partition: KafkaTopicPartition) -> TopicPartition:
    return TopicPartition(partition.topic, partition.partition)


def _tps(partitions: Sequence[KafkaTopicPartition]) -> list[TopicPartition]:
    return [TopicPartition(p.topic, p.partition) for p in partitions]


def _uuid_bytes(uuid: Any) -> bytes:
    """A confluent-kafka ``Uuid`` as its 16 bytes."""
    mask = (1 << 64) - 1
    high = uuid.get_most_significant_bits() & mask
    low = uuid.get_least_significant_bits() & mask
    return bytes(_UUID.pack(high, low))


def consumer_protocol(conf: Mapping[str, object]) -> bool:
    """Whether the consumer group protocol of KIP-848 (``group.protocol = "consumer"``) is on."""
    return str(conf.get("group.protocol", "classic")).lower() == "consumer"


class KafkaSource:
    """A subscribed consumer that returns batches and commits on request."""

    def __init__(
        self,
        settings: Settings,
        listener: AssignmentListener,
        metrics: Metrics | None = None,
        *,
        changelog: Changelog | None = None,
    ) -> None:
        """With a ``changelog``, each of its transactions commits the source offsets
        with this consumer's group metadata (so the broker fences a stale owner),
        and what it committed is not committed again."""
        self.settings = settings
        self.listener = listener
        self.metrics = metrics or Metrics()
        kafka = settings.kafka
        conf: dict[str, Any] = {
            **kafka.connection().config("consumer"),
            "group.id": kafka.group_id,
            "auto.offset.reset": kafka.auto_offset_reset,
            "enable.partition.eof": False,
        }
        conf.update(kafka.consumer)
        conf["enable.auto.commit"] = False
        conf["enable.auto.offset.store"] = False
        conf["on_commit"] = self._on_commit
        self.uncommitted: dict[TopicPartition, int] = {}
        """Durable offsets, latest per partition, not known to be committed yet."""
        self._consuming_thread = threading.get_ident()
        """The thread that polls (it builds the source): the only one that may call the
        consumer."""
        self._uncommitted_lock = threading.Lock()
        """The engine's persister thread reports offsets its transaction committed."""
        self._group_metadata: object | None = None
        self._admin: AdminClient | None = None
        self._recommit = False
        self._failed: CommitError | None = None
        self._denied: Exception | None = None
        """A commit the broker refused for a missing right: raised by the next commit."""
        """An asynchronous commit that failed, raised by the next :meth:`commit`."""
        self._kept: list[Message] = []
        """Messages that arrived while a batch was walked (keep_alive): the next batch."""
        self._kept_bytes = 0
        """The value bytes :attr:`_kept` holds (``len`` of a message)."""
        self._paused = False
        self._restoring: dict[TopicPartition, _Restore] = {}
        """Partitions assigned paused while their state is restored (:meth:`_on_assign`)."""
        self._parked: dict[TopicPartition, _Restore] = {}
        """Restores of partitions an eager rebalance revoked: kept going until the next
        assignment says whether the partition came back."""
        self._owned: set[TopicPartition] = set()
        """Partitions the listener took (``on_assigned``): the ones to give back."""
        self._unplaced: dict[TopicPartition, _Unplaced] = {}
        """Restored and owned, paused until their start is known and sought."""
        self._stale: dict[TopicPartition, Future[int]] = {}
        """Stopped restores that did not end in time, by partition (see _start_restores)."""
        self._restorer: ThreadPoolExecutor | None = None
        self._closing = False
        """close() has begun: an assignment served while leaving the group is not taken."""
        self._lag_at = float("-inf")
        """When ``dedupe_consumer_lag`` was last set (:meth:`_note_lag`)."""
        strategy = str(conf.get("partition.assignment.strategy", ""))
        # Incremental (un)assignment: cooperative-sticky, and always with the consumer
        # group protocol (KIP-848), where an eager assign() fails with _STATE.
        self.cooperative = "cooperative" in strategy or consumer_protocol(conf)
        self.max_poll_interval_ms = kafka.max_poll_interval_ms
        self._consumer = Consumer({**conf, **kafka_log_config()})
        self._changelog = changelog
        if changelog is not None:
            changelog.group_metadata = self.consumer_group_metadata
            changelog.live_group_metadata = self.live_group_metadata
            changelog.on_offsets_committed = self.committed_in_transaction
        self._consumer.subscribe(
            list(kafka.topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    # -- rebalance callbacks (run inside consume()) --------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        """Take the partitions: those whose state needs no restore resume at once; the
        others are assigned paused while their restore runs on other threads, and
        resume from :meth:`_take_restored` once it is done. Polling goes on meanwhile,
        so a long restore never costs the group membership (``max.poll.interval.ms``).
        """
        if self._closing:
            # close() is leaving the group and librdkafka served one more assignment on
            # the way: taken by librdkafka only (no restore, nothing decided, nothing
            # told to the listener), and given up with the group.
            if self.cooperative:
                consumer.incremental_assign(partitions)
            else:
                consumer.assign(partitions)
            return
        logs = self._partition_logs(partitions)
        tps = _tps(partitions)
        # An eager rebalance revokes everything, then assigns: a restore parked by the
        # revocation goes on if its partition came back, and is stopped if not.
        kept = {tp: self._parked.pop(tp) for tp in tps if tp in self._parked}
        self._stop_restores(list(self._parked), parked=True)
        restoring = set(self.listener.prepare([tp for tp in tps if tp not in kept]))
        restoring.update(kept)
        ready = [p for p in partitions if TopicPartition(p.topic, p.partition) not in restoring]
        later = [p for p in partitions if TopicPartition(p.topic, p.partition) in restoring]
        if ready:
            ready_tps = _tps(ready)
            resume = self.listener.on_assigned(ready_tps, logs, {})
            self._owned.update(ready_tps)
            wanted = any(v is not None for v in resume.values())
            self._place(ready, resume, logs, self._committed(ready, 30) if wanted else None)
        for p in later:
            # Assigned at a placeholder, never read (paused until sought to its start):
            # a partition assigned without an offset is not started before librdkafka
            # reads the group's commit, which stays unreadable while a previous owner's
            # transaction with offsets is open, and an unstarted partition refuses seeks.
            low = logs.get(_tp(p))
            p.offset = low.low if low is not None else OFFSET_BEGINNING
        if self.cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        # librdkafka keeps a partition paused across its revocation and a later
        # assignment: one paused by keep_alive would never be fetched again. A batch
        # still being walked past its read-ahead bound pauses it anew at the next
        # keep_alive.
        if ready:
            consumer.resume(ready)
        if later:
            consumer.pause(later)  # nothing of theirs is decided before their state is
            for tp, restore in kept.items():
                restore.log = logs.get(tp, restore.log)
                self._restoring[tp] = restore
            self._start_restores([p for p in later if _tp(p) not in kept], logs)

    def _place(
        self,
        partitions: list[KafkaTopicPartition],
        resume: Mapping[TopicPartition, int | None],
        logs: Mapping[TopicPartition, PartitionLog],
        committed: list[KafkaTopicPartition] | None,
    ) -> None:
        """Set each partition's start: the group's commit (``committed``, None when not
        known), or the store's watermark + 1 when that is further (another instance may
        have gone further than us, or an operator moved the group's offsets on)."""
        for i, p in enumerate(partitions):
            tp = _tp(p)
            start = resume.get(tp)
            done = committed[i].offset if committed is not None else OFFSET_INVALID
            if tp in logs and done > logs[tp].high:
                done = OFFSET_INVALID  # past the end of the log: a truncated or new topic
            if start is not None and (done < 0 or start > done):
                p.offset = start
                # Decided but not committed (a crash between persist and commit): commit
                # it now, or an idle partition would show that lag forever.
                self.uncommitted[tp] = start
                self._recommit = True
            else:
                p.offset = done if done >= 0 else OFFSET_INVALID
        log.info("assigned", partitions=_starts(partitions, resume, committed is not None))

    def _committed(
        self, partitions: list[KafkaTopicPartition], timeout_s: float, *, warn: bool = True
    ) -> list[KafkaTopicPartition] | None:
        """The group's commits of ``partitions``; None when they cannot be read in time
        (e.g. unstable: a previous owner's transaction with offsets is still open)."""
        try:
            committed: list[KafkaTopicPartition] = self._consumer.committed(
                partitions, timeout=timeout_s
            )
            return committed
        except KafkaException as exc:
            if warn:
                log.warning("committed_offsets_unavailable", **kafka_error_fields(exc))
            return None

    # -- restores (off the polling thread) -------------------------------------------------

    def _start_restores(
        self, partitions: list[KafkaTopicPartition], logs: Mapping[TopicPartition, PartitionLog]
    ) -> None:
        if self._restorer is None:
            self._restorer = ThreadPoolExecutor(RESTORE_THREADS, thread_name_prefix="restore")
        for p in partitions:
            tp = TopicPartition(p.topic, p.partition)
            cancelled = threading.Event()
            # A stopped restore that has not ended yet writes the same state: this one
            # starts once it has (two restores of one partition never run at once).
            before = self._stale.pop(tp, None)
            future = self._restorer.submit(self._restore, tp, cancelled.is_set, before)
            self._restoring[tp] = _Restore(tp, logs.get(tp), future, cancelled)
        log.info("restoring", partitions=[str(tp) for tp in self._restoring])

    def _restore(
        self, tp: TopicPartition, stopping: Callable[[], bool], before: Future[int] | None
    ) -> int:
        if before is not None:
            with contextlib.suppress(BaseException):
                before.result()
        if stopping():
            raise RestoreCancelled(f"restore of {tp} stopped before it began")
        return self.listener.restore(tp, stopping)

    def _take_restored(self) -> None:
        """Partitions whose restore is done: owned from now, read from their start."""
        done = [r for r in self._restoring.values() if r.future.done()]
        if not done:
            return
        for restore in done:
            del self._restoring[restore.tp]
        failed = next((r for r in done if r.future.exception() is not None), None)
        if failed is not None:
            # The state cannot be caught up: deciding on it could repeat effects. Stop,
            # as a failed restore in the assignment itself did (raised from the poll).
            self.listener.on_restore_cancelled([r.tp for r in done])
            raise failed.future.exception()  # type: ignore[misc]
        tps = [r.tp for r in done]
        logs = {r.tp: r.log for r in done if r.log is not None}
        resume = self.listener.on_assigned(tps, logs, {r.tp: r.future.result() for r in done})
        self._owned.update(tps)
        for restore in done:
            partition = KafkaTopicPartition(restore.tp.topic, restore.tp.partition)
            self._unplaced[restore.tp] = _Unplaced(
                partition, resume.get(restore.tp), restore.log, time.monotonic()
            )
        self._place_unplaced()

    def _place_unplaced(self) -> None:
        """Start each restored partition: read the group's commit, seek, resume.

        Nothing here blocks the loop for long. The commits are asked for with a short
        timeout; while they cannot be read (unstable while a previous owner's
        transaction with offsets is open), a partition with a watermark starts after it
        once :data:`PLACE_WAIT_S` have passed (this library's commits never pass the
        watermark + 1); one without waits for the commit. A seek librdkafka refuses
        yet is tried again at the next poll; the partition stays paused meanwhile.
        """
        waiting = [u for u in self._unplaced.values() if not u.placed]
        if waiting:
            partitions = [u.partition for u in waiting]
            committed = self._committed(partitions, 0.5, warn=False)
            if committed is None:
                now = time.monotonic()
                for u in waiting:
                    if not u.deferred:
                        u.deferred = True
                        log.info(
                            "start_deferred",
                            partition=str(_tp(u.partition)),
                            reason="the group's committed offset cannot be read yet",
                        )
                waiting = [
                    u for u in waiting if u.start is not None and now - u.since >= PLACE_WAIT_S
                ]
                if waiting:
                    log.warning(
                        "committed_offsets_unavailable",
                        partitions=[str(_tp(u.partition)) for u in waiting],
                        consequence="starting after the restored watermark",
                    )
            starts = {_tp(u.partition): u.start for u in waiting}
            logs = {_tp(u.partition): u.log for u in waiting if u.log is not None}
            self._place([u.partition for u in waiting], starts, logs, committed)
            reset = (
                OFFSET_BEGINNING
                if self.settings.kafka.auto_offset_reset == "earliest"
                else OFFSET_END
            )
            for u in waiting:
                u.placed = True
                if u.partition.offset < 0:  # no commit and no watermark
                    u.partition.offset = reset
        for tp, u in list(self._unplaced.items()):
            if not u.placed:
                continue
            try:
                self._consumer.seek(u.partition)
            except KafkaException as exc:
                if not u.refused:
                    u.refused = True
                    log.info("seek_deferred", partition=str(tp), **kafka_error_fields(exc))
                continue
            del self._unplaced[tp]
            self._consumer.resume([u.partition])

    def _stop_restores(
        self, tps: Sequence[TopicPartition], *, parked: bool = False
    ) -> list[TopicPartition]:
        """Stop the restores of those of ``tps`` being restored (or ``parked``); return
        those."""
        source = self._parked if parked else self._restoring
        stopped = [source.pop(tp) for tp in tps if tp in source]
        for restore in stopped:
            restore.cancelled.set()
            restore.future.cancel()  # one still queued never starts
        deadline = time.monotonic() + RESTORE_STOP_WAIT_S  # one wait for them all
        for restore in stopped:
            try:
                restore.future.result(timeout=max(0.0, deadline - time.monotonic()))
            except (RestoreCancelled, CancelledError):
                pass
            except TimeoutError:
                self._stale[restore.tp] = restore.future
                log.error(
                    "restore_not_stopped",
                    partition=str(restore.tp),
                    waited_s=RESTORE_STOP_WAIT_S,
                    consequence="a later restore of the partition waits for it to end",
                )
            except Exception as exc:  # the partition goes anyway: nothing to stop for
                log.warning("restore_failed", partition=str(restore.tp), error=str(exc))
        if stopped:
            self.listener.on_restore_cancelled([r.tp for r in stopped])
            log.info("restore_stopped", partitions=[str(r.tp) for r in stopped])
        return [r.tp for r in stopped]

    def _partition_logs(
        self, partitions: list[KafkaTopicPartition]
    ) -> dict[TopicPartition, PartitionLog]:
        """Topic IDs and log bounds of ``partitions``, for the offset-regression check.

        Two admin requests per assignment. When the cluster cannot answer, the check
        is skipped for this assignment, loudly: the watermark alone still applies.
        """
        if not partitions:
            return {}
        try:
            if self._admin is None:
                self._admin = AdminClient(
                    {**self.settings.kafka.connection().config("admin"), **kafka_log_config()}
                )
            admin = self._admin
            metadata = admin.list_topics(timeout=10)
            counts = {
                name: len(topic.partitions)
                for name, topic in metadata.topics.items()
                if topic.error is None and topic.partitions
            }
            if not controller_known(metadata):
                log.warning(
                    "partition_logs_unavailable",
                    error="the cluster names no live controller to describe topics",
                    consequence="a recreated or truncated topic cannot be detected at this "
                    "assignment; offsets at or below the stored watermark count as replays",
                )
                return {}
            topics = sorted({p.topic for p in partitions})
            ids: dict[str, bytes | None] = {}
            described = admin.describe_topics(TopicCollection(topics), request_timeout=30)
            for name, future in described.items():
                uuid = future.result().topic_id
                ids[name] = None if uuid is None else _uuid_bytes(uuid)
            bounds: dict[str, dict[TopicPartition, int]] = {}
            earliest = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
            latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
            retention_ms = int(self.settings.dedupe.retention.total_seconds() * 1000)
            retained = OffsetSpec.for_timestamp(int(time.time() * 1000) - retention_ms)
            for which, spec in (("low", earliest), ("high", latest), ("retained", retained)):
                asked = {KafkaTopicPartition(p.topic, p.partition): spec for p in partitions}
                answers = admin.list_offsets(asked, request_timeout=30)
                bounds[which] = {
                    TopicPartition(k.topic, k.partition): int(f.result().offset)
                    for k, f in answers.items()
                }
        except KafkaException as exc:
            log.error(
                "partition_logs_unavailable",
                error=str(exc),
                consequence="a recreated or truncated topic cannot be detected at this "
                "assignment; offsets at or below the stored watermark count as replays",
            )
            return {}
        return {
            tp: PartitionLog(
                ids.get(tp.topic),
                bounds["low"][tp],
                bounds["high"][tp],
                # -1: no event is that recent, so none is within the retention window
                bounds["high"][tp] if bounds["retained"][tp] < 0 else bounds["retained"][tp],
                counts.get(tp.topic),
            )
            for tp in _tps(partitions)
        }

    def _on_revoke(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        tps = _tps(partitions)
        self._forget_kept(tps)
        self._forget_lag(tps)
        self._forget_unplaced(tps)
        if self.cooperative:
            self._stop_restores(tps)
        else:  # eager: the next assignment may give them straight back (see _on_assign)
            for tp in tps:
                if tp in self._restoring:
                    self._parked[tp] = self._restoring.pop(tp)
        gone = [tp for tp in tps if tp not in self._owned]
        tps = [tp for tp in tps if tp in self._owned]  # the rest was never the engine's
        self._owned.difference_update(tps)
        if not tps:
            if gone:
                log.info("revoked", partitions=[str(tp) for tp in gone])
            return
        commits: Mapping[TopicPartition, int] = {}
        try:
            commits = self.listener.on_revoked(tps)  # what the walk in progress settled
        finally:
            # Whatever the listener did: the next owner starts from here, and nothing of
            # these partitions may be committed once they are gone.
            self.uncommitted.update(commits)
            self._commit_now(tps)
            for tp in tps:
                self.uncommitted.pop(tp, None)
        log.info("revoked", partitions=[str(tp) for tp in tps])

    def _on_lost(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        tps = _tps(partitions)
        self._forget_kept(tps)
        self._forget_lag(tps)
        self._forget_unplaced(tps)
        stopped = self._stop_restores(tps)  # others may have written since: start over
        tps = [tp for tp in tps if tp in self._owned]
        self._owned.difference_update(tps)
        if stopped and not tps:
            return
        try:
            self.listener.on_lost(tps)
        finally:
            for tp in tps:
                self.uncommitted.pop(tp, None)  # not ours any more: nothing may be committed
        log.warning("partitions_lost", partitions=[str(tp) for tp in tps])

    def _on_commit(self, error: KafkaError | None, partitions: list[KafkaTopicPartition]) -> None:
        if error is None:
            return
        self._recommit = True  # sent again with the next commit, which raises this error
        refused = [p for p in partitions if p.error is not None] or partitions
        denied = next(
            (
                e
                for e in [error, *(p.error for p in refused)]
                if e is not None and e.code() in AUTHORIZATION_FAILED
            ),
            None,
        )
        if denied is not None:  # an ACL removed while running: retrying changes nothing
            self._denied = consuming_refused(denied, self.settings, None)
        fields = kafka_error_fields(error)
        self._failed = CommitError(
            fields["error"],
            code=fields["error_code"],
            offsets={TopicPartition(p.topic, p.partition): p.offset for p in refused},
        )

    # -- batches and commits ---------------------------------------------------------------

    def keep_alive(self) -> None:
        """Poll while handler calls run: the group sees a live member and rebalances are
        served, however long the calls take.

        What arrives meanwhile is kept for the next batch (read ahead), up to one
        batch (``processing.batch_size`` messages; no new read once
        :data:`READ_AHEAD_BYTES` of values are kept, so one read may pass it); past
        that, every assigned partition is paused until the next :meth:`poll`. Pausing
        only then matters: librdkafka drops what it fetched for a paused partition
        and, once resumed, fetches again up to a second later (measured: 0.4-1 s after
        every long batch), which a consumer with a 2 ms handler at concurrency 1 felt
        as a 30% loss.
        """
        if not self._paused:
            room = self.settings.processing.batch_size - len(self._kept)
            if room > 0 and self._kept_bytes < READ_AHEAD_BYTES:
                fetched = self._consumer.consume(num_messages=room, timeout=0)
                self._kept.extend(fetched)
                self._kept_bytes += sum(len(m) for m in fetched)
            if len(self._kept) < self.settings.processing.batch_size and (
                self._kept_bytes < READ_AHEAD_BYTES
            ):
                return
            self._paused = True
        # Paused at every call past the bound, not once: a rebalance served by the last
        # consume() resumes what it assigns (see _on_assign), which would then be read
        # ahead without bound for the rest of the walk.
        assignment = self._active()
        if assignment:
            self._consumer.pause(assignment)
        # Fetched before the pause, or assigned just now: kept for the next poll.
        fetched = self._consumer.consume(num_messages=1000, timeout=0)
        self._kept.extend(fetched)
        self._kept_bytes += sum(len(m) for m in fetched)

    def _forget_unplaced(self, tps: Sequence[TopicPartition]) -> None:
        for tp in tps:
            self._unplaced.pop(tp, None)

    def _forget_kept(self, tps: Sequence[TopicPartition]) -> None:
        gone = set(tps)
        self._kept = [m for m in self._kept if (m.topic(), m.partition()) not in gone]
        self._kept_bytes = sum(len(m) for m in self._kept)

    def _active(self) -> list[KafkaTopicPartition]:
        """The assignment but the partitions being restored (they stay paused)."""
        return [
            p
            for p in self._consumer.assignment()
            if _tp(p) not in self._restoring and _tp(p) not in self._unplaced
        ]

    def poll(self, max_messages: int, timeout_s: float) -> list[Message]:
        if self._restoring:
            self._take_restored()
        if self._unplaced:
            self._place_unplaced()
        if self._paused:
            self._paused = False
            assignment = self._active()
            if assignment:
                self._consumer.resume(assignment)
        if self._kept:
            messages, self._kept = self._kept[:max_messages], self._kept[max_messages:]
            self._kept_bytes = sum(len(m) for m in self._kept)
        else:
            messages = self._consumer.consume(num_messages=max_messages, timeout=timeout_s)
        # The generation this batch was fetched in. Taken now, not at commit time: once
        # kicked out, librdkafka resets it to "no generation", which a transactional
        # offset commit would not be fenced by.
        self._group_metadata = self._consumer.consumer_group_metadata()
        self._note_lag()
        if self._restoring or self._unplaced:
            messages = self._drop_restoring(messages)
        if not any(m.error() for m in messages):
            return messages
        good: list[Message] = []
        for m in messages:
            error = m.error()
            if error is None:
                good.append(m)
            elif error.code() == KafkaError._MAX_POLL_EXCEEDED:
                self.metrics.poll_interval_exceeded.inc()
                log.error(
                    "max_poll_interval_exceeded",
                    max_poll_interval_ms=self.max_poll_interval_ms,
                    consequence="group membership lost; the partitions are re-assigned and "
                    "resume after the durable watermark, so nothing is lost; with several "
                    "instances, a new owner may repeat handler calls of the batch in flight",
                    fix="lower processing.batch_size or raise max.poll.interval.ms",
                )
            elif error.code() in AUTHORIZATION_FAILED:  # an ACL is missing (or was removed)
                raise consuming_refused(error, self.settings, m.topic())
            elif error.fatal() or error.code() == KafkaError._FATAL:  # the message of one
                raise KafkaException(error)  # has _FATAL, not itself flagged fatal
            else:
                log.warning("consumer_error", **kafka_error_fields(error))
        return good

    def _drop_restoring(self, messages: list[Message]) -> list[Message]:
        """Messages of a partition not started yet (fetched from its placeholder before
        its pause took hold, if ever): dropped; the seek to its start reads them again."""
        return [
            m
            for m in messages
            if m.error() is not None
            or (
                (tp := TopicPartition(m.topic() or "", m.partition() or 0)) not in self._restoring
                and tp not in self._unplaced
            )
        ]

    def _note_lag(self) -> None:
        """Set ``dedupe_consumer_lag`` of each assigned partition, at most once a second.

        Local calls only: librdkafka's cached log end (from the last fetch) and position.
        """
        now = time.monotonic()
        if now - self._lag_at < LAG_EVERY_S:
            return
        self._lag_at = now
        try:
            for p in self._consumer.position(self._consumer.assignment()):
                if p.offset < 0:
                    continue  # nothing consumed yet: no position to measure from
                _, high = self._consumer.get_watermark_offsets(p, cached=True)
                if high is not None and high >= 0:
                    lag = max(0, high - p.offset)
                    self.metrics.consumer_lag.labels(p.topic, str(p.partition)).set(lag)
        except KafkaException as exc:  # a metric is never worth a failed poll
            log.debug("lag_unavailable", **kafka_error_fields(exc))

    def _forget_lag(self, tps: Sequence[TopicPartition]) -> None:
        for tp in tps:
            with contextlib.suppress(KeyError):  # never measured
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Asynchronous commit, issued after the decisions it covers are durable.

        Waiting for the broker's answer would cost a round trip per batch and buy
        nothing: a lost commit only means redelivered offsets that the watermark
        skips. Revocation and close commit synchronously. After a failed commit,
        every uncommitted offset is sent again with the next call; ``{}`` (an idle
        poll) only does that. Raises :class:`CommitError` when librdkafka refuses
        the commit now, or when the broker refused an earlier one (its answer
        comes during a poll): either way it was just sent again.
        """
        with self._uncommitted_lock:
            self.uncommitted.update(offsets)
            if self._recommit:  # an earlier commit failed (a rebalance, say): again
                offsets = dict(self.uncommitted)
        if self._denied is not None:
            raise self._denied
        failed, self._failed = self._failed, None
        if offsets:
            self._recommit = False
            try:
                self._consumer.commit(offsets=_kafka_offsets(offsets), asynchronous=True)
            except KafkaException as exc:
                self._recommit = True
                fields = kafka_error_fields(exc)
                raise CommitError(
                    fields["error"], code=fields["error_code"], offsets=offsets
                ) from exc
        if failed is not None:
            raise failed

    def consumer_group_metadata(self) -> object | None:
        """The group metadata of the last poll (opaque), for transactional offset commits."""
        return self._group_metadata

    def live_group_metadata(self) -> object | None:
        """The group metadata now, for a transaction retried after a cooperative rebalance.

        None off the consuming thread: the engine's persister must never call into the
        consumer, which may be inside a rebalance callback that waits for the persister
        (a deadlock). Its write, fenced by a stale generation, is then treated as
        fenced, kept, and persisted again on the consuming thread if still ours.
        """
        if threading.get_ident() != self._consuming_thread:
            return None
        metadata: object = self._consumer.consumer_group_metadata()
        return metadata

    def committed_in_transaction(self, offsets: Mapping[TopicPartition, int]) -> None:
        """A changelog transaction committed ``offsets``: nothing older is to be re-sent."""
        with self._uncommitted_lock:
            for tp, offset in offsets.items():
                if self.uncommitted.get(tp, offset) <= offset:
                    self.uncommitted.pop(tp, None)

    def seek(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._forget_kept(list(offsets))  # read again from there, not from what was kept
        try:
            for ktp in _kafka_offsets(offsets):
                self._consumer.seek(ktp)
        except KafkaException as exc:  # revoked meanwhile: its new owner reads it
            log.warning(
                "seek_failed",
                **kafka_error_fields(exc),
                offsets={str(tp): o for tp, o in offsets.items()},
            )

    def _commit_now(self, tps: Sequence[TopicPartition] | None = None) -> None:
        offsets = {tp: o for tp, o in self.uncommitted.items() if tps is None or tp in tps}
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=_kafka_offsets(offsets), asynchronous=False)
        except KafkaException as exc:
            self.metrics.commit_failures.inc()
            log.warning(
                "commit_failed", **kafka_error_fields(exc), note="covered by the durable watermark"
            )

    def close(self) -> None:
        self._closing = True
        self._stop_restores(list(self._restoring))
        self._stop_restores(list(self._parked), parked=True)
        if self._restorer is not None:
            # Before the store closes: a restore thread must not write to a closed store.
            self._restorer.shutdown(wait=True, cancel_futures=True)
        self._commit_now()
        self._consumer.close()
        if self._changelog is not None:  # it may outlive this source (edges run again)
            self._changelog.group_metadata = None
            self._changelog.live_group_metadata = None
            self._changelog.on_offsets_committed = None


def _starts(
    partitions: Sequence[KafkaTopicPartition],
    resume: Mapping[TopicPartition, int | None],
    committed_known: bool,
) -> list[dict[str, object]]:
    """Where each assigned partition starts, for the log: plain values, no -1001 markers.

    ``from``: ``watermark`` (the store's, past the group's commit), ``committed`` (the
    group's commit), or ``auto.offset.reset`` (no commit: kafka.auto_offset_reset).
    """
    starts: list[dict[str, object]] = []
    for p in partitions:
        offset = plain_offset(p.offset)
        if offset is None:
            origin = "auto.offset.reset" if committed_known else "committed"
        elif resume.get(TopicPartition(p.topic, p.partition)) == offset:
            origin = "watermark"
        else:
            origin = "committed"
        starts.append({"partition": f"{p.topic}[{p.partition}]", "offset": offset, "from": origin})
    return starts
