"""The changelog: partition state that travels with the partition (the Kafka side).

Each source topic ``T`` of group ``G`` has a compacted topic (see
:func:`~dedupe_consumer.store.changelog_codec.changelog_topic` for its name, and
that module for its records) with the same partition count. Before a
batch's decisions reach the local store they are produced there in one Kafka
transaction that also commits the source offsets (``send_offsets_to_transaction``
with the group metadata of the batch's poll, as Kafka Streams' exactly-once v2
does): a zombie owner with a stale group generation is fenced by the broker and
its whole transaction aborted. Whichever instance is assigned the partition
next restores from it before deciding anything.

The topic is ``cleanup.policy=compact`` only: staged effects are state and must
never expire by time. Expired event IDs leave it by tombstones that the owner's
retention sweep writes through the normal persist path.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta

import structlog
from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, not in __all__
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    OffsetSpec,
    ResourceType,
)
from confluent_kafka.cimpl import NewPartitions, NewTopic  # admin re-exports it without __all__

from dedupe_consumer.config import KafkaConnection
from dedupe_consumer.errors import NotAuthorizedError, NotOwnerError, StoreError
from dedupe_consumer.kafka.logs import kafka_error_fields, kafka_log_config
from dedupe_consumer.kafka.permissions import AUTHORIZATION_FAILED, transaction_refused
from dedupe_consumer.kafka.producing import produce_waiting
from dedupe_consumer.kafka.replication import replication_factor, warn_if_under_replicated
from dedupe_consumer.librdkafka import DURABLE_PRODUCER
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store.base import Output, ProcessedStore, WriteSet
from dedupe_consumer.store.changelog_codec import (
    DECISION_PREFIX,
    RestoredState,
    changelog_records,
    changelog_topic,
    decision_key,
    legacy_changelog_topic,
)

log = structlog.get_logger("dedupe_consumer.changelog")

_RESTORE_CHUNK = 100_000
"""Records held in memory during a restore before they are applied to the store."""

_RESTORE_BATCH = 10_000
"""Messages per ``consume()`` call of the restore consumer."""

_RESTORE_FETCH_BYTES = 16 * 1024 * 1024
_RESTORE_FETCH: dict[str, str | int | float | bool] = {
    "max.partition.fetch.bytes": 8 * 1024 * 1024,
    "queued.max.messages.kbytes": 32 * 1024,
    "fetch.wait.max.ms": 100,
}
"""Larger fetches than librdkafka's 1 MB per partition (a restore reads one partition as
fast as it can) and a smaller prefetch queue than its 64 MB, which bounds the memory.
``fetch.max.bytes`` is set with them by :meth:`Changelog._restore_fetch`."""

_OPEN_TRANSACTION_MARGIN_S = 30.0
"""How much longer than ``transaction.timeout.ms`` a restore waits for an open transaction."""

_NOT_OWNER = {
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.FENCED_INSTANCE_ID,
    KafkaError.FENCED_MEMBER_EPOCH,
    KafkaError.STALE_MEMBER_EPOCH,
    KafkaError.REBALANCE_IN_PROGRESS,
}
"""Offset-commit errors inside the transaction: the group has moved on without us."""

_STALE_GENERATION = {KafkaError.ILLEGAL_GENERATION, KafkaError.STALE_MEMBER_EPOCH}
"""A member whose generation moved on: after a cooperative rebalance it may still own all."""

_PRODUCER_FENCED = {
    KafkaError._FENCED,
    KafkaError.PRODUCER_FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH,
}


def _generation(metadata: object) -> int:
    """The generation in librdkafka's serialized group metadata (``CGMDv2:`` + int32).

    -1 means "not a member": the broker accepts a transactional offset commit
    without a generation, so such a commit would not fence anything.
    Anything unreadable counts as a member (the broker still checks the rest).
    """
    if isinstance(metadata, bytes) and metadata.startswith(b"CGMDv2:") and len(metadata) >= 11:
        return int.from_bytes(metadata[7:11], sys.byteorder, signed=True)
    return 0


_HANG_MARGIN_S = 10.0
"""How long past its own timeout a producer call may block before it counts as stuck."""


class RestoreCancelled(Exception):
    """A restore was stopped before its end (the partition went, or the consumer stops)."""


class _ProducerStuck(Exception):
    """Internal: a producer call did not return long after its timeout (see _send_offsets)."""


_OUTPUT_TOPIC_TTL_S = 5.0
"""How long what was read about an output topic is trusted."""


class Changelog:
    """Writes each batch's decisions to Kafka and restores a partition's state from it."""

    def __init__(
        self,
        connection: KafkaConnection,
        group_id: str,
        retention: timedelta,
        transactional_id: str,
        producer_config: Mapping[str, str | int | float | bool] | None = None,
        timeout_s: float = 30.0,
        startup_timeout_s: float = 300.0,
        store_path: str = "",
    ) -> None:
        self.connection = connection
        self.group_id = group_id
        self.retention = retention
        self.timeout_s = timeout_s
        self.transactional_id = transactional_id
        self.store_path = store_path
        self.group_metadata: Callable[[], object | None] | None = None
        """Where the group metadata of the batch in hand comes from (the Kafka source).

        When it gives one, each transaction also commits the source offsets, so the
        broker rejects (fences) a write by an instance that has left the group."""
        self.live_group_metadata: Callable[[], object | None] | None = None
        """The group metadata now (not at the poll): for one retry after a rebalance."""
        self.on_offsets_committed: Callable[[Mapping[TopicPartition, int]], None] | None = None
        """Told the offsets that a transaction committed (so the source does not repeat them)."""
        conf = self.connection.config("producer", {"linger.ms": 1})
        conf.update(producer_config or {})
        conf.update(DURABLE_PRODUCER)  # what a transactional producer needs anyway, said
        # One transaction per batch: a crash mid-batch leaves nothing visible. The id is
        # stable per store, so a restarted instance fences and aborts its own leftovers.
        conf["transactional.id"] = transactional_id
        self.transaction_timeout_s = int(conf.get("transaction.timeout.ms", 60_000)) / 1000
        self._producer_conf = conf
        self._startup_timeout_s = startup_timeout_s
        self._abandoned: list[Producer] = []
        """Producers stuck inside a librdkafka call: kept referenced while their thread runs."""
        self._producer = self._start_producer()
        self._admin = AdminClient({**self.connection.config("admin"), **kafka_log_config()})
        self._ensured: set[str] = set()
        self._outputs: dict[str, tuple[int | None, float]] = {}
        """Output topics of ``event.emit``: their limit (see :meth:`output_limit`), and
        when it was read (monotonic seconds)."""
        self._sources: dict[str, str] = {}
        """Changelog topic name → source topic (never parsed back out of the name)."""
        self._topics: dict[str, str] = {}
        """Source topic → changelog topic name (a hash of the group and topic names)."""
        self.epochs: dict[TopicPartition, bytes] = {}
        """Each partition's offset epoch (set on assignment), announced once per epoch."""
        self._announced: dict[TopicPartition, bytes] = {}
        self._resets: set[TopicPartition] = set()
        self._delivered: dict[TopicPartition, tuple[int, int]] = {}
        self._errors: list[str] = []
        self._fatal: KafkaError | None = None
        self._intact: set[TopicPartition] = set()
        """Partitions restored by this instance and not fenced since: nobody else wrote."""

    def _start_producer(self) -> Producer:
        """A transactional producer, initialised: this fences (and aborts the open
        transaction of) any earlier producer with our transactional.id."""
        producer = Producer({**self._producer_conf, **kafka_log_config()})
        deadline = time.monotonic() + self._startup_timeout_s
        while True:  # the broker may not be up yet (a pod starting before Kafka): wait
            try:
                producer.init_transactions(self.timeout_s)
                return producer
            except KafkaException as exc:
                if exc.args[0].code() in AUTHORIZATION_FAILED:  # an ACL is missing: say which
                    raise transaction_refused(
                        exc.args[0], self.connection, self.transactional_id, self.group_id
                    ) from None
                if exc.args[0].fatal() or time.monotonic() > deadline:
                    raise StoreError(
                        f"cannot start the changelog producer (transactional.id "
                        f"{self.transactional_id!r}): {exc}; the broker must be reachable and "
                        "support transactions (transaction.state.log.* set for its size), or "
                        "set store.changelog = false for a single-instance consumer"
                    ) from exc
                log.warning("changelog_waiting_for_broker", error=str(exc))
                time.sleep(1.0)

    def _send_offsets(self, offsets: list[KafkaTopicPartition], metadata: object) -> None:
        """``send_offsets_to_transaction`` with a timeout that holds.

        librdkafka can block in this call past its timeout, for good, when the group
        coordinator went away and came back (librdkafka issues 5456 and 5511: a
        coordinator request's timeout is never checked). The call runs on a helper
        thread; if it has not returned well after its timeout, the producer is given
        up (kept referenced, never closed, while its thread is blocked) and
        :class:`_ProducerStuck` is raised: the caller starts a new producer, whose
        ``init_transactions`` fences the stuck one and aborts its transaction.
        """
        outcome: list[BaseException | None] = []
        producer = self._producer  # this one, even if it is replaced while the thread starts

        def call() -> None:
            try:
                producer.send_offsets_to_transaction(offsets, metadata, self.timeout_s)
                outcome.append(None)
            except BaseException as exc:  # handed to the caller's thread
                outcome.append(exc)

        worker = threading.Thread(target=call, name="changelog-send-offsets", daemon=True)
        worker.start()
        worker.join(self.timeout_s + _HANG_MARGIN_S)
        if not outcome:
            raise _ProducerStuck
        if outcome[0] is not None:
            raise outcome[0]

    def _replace_stuck_producer(self) -> None:
        log.error(
            "changelog_producer_stuck",
            call="send_offsets_to_transaction",
            waited_s=self.timeout_s + _HANG_MARGIN_S,
            action="starting a new transactional producer; it fences the stuck one and aborts "
            "its transaction, then the batch is written again",
            see="librdkafka issues 5456 and 5511",
        )
        self._abandoned.append(self._producer)
        self._producer = self._start_producer()

    def topic(self, source_topic: str) -> str:
        name = self._topics.get(source_topic)
        if name is None:  # hashed once per topic, not once per record
            name = self._topics[source_topic] = changelog_topic(self.group_id, source_topic)
            self._sources[name] = source_topic
        return name

    def position_key(self, tp: TopicPartition) -> TopicPartition:
        """Where the store keeps this partition's changelog position.

        Keyed by the changelog topic's name, not the source's: a position read
        in another changelog topic (the pre-0.2 name) must not be applied to this one.
        """
        return TopicPartition(self.topic(tp.topic), tp.partition)

    # -- topics ----------------------------------------------------------------------------

    def ensure_topics(self, topics: Iterable[str]) -> None:
        """Create missing changelog topics (compacted only), one per source topic.

        An existing one whose ``cleanup.policy`` includes ``delete`` (made by an
        older version) is altered to ``compact``: time-based deletion would also
        drop staged effects, which are state.
        """
        todo = {self.topic(t): t for t in topics if self.topic(t) not in self._ensured}
        if not todo:
            return
        admin = self._admin
        metadata = admin.list_topics(timeout=self.timeout_s)
        missing: dict[str, int] = {}
        grow: dict[str, int] = {}
        existing_names: list[str] = []
        for name, topic in todo.items():
            source = metadata.topics.get(topic)
            if source is None or source.error is not None:
                raise StoreError(f"source topic {topic!r} is not known to the cluster")
            legacy = legacy_changelog_topic(self.group_id, topic)
            if legacy in metadata.topics:
                log.warning(
                    "changelog_legacy_topic",
                    legacy_topic=legacy,
                    changelog_topic=name,
                    source_topic=topic,
                    consequence=f"{legacy!r} is no longer read: state restores from {name!r}, "
                    "which starts empty; a partition that moves to an instance without its "
                    "local store loses its remembered IDs and staged effects",
                    fix="upgrade with every partition staying on its current instance until "
                    "the new topic has caught up, or copy the legacy topic into the new one; "
                    "then delete the legacy topic (it may belong to another group whose "
                    "name collided before 0.2: check before deleting)",
                )
            existing = metadata.topics.get(name)
            if existing is None:
                missing[name] = len(source.partitions)
                continue
            existing_names.append(name)
            warn_if_under_replicated(metadata, name, "store.changelog")
            if len(existing.partitions) < len(source.partitions):
                grow[name] = len(source.partitions)  # the source topic gained partitions
        if grow:
            grown = admin.create_partitions(
                [NewPartitions(name, n) for name, n in grow.items()],
                operation_timeout=self.timeout_s,
            )
            for name, future in grown.items():
                try:
                    future.result()
                except KafkaException as exc:
                    raise StoreError(
                        f"cannot add partitions to changelog topic {name!r}: {exc}"
                    ) from exc
        if existing_names:
            self._compact_only(existing_names)
        if missing:
            futures = admin.create_topics(
                [
                    NewTopic(
                        name,
                        n,
                        replication_factor=replication_factor(metadata),
                        config={"cleanup.policy": "compact"},
                    )
                    for name, n in missing.items()
                ],
                operation_timeout=self.timeout_s,
            )
            for name, future in futures.items():
                try:
                    future.result()
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise StoreError(f"cannot create changelog topic {name!r}: {exc}") from exc
                    self._compact_only([name])  # made concurrently, maybe by an old version
        self._ensured.update(todo)

    def _compact_only(self, names: list[str]) -> None:
        """Alter changelog topics whose cleanup.policy deletes by time to ``compact``."""
        resources = [ConfigResource(ResourceType.TOPIC, name) for name in names]
        wrong: dict[str, str] = {}
        for resource, future in self._admin.describe_configs(resources).items():
            try:
                entries = future.result()
            except KafkaException as exc:
                raise StoreError(
                    f"cannot read the config of changelog topic {resource.name!r}: {exc}; "
                    "the consumer needs DescribeConfigs on its changelog topics"
                ) from exc
            entry = entries.get("cleanup.policy")
            policy = "" if entry is None or entry.value is None else str(entry.value)
            if "delete" in policy.split(","):
                wrong[resource.name] = policy
        if not wrong:
            return
        alter = [
            ConfigResource(
                ResourceType.TOPIC,
                name,
                incremental_configs=[
                    ConfigEntry(
                        "cleanup.policy",
                        "compact",
                        incremental_operation=AlterConfigOpType.SET,
                    )
                ],
            )
            for name in wrong
        ]
        for resource, future in self._admin.incremental_alter_configs(alter).items():
            try:
                future.result()
            except KafkaException as exc:
                raise StoreError(
                    f"changelog topic {resource.name!r} has cleanup.policy="
                    f"{wrong[resource.name]!r}, which deletes staged effects by time, and "
                    f"cannot be altered: {exc}; grant the consumer AlterConfigs on it or run "
                    f"kafka-configs --alter --entity-type topics --entity-name "
                    f"{resource.name} --add-config cleanup.policy=compact"
                ) from exc
            log.warning(
                "changelog_config_updated",
                topic=resource.name,
                old={"cleanup.policy": wrong[resource.name]},
                new={"cleanup.policy": "compact"},
                reason="staged effects are state and must never expire by time; expired "
                "IDs now leave the changelog by tombstones",
            )

    # -- writing ---------------------------------------------------------------------------

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._errors.append(str(error))
            return
        source = TopicPartition(self._sources[message.topic() or ""], message.partition() or 0)
        offset = message.offset() or 0
        low, high = self._delivered.get(source, (offset, offset))
        self._delivered[source] = (min(low, offset), max(high, offset))

    def write(
        self,
        write: WriteSet,
        store: ProcessedStore | None = None,
        offsets: Mapping[TopicPartition, int] | None = None,
        *,
        live: bool = False,
    ) -> dict[TopicPartition, int]:
        """Produce ``write`` in one transaction; commit ``offsets`` in it when a group is known.

        The group metadata is the one of the batch's poll, or the current one with
        ``live`` (a batch persisted from the assign callback).

        Sets ``write.changelog_positions`` where ``store`` may advance. Returns
        the source offsets the transaction committed (empty without group
        metadata). Raises :class:`NotOwnerError` when the group fenced the
        transaction (it is aborted), :class:`NotAuthorizedError` when the brokers
        refused it a right (an ACL removed while running), and :class:`StoreError`
        otherwise.
        """
        source = self.live_group_metadata if live else self.group_metadata
        metadata = source() if source is not None else None
        if metadata is not None and _generation(metadata) < 0:
            # Out of the group already (librdkafka resets the generation when it learns
            # so): a commit without a generation would not be fenced. Write nothing.
            raise NotOwnerError(
                "this instance is not a member of the group (no generation) while it "
                "decided the batch: nothing of the batch was persisted"
            )
        committed = dict(offsets or {}) if metadata is not None else {}
        announce = {
            tp: epoch
            for tp in write.partitions()
            if (epoch := self.epochs.get(tp)) is not None and self._announced.get(tp) != epoch
        }
        try:
            try:
                self._transaction(write, committed, metadata, announce)
            except _ProducerStuck:
                self._replace_stuck_producer()
                self._transaction(write, committed, metadata, announce)
        except _ProducerStuck:
            self._replace_stuck_producer()
            raise StoreError(
                "the changelog producer stuck twice in send_offsets_to_transaction; the batch "
                "is not persisted or committed and will be redelivered"
            ) from None
        except KafkaException as exc:
            fresh = self.live_group_metadata() if self.live_group_metadata is not None else None
            if (
                exc.args[0].code() not in _STALE_GENERATION
                or exc.args[0].fatal()
                or fresh is None
                or _generation(fresh) < 0
                or fresh == metadata
            ):
                raise self._failed(exc, write) from exc
            # Still a member, in a newer generation: a cooperative (or KIP-848) rebalance
            # went by during the batch, and our partitions can only leave after we
            # revoke them. Try once more in the generation we are in now.
            self._abort()
            log.info("changelog_generation_moved", error=str(exc.args[0]))
            try:
                self._transaction(write, committed, fresh, announce)
            except KafkaException as again:
                raise self._failed(again, write) from again
            except _ProducerStuck:
                self._replace_stuck_producer()
                raise StoreError(
                    "the changelog producer stuck in send_offsets_to_transaction; the batch "
                    "is not persisted or committed and will be redelivered"
                ) from None
        if self._errors:
            raise StoreError(f"changelog delivery failed: {self._errors[:3]}")
        self._announced.update(announce)
        self._resets -= announce.keys()
        if store is not None:
            self._advance_positions(write, store)
        if committed and self.on_offsets_committed is not None:
            self.on_offsets_committed(committed)
        return committed

    def _advance_positions(self, write: WriteSet, store: ProcessedStore) -> None:
        for tp, (first, last) in self._delivered.items():
            # Advance only when our write directly follows what we applied (a
            # transaction marker may sit in between); otherwise the next restore
            # re-reads from the old position, which is idempotent.
            where = self.position_key(tp)
            position = store.changelog_position(where)
            if tp in self._intact or position is None or position <= first <= position + 1:
                # Intact since its restore: only we can have committed here (every write
                # of ours is fenced by the group), so what lies between the position and
                # our write is our own aborted attempts.
                write.changelog_positions[where] = last + 2  # after our commit marker

    def _transaction(
        self,
        write: WriteSet,
        committed: Mapping[TopicPartition, int],
        metadata: object,
        announce: Mapping[TopicPartition, bytes],
    ) -> None:
        self._producer.poll(0)  # reports of an aborted attempt land before the reset
        self._delivered = {}
        self._errors = []
        self._producer.begin_transaction()
        records = list(changelog_records(write, announce, self._resets))
        # Delivery reports only for each partition's first and last record: they bound
        # the positions; a record that fails makes commit_transaction fail anyway.
        first: dict[TopicPartition, int] = {}
        last: dict[TopicPartition, int] = {}
        for i, (tp, _, _) in enumerate(records):
            first.setdefault(tp, i)
            last[tp] = i
        reported_at = {*first.values(), *last.values()}
        for i, (tp, key, value) in enumerate(records):
            self._send(tp, key, value, report=i in reported_at)
        try:
            for outputs in write.outputs.values():  # event.emit: in the same transaction
                for output in outputs:
                    self._emit(output)
        except (TypeError, ValueError) as refused:  # emit checks first; never half-sent
            self._abort()
            raise StoreError(f"an emitted message was refused by the producer: {refused}") from None
        if committed:
            # The broker checks the group generation of this commit: a zombie whose
            # partitions moved fails here, and its records above are aborted with it.
            self._send_offsets(
                [KafkaTopicPartition(tp.topic, tp.partition, o) for tp, o in committed.items()],
                metadata,
            )
        self._producer.commit_transaction(self.timeout_s)

    def _failed(self, exc: KafkaException, write: WriteSet) -> StoreError | NotAuthorizedError:
        error: KafkaError = exc.args[0]
        if error.code() in AUTHORIZATION_FAILED:  # a right taken away while running: say which
            if error.fatal():
                self._fatal = error
            else:
                self._abort()
            topics = {self.topic(tp.topic) for tp in write.partitions()}
            topics.update(o.topic for outputs in write.outputs.values() for o in outputs)
            return transaction_refused(
                error, self.connection, self.transactional_id, self.group_id, sorted(topics)
            )
        if error.fatal():
            self._fatal = error
            # The producer is unusable. Only another producer with our transactional.id
            # fences it: a second live instance with this store's instance id.
            if error.code() in _PRODUCER_FENCED:
                return StoreError(
                    f"the changelog producer was fenced ({error}): another process started "
                    f"with transactional.id {self.transactional_id!r}. Either the store "
                    f"directory {self.store_path!r} was cloned (a volume snapshot or copy), so "
                    "two instances share its instance id, or an older process of this "
                    "instance is still alive. Give each instance its own store: delete the "
                    "cloned store directory (its state is restored from the changelog) or "
                    "stop the other process. This instance stops; nothing of this batch was "
                    "persisted"
                )
            return StoreError(
                f"the changelog producer failed fatally ({error}); this instance stops and "
                "nothing of this batch was persisted; restart it"
            )
        self._abort()
        if error.code() in _NOT_OWNER:
            self._intact.difference_update(write.partitions())
            return NotOwnerError(
                f"the group fenced the changelog transaction ({error}): this instance is no "
                "longer the owner of "
                f"{sorted(str(tp) for tp in write.partitions()) or 'its partitions'}; "
                "the transaction was aborted and nothing of the batch was persisted"
            )
        return StoreError(
            f"changelog transaction failed: {exc}; the batch is not persisted or committed "
            "and will be redelivered"
        )

    def reset_epoch(
        self, tp: TopicPartition, epoch: bytes, store: ProcessedStore | None = None
    ) -> None:
        """Start ``tp``'s watermark over in a new epoch: a restore then drops the old one."""
        self.epochs[tp] = epoch
        self._resets.add(tp)
        # The -1 watermark supersedes the old one under compaction, which may keep only a
        # later announcement of the same epoch (flagged adopt) and not this reset.
        write = WriteSet(watermarks={tp: -1})
        self.write(write, store)
        if store is not None and write.changelog_positions:
            store.persist(WriteSet(changelog_positions=write.changelog_positions))

    def _abort(self) -> None:
        try:
            self._producer.abort_transaction(self.timeout_s)
        except KafkaException as exc:
            log.error("changelog_abort_failed", error=str(exc))

    def _emit(self, output: Output) -> None:
        produce_waiting(
            self._producer,
            output.topic,
            key=output.key,
            value=output.value,
            headers=list(output.headers),
        )

    def output_limit(self, topic: str, *, create: bool = False) -> int | None:
        """``topic``'s ``max.message.bytes`` (0: not known), None when it does not exist;
        for ``event.emit``: an output the broker would refuse (a missing topic, a record
        too large) would fail the batch's transaction, so the attempt fails instead.
        Asked again at most every 5 s per topic (a topic deleted since is noticed).
        ``create``: a missing topic is created first (the broker's default partitions
        and replication; ``processing.create_output_topics``)."""
        now = time.monotonic()
        known = self._outputs.get(topic)
        fresh = known is not None and now - known[1] < _OUTPUT_TOPIC_TTL_S
        if known is not None and fresh and (known[0] is not None or not create):
            return known[0]
        limit = self._output_limit(topic, now)
        if limit is None and create:
            self._create_output_topic(topic)
            limit = self._output_limit(topic, time.monotonic())
        return limit

    def _create_output_topic(self, topic: str) -> None:
        try:
            replicas = replication_factor(self._admin.list_topics(timeout=self.timeout_s))
        except KafkaException:
            replicas = -1  # CreateTopics will say what is wrong
        future = self._admin.create_topics(
            [NewTopic(topic, num_partitions=-1, replication_factor=replicas)],
            request_timeout=self.timeout_s,
        )[topic]
        try:
            future.result(timeout=self.timeout_s + 5)
        except KafkaException as exc:
            error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if error is None or error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                log.warning("output_topic_not_created", topic=topic, **kafka_error_fields(exc))
                return
        else:
            log.info(
                "output_topic_created",
                topic=topic,
                setting="processing.create_output_topics",
                partitions="broker default",
                replication_factor=replicas if replicas > 0 else "broker default",
            )
        # A created topic's metadata reaches every broker moments later: wait for it.
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(KafkaException):
                # Not list_topics(topic): asking for one topic may create it with defaults.
                found = self._admin.list_topics(timeout=self.timeout_s).topics.get(topic)
                if found is not None and found.error is None and found.partitions:
                    return
            time.sleep(0.1)

    def _output_limit(self, topic: str, now: float) -> int | None:
        known = self._outputs.get(topic)
        try:
            found = self._admin.list_topics(timeout=self.timeout_s).topics.get(topic)
        except KafkaException:  # unknown now: what was known, or let the transaction tell
            return known[0] if known is not None else 0
        limit: int | None = None
        if found is not None and found.error is None:
            limit = self._max_message_bytes(topic)
        self._outputs[topic] = (limit, now)
        return limit

    def _max_message_bytes(self, topic: str) -> int:
        resource = ConfigResource(ResourceType.TOPIC, topic)
        try:
            configs = self._admin.describe_configs([resource])[resource].result(self.timeout_s)
            return int(configs["max.message.bytes"].value)
        except (KafkaException, KeyError, ValueError, TypeError):
            return 0  # not allowed to read it: the transaction tells

    def _send(
        self, tp: TopicPartition, key: bytes, value: bytes | None, *, report: bool = True
    ) -> None:
        # Not produce_waiting: one call per changelog record, the hot path of a persist.
        while True:
            try:
                if report:
                    self._producer.produce(
                        self.topic(tp.topic),
                        key=key,
                        value=value,
                        partition=tp.partition,
                        on_delivery=self._on_delivery,
                    )
                else:
                    self._producer.produce(
                        self.topic(tp.topic), key=key, value=value, partition=tp.partition
                    )
                return
            except BufferError:  # local queue full on a huge batch: drain and go on
                self._producer.poll(0.1)

    # -- restoring -------------------------------------------------------------------------

    def restore(
        self,
        tp: TopicPartition,
        store: ProcessedStore,
        *,
        stopping: Callable[[], bool] | None = None,
    ) -> int:
        """Apply committed changelog records of ``tp`` from the stored position to the end.

        Reads with ``isolation.level=read_committed``. librdkafka's partition EOF
        is then the last stable offset: below the high watermark while a previous
        owner's transaction is still open. The restore waits for that transaction
        to be committed or aborted (at most ``transaction.timeout.ms`` and a
        margin), so it never stops silently before records that are about to
        become visible. A batch whose transaction was aborted stays invisible, so a
        decision is never restored without its effects and watermark. The next
        offset is stored as the partition's changelog position. Returns the
        number of committed records read (0: nobody wrote since this store's last write).

        ``stopping`` is asked before the first read and then at every read (at most a
        second apart) and before every write: when it turns true,
        :class:`RestoreCancelled` is raised. What was applied stays, each chunk with
        its position, and the next restore reads on from it or rebuilds.
        """
        name = self.topic(tp.topic)
        key = self.position_key(tp)
        # A store without this partition's watermark has no state of it to build on (never
        # seen, or dropped after a revocation): read the changelog from its start.
        start = store.changelog_position(key) if store.watermark(tp) is not None else None
        consumer = Consumer(
            {
                **self.connection.config("consumer"),
                **kafka_log_config(),
                "group.id": f"{self.group_id}.restore.{uuid.uuid4()}",  # never used to commit
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "isolation.level": "read_committed",
                **self._restore_fetch(),
            }
        )
        try:
            ktp = KafkaTopicPartition(name, tp.partition)
            low = self._low(consumer, ktp)
            high = self._high(ktp)
            if stopping is not None and stopping():  # the reads above may have waited
                raise RestoreCancelled(f"restore of {tp} stopped before it read")
            if start is None and high > low and tp in store.partitions():
                # Partial local state without a watermark (a drop cut short): start over.
                self._restart_log(tp, name, start, high, "local state without a watermark")
                store.drop_partition(tp, key)
            if start is not None and start > high:
                log.warning(
                    "changelog_position_beyond_end",
                    partition=str(tp),
                    changelog_topic=name,
                    position=start,
                    end=high,
                    consequence="the changelog topic was recreated: restoring it from the start",
                )
                start = None
            begin = low if start is None else max(low, start)
            pending = RestoredState(tp, key, store.epoch(tp))
            if begin >= high:
                pending.apply(store, begin)  # an empty partition: remember where it starts
                self._intact.add(tp)
                return 0
            consumer.assign([KafkaTopicPartition(name, tp.partition, begin)])
            incremental = start is not None
            read = 0
            position = begin
            end: int | None = None
            stalled_after = time.monotonic() + self.timeout_s
            open_since: float | None = None
            while end is None:
                if stopping is not None and stopping():
                    raise RestoreCancelled(f"restore of {tp} stopped at offset {position}")
                now = time.monotonic()
                if open_since is None and now > stalled_after:
                    raise StoreError(
                        f"changelog restore of {tp} from {name!r} stalled (read from {begin} "
                        f"to {position}, end {high}): no record for {self.timeout_s:.0f}s"
                    )
                if open_since is not None and now > open_since + self._open_wait_s:
                    raise StoreError(
                        f"changelog restore of {tp} from {name!r}: a transaction of a previous "
                        f"owner is still open at offset {position} (end {high}) after "
                        f"{self._open_wait_s:.0f}s; the previous owner may be hung. Stop it, "
                        "or wait for its transaction.timeout.ms to pass, then restart"
                    )
                messages = consumer.consume(_RESTORE_BATCH, 1.0)
                decisions = pending.decisions
                last: Message | None = None
                for m in messages:  # the hot loop: millions of records, keep it lean
                    error = m.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            continue
                        stable = m.offset() or 0
                        high = self._high(ktp)
                        if stable >= high:
                            end = stable
                        elif open_since is None:
                            open_since = time.monotonic()
                            log.warning(
                                "changelog_open_transaction",
                                partition=str(tp),
                                changelog_topic=name,
                                last_stable_offset=stable,
                                end=high,
                                waiting_s=self._open_wait_s,
                                reason="a previous owner's transaction is not committed or "
                                "aborted yet; waiting for it before deciding anything",
                            )
                        continue
                    if incremental:
                        # A committed record past our position: another owner wrote since
                        # this store's copy. Reading on would build on a stale copy:
                        # compaction may have removed the tombstones, deletions and the
                        # reset record in between, so a deleted effect and an old watermark
                        # would survive. Rebuild from the start instead. (Our own aborted
                        # transactions leave no committed record: no rebuild for those.)
                        self._restart_log(tp, name, start, high, "written by another owner")
                        store.drop_partition(tp, key)
                        incremental = False
                        begin = position = low
                        pending = RestoredState(tp, key, None)
                        consumer.assign([KafkaTopicPartition(name, tp.partition, low)])
                        last = None
                        break
                    last = m
                    record_key = m.key() or b""
                    if record_key[:2] == DECISION_PREFIX:  # nearly all: kept as bytes
                        decisions.append((record_key[2:], m.value()))
                    else:
                        pending.add(record_key, m.value())
                    read += 1
                if last is not None:
                    stalled_after = time.monotonic() + self.timeout_s
                    position = (last.offset() or 0) + 1
                if stopping is not None and stopping():
                    raise RestoreCancelled(f"restore of {tp} stopped at offset {position}")
                if len(pending) >= _RESTORE_CHUNK and end is None:
                    # Bounded memory: apply what was read so far, with the position after
                    # it, in one atomic but unsynced write; the last apply syncs. A crash
                    # keeps a prefix of these chunks, each with its position, and the
                    # next restore reads on (or rebuilds): see ProcessedStore.apply_restored.
                    pending.apply(store, position, sync=False)
            pending.apply(store, end)
            log.info(
                "changelog_restored",
                partition=str(tp),
                records=read,
                changelog_offsets=(begin, end),
            )
            self._intact.add(tp)
            return read
        finally:
            consumer.close()

    def _restore_fetch(self) -> dict[str, str | int | float | bool]:
        """The restore consumer's fetch settings. ``fetch.max.bytes`` must be at least the
        connection's ``message.max.bytes`` (librdkafka refuses the consumer otherwise), and
        ``receive.message.max.bytes`` above it, unless the user set them."""
        given = self.connection.config("consumer")
        message_max = int(given.get("message.max.bytes", 1_000_000))
        fetch_max = int(given.get("fetch.max.bytes", max(_RESTORE_FETCH_BYTES, message_max)))
        settings: dict[str, str | int | float | bool] = {
            **_RESTORE_FETCH,
            "fetch.max.bytes": fetch_max,
        }
        if "receive.message.max.bytes" not in given:
            settings["receive.message.max.bytes"] = max(100_000_000, fetch_max + 512)
        return settings

    @staticmethod
    def _restart_log(
        tp: TopicPartition, name: str, position: int | None, end: int, reason: str
    ) -> None:
        log.info(
            "changelog_restore_from_start",
            partition=str(tp),
            changelog_topic=name,
            position=position,
            end=end,
            reason=reason,
        )

    @property
    def _open_wait_s(self) -> float:
        return self.transaction_timeout_s + _OPEN_TRANSACTION_MARGIN_S

    def _low(self, consumer: Consumer, ktp: KafkaTopicPartition) -> int:
        """The low offset, waiting out a fresh topic's leader election."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                low, _ = consumer.get_watermark_offsets(ktp, timeout=self.timeout_s)
                if int(low) >= 0:
                    return int(low)
                failure: object = f"no offset (answered {low})"
            except KafkaException as exc:
                failure = exc
            # A leader moving (a broker fault) can answer without an offset: never taken
            # for an empty log, which would skip the restore. Asked again until the end.
            if time.monotonic() > deadline:
                raise StoreError(
                    f"cannot read changelog offsets of {ktp.topic}[{ktp.partition}]: {failure}"
                )
            time.sleep(0.2)

    def _high(self, ktp: KafkaTopicPartition) -> int:
        """The high watermark, open transactions included.

        A read_committed consumer's watermark query answers the last stable
        offset instead, which is exactly what must not be mistaken for the end.
        """
        request = {KafkaTopicPartition(ktp.topic, ktp.partition): OffsetSpec.latest()}  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + self.timeout_s
        while True:
            futures = self._admin.list_offsets(
                request,
                isolation_level=IsolationLevel.READ_UNCOMMITTED,
                request_timeout=self.timeout_s,
            )
            try:
                offset = int(next(iter(futures.values())).result().offset)
                if offset >= 0:
                    return offset
                failure: object = f"no offset (answered {offset})"
            except KafkaException as exc:
                failure = exc
            # A leader moving (a broker fault) can answer -1001: never taken for an end
            # (the restore would find its position "beyond the end" and start over).
            if time.monotonic() > deadline:
                raise StoreError(
                    f"cannot read changelog offsets of {ktp.topic}[{ktp.partition}]: {failure}"
                )
            time.sleep(0.2)
            # New partitions: the admin client's metadata cache may not know them yet.
            with contextlib.suppress(KafkaException):
                self._admin.list_topics(ktp.topic, timeout=self.timeout_s)

    def close(self) -> None:
        if self._fatal is None:  # a fenced producer has nothing left to deliver
            self._producer.flush(self.timeout_s)


def forget_in_changelog(
    connection: KafkaConnection,
    group_id: str,
    tp: TopicPartition,
    event_ids: Sequence[str],
    timeout_s: float = 30.0,
) -> str:
    """Delete ``event_ids``' records from ``tp``'s changelog partition (tombstones), so a
    restore does not bring them back; returns the changelog topic. Raises
    :class:`StoreError` when the topic does not exist or a tombstone is not delivered."""
    topic = changelog_topic(group_id, tp.topic)
    admin = AdminClient(connection.config("admin", kafka_log_config()))
    try:
        found = admin.list_topics(timeout=timeout_s).topics.get(topic)
    except KafkaException as exc:
        raise StoreError(f"cannot reach the brokers to find {topic!r}: {exc}") from None
    if found is None or found.error is not None or tp.partition not in found.partitions:
        raise StoreError(
            f"changelog topic {topic!r} partition {tp.partition} does not exist: is the config "
            f"the consumer's (group_id {group_id!r}), with store.changelog = true?"
        )
    failures: list[str] = []

    def delivered(error: KafkaError | None, _message: object) -> None:
        if error is not None:
            failures.append(str(error))

    producer = Producer(
        connection.config("producer", {"enable.idempotence": True, **kafka_log_config()})
    )
    for event_id in event_ids:
        produce_waiting(
            producer,
            topic,
            key=decision_key(event_id),
            value=None,
            partition=tp.partition,
            on_delivery=delivered,
        )
    if producer.flush(timeout_s) or failures:
        raise StoreError(
            f"the tombstones to {topic!r} were not all delivered: {failures or 'timed out'}; "
            "nothing was deleted from the local store"
        )
    return topic
