"""Review of issue 14 (topic scope): defects shown against a real broker.

Each test states what should hold; each fails on the reviewed commit.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, not in __all__
    ConfigResource,
    ResourceType,
)

from dedupe_consumer import DedupeConsumer, Event, Handler
from dedupe_consumer.errors import ConfigError
from dedupe_consumer.kafka.repartition import Repartitioner, ensure_by_id_topics
from dedupe_consumer.models import BatchStats, header_pairs
from dedupe_consumer.scope import by_id_topic
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import admin, settings_for
from ..log_capture import captured_logs
from .test_topic_scope import Seen

pytestmark = pytest.mark.kafka


def run_for(
    consumer: DedupeConsumer, done: Callable[[BatchStats], bool], timeout_s: float
) -> BatchStats:
    """Run until ``done(totals)`` (then 2 s more, for late repeats) or the timeout."""
    deadline = time.monotonic() + timeout_s
    settled: list[float] = []

    def until(totals: BatchStats) -> bool:
        if time.monotonic() > deadline:
            return True
        if not done(totals):
            return False
        settled.append(time.monotonic())
        return settled[-1] - settled[0] > 2.0

    return consumer.run(until=until, install_signal_handlers=False)


def produce(
    bootstrap: str,
    topic: str,
    messages: list[
        tuple[int | None, bytes | None, bytes | None, list[tuple[str, str | bytes | None]]]
    ],
    timestamp: int | None = None,
) -> None:
    """(partition, key, value, headers) each, in order."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for partition, key, value, headers in messages:
        producer.produce(
            topic,
            key=key,
            value=value,
            headers=headers,
            partition=-1 if partition is None else partition,  # -1: the partitioner's
            timestamp=timestamp or 0,  # 0: now
        )
    assert producer.flush(30) == 0


def commit_source(bootstrap: str, group: str, topic: str, partitions: int) -> None:
    """The group committed offset 0 everywhere (it ran before, with nothing to read)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        consumer.commit(
            offsets=[KafkaTopicPartition(topic, p, 0) for p in range(partitions)],
            asynchronous=False,
        )
    finally:
        consumer.close()


def hop_once(settings, expected: int, timeout_s: float = 60.0) -> Repartitioner:  # type: ignore[no-untyped-def]
    """Run the hop alone until it moved ``expected`` messages, then stop it (what a
    process killed right after the hop's transaction leaves behind)."""
    counts = ensure_by_id_topics(settings)
    hop = Repartitioner(settings, counts, f"rev14-hop-{uuid.uuid4().hex[:8]}")
    hop.start()
    sample = hop.metrics.registry.get_sample_value
    deadline = time.monotonic() + timeout_s
    topic = settings.kafka.topics[0]
    while time.monotonic() < deadline:
        if (sample("dedupe_repartitioned_total", {"topic": topic}) or 0) >= expected:
            break
        time.sleep(0.1)
    hop.stop()
    hop.join(40)
    hop.raise_error()
    assert (sample("dedupe_repartitioned_total", {"topic": topic}) or 0) == expected
    return hop


# -- 1. the dedupe stage obeys kafka.auto_offset_reset = "latest" on the by-id topics -------


def test_rev14_stage_with_latest_reset_skips_messages_the_hop_already_moved(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """The hop commits a source offset only once the message is in the by-id topic:
    from then on the by-id topic is the only copy the group will read. The stage group
    (``<group>.by-id``) must therefore start at the beginning of the by-id topic when it
    has no commit; with ``auto_offset_reset = "latest"`` it starts at the end, and every
    message the hop moved before the stage's first commit (first start, a kill between
    the hop's transaction and the stage's first commit, a migration) is never handled."""
    topic = kafka_topic(partitions=2)
    settings = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "state",
        dedupe={"scope": "topic"},
        kafka={"auto_offset_reset": "latest"},
    )
    # The group ran before (partition scope, say) and committed offset 0.
    commit_source(kafka_bootstrap, settings.kafka.group_id, topic, 2)
    ids = [str(uuid.uuid4()) for _ in range(20)]
    produce(kafka_bootstrap, topic, [(i % 2, i_.encode(), b"{}", []) for i, i_ in enumerate(ids)])
    settings = settings.model_copy(
        update={"dedupe": settings.dedupe.model_copy(update={"id_source": "key"})}
    )
    # The hop moves all 20 and commits their source offsets; the process dies before
    # the dedupe stage committed anything.
    hop_once(settings, 20)
    handler = Seen()
    consumer = DedupeConsumer(handler, settings)
    run_for(consumer, lambda t: len(handler.ids()) >= 20, 30)
    assert sorted(handler.ids()) == sorted(ids), (
        f"{20 - len(handler.ids())} of 20 messages lost: the hop committed their source "
        "offsets, the stage started at the end of the by-id topic"
    )


# -- 2. dead letters name the by-id topic, not the message the user sent -----------------------


def test_rev14_dead_letter_names_the_source_message_not_the_by_id_copy(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """A dead letter's ``dlq.original.*`` headers say where to find the message that
    failed. With topic scope they name the by-id copy (an internal topic with a
    7-day retention), though the handler is told the source coordinates."""
    topic = kafka_topic(partitions=4)
    settings = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "state",
        dedupe={"scope": "topic", "id_source": "header:event-id"},
    )
    # No event-id header: dead-lettered (on_missing_id = "dead-letter", the default).
    produce(kafka_bootstrap, topic, [(3, b"k", b"no id here", [("trace", b"t1")])])
    produce(kafka_bootstrap, topic, [(3, b"k", b"no id here", [("trace", b"t2")])])
    consumer = DedupeConsumer(Seen(), settings)
    run_for(consumer, lambda t: t.dead_lettered >= 2, 60)
    reader = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"read-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
        }
    )
    reader.subscribe([settings.processing.dead_letter_topic])
    letters: list[dict[str, bytes | None]] = []
    deadline = time.monotonic() + 30
    while len(letters) < 2 and time.monotonic() < deadline:
        m = reader.poll(0.5)
        if m is not None and m.error() is None:
            letters.append(dict(header_pairs(m)))
    reader.close()
    assert len(letters) == 2
    second = letters[1]
    where = (
        (second["dlq.original.topic"] or b"").decode(),
        (second["dlq.original.partition"] or b"").decode(),
        (second["dlq.original.offset"] or b"").decode(),
    )
    assert where == (topic, "3", "1"), f"the dead letter points at {where}"


# -- 3. topic scope silently drops the ordering guarantee -------------------------------------


def test_rev14_topic_scope_refuses_partition_order_it_cannot_keep(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """``processing.ordering = "partition"`` promises strict offset order per partition;
    topic scope spreads one source partition over the by-id partitions by event ID, so
    the combination stops at load, naming both keys (it ran out of order before)."""
    topic = kafka_topic(partitions=1)
    with pytest.raises((ConfigError, ValueError), match=r"ordering = 'partition'.*scope"):
        settings_for(
            kafka_bootstrap,
            topic,
            tmp_path / "state",
            dedupe={"scope": "topic", "scope_partitions": 4, "id_source": "json:/id"},
            processing={"ordering": "partition", "concurrency": 1},
        )


# -- 4. the hop ignores a fatal consumer error and the consumer idles forever ------------------


def test_rev14_hop_stops_the_consumer_on_a_fatal_consumer_error(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """The partition-scope source raises on a fatal consumer error (KafkaSource.poll).
    The hop's ``_usable`` logs every error as a warning and goes on: after a fatal one
    (here: static membership fenced by a second member with the same
    ``group.instance.id``, as in a rolling deploy where the old pod lingers) its consumer
    can never fetch again, the thread stays alive, ``HoppedSource.poll`` sees nothing
    wrong, and the consumer idles while the source's lag grows."""
    topic = kafka_topic(partitions=1)
    instance = f"static-{uuid.uuid4().hex[:6]}"
    settings = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "state",
        dedupe={"scope": "topic", "id_source": "key"},
        kafka={"consumer": {"group.instance.id": instance}},
    )
    handler = Seen()
    consumer = DedupeConsumer(handler, settings)
    outcome: dict[str, object] = {}
    stop_at = time.monotonic() + 90
    second_sent = threading.Event()
    raised_or_handled = threading.Event()

    def until(totals: BatchStats) -> bool:
        if len(handler.ids()) >= 2:
            raised_or_handled.set()
            return True
        return time.monotonic() > stop_at

    def run() -> None:
        try:
            consumer.run(until=until, install_signal_handlers=False)
        except BaseException as exc:  # what we hope for: the hop's failure surfaces
            outcome["error"] = exc
            raised_or_handled.set()

    runner = threading.Thread(target=run)
    runner.start()
    produce(kafka_bootstrap, topic, [(0, b"first", b"1", [])])
    deadline = time.monotonic() + 60
    while len(handler.ids()) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert handler.ids() == ["first"]
    # A second member with the same static identity joins the hop's group.
    intruder = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": settings.kafka.group_id,
            "group.instance.id": instance,
            "session.timeout.ms": 6000,
        }
    )
    intruder.subscribe([topic])
    end = time.monotonic() + 8
    while time.monotonic() < end:
        intruder.poll(0.2)
    intruder.close()
    produce(kafka_bootstrap, topic, [(0, b"second", b"2", [])])
    second_sent.set()
    raised_or_handled.wait(45)
    stop_at = 0  # let the consumer stop if it still runs
    runner.join(60)
    assert "error" in outcome or handler.ids() == ["first", "second"], (
        "the hop's consumer was fenced: the consumer neither stopped with an error nor "
        "handled the next message"
    )


# -- 5. old timestamps: the by-id topic deletes what the hop just moved ------------------------


def test_rev14_messages_with_old_timestamps_survive_the_hop(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """A source message older than the by-id topic's retention (a topic kept forever,
    event-time timestamps) was copied with its timestamp into a CreateTime by-id topic,
    where the broker's next retention check deleted it after the hop had committed its
    source offset (10 of 10 lost, in ~5 minutes). The by-id topic now stamps append
    time, so retention counts from the move; the source timestamp travels in the origin
    header and the handler still sees it."""
    topic = kafka_topic(partitions=1)
    settings = settings_for(
        kafka_bootstrap, topic, tmp_path / "state", dedupe={"scope": "topic", "id_source": "key"}
    )
    thirty_days_ago = int(time.time() * 1000) - 30 * 24 * 3600 * 1000
    ids = [str(uuid.uuid4()) for _ in range(10)]
    produce(
        kafka_bootstrap,
        topic,
        [(0, i.encode(), b"{}", []) for i in ids],
        timestamp=thirty_days_ago,
    )
    hop_once(settings, 10)
    target = by_id_topic(settings.kafka.group_id, topic)
    resource = ConfigResource(ResourceType.TOPIC, target)
    client = admin(kafka_bootstrap)
    configs = client.describe_configs([resource])[resource].result(30)
    assert configs["message.timestamp.type"].value == "LogAppendTime"
    assert configs["cleanup.policy"].value == "delete"
    reader = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"rev14-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
        }
    )
    reader.subscribe([target])
    stamps: list[tuple[int, int]] = []
    deadline = time.monotonic() + 30
    while len(stamps) < 10 and time.monotonic() < deadline:
        message = reader.poll(0.5)
        if message is not None and message.error() is None:
            stamps.append(message.timestamp())
    reader.close()
    assert len(stamps) == 10
    assert all(kind == 2 and ms > thirty_days_ago + 29 * 24 * 3600 * 1000 for kind, ms in stamps)
    handler = Seen()
    run_for(DedupeConsumer(handler, settings), lambda t: len(handler.ids()) >= 10, 30)
    assert sorted(handler.ids()) == sorted(ids)
    with handler.lock:
        seen = {e.timestamp for e in handler.events}
    assert seen == {datetime.fromtimestamp(thirty_days_ago / 1000, tz=UTC)}


# -- 6. a partition-scope consumer still running in the group ----------------------------------


def test_rev14_topic_scope_refuses_a_group_a_partition_scope_consumer_still_runs_in(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """The hop joins the user's group itself. A partition-scope consumer of that group
    still running (a forgotten instance, a rolling switch) shares the source
    partitions with the hops: it handles its share in partition scope, the hops move
    the rest, and an ID with copies on both sides is handled twice, with no error
    and no warning. The switch should be refused (or at least loudly reported)."""
    topic = kafka_topic(partitions=2)
    group = f"g-{topic}"
    old_settings = settings_for(
        kafka_bootstrap, topic, tmp_path / "old", group=group, dedupe={"id_source": "key"}
    )
    new_settings = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "new",
        group=group,
        dedupe={"scope": "topic", "id_source": "key"},
    )
    old_handler, new_handler = Seen(), Seen()
    old, new = DedupeConsumer(old_handler, old_settings), DedupeConsumer(new_handler, new_settings)
    stop_at = [time.monotonic() + 120]
    errors: list[BaseException] = []

    def run(consumer: DedupeConsumer) -> None:
        try:
            consumer.run(
                until=lambda t: time.monotonic() > stop_at[0], install_signal_handlers=False
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in (old, new)]
    threads[0].start()
    time.sleep(5)  # the stale one owns both partitions
    threads[1].start()
    time.sleep(10)  # the hop joined: one partition each
    produce(kafka_bootstrap, topic, [(0, b"X", b"pay", []), (1, b"X", b"pay", [])])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(old_handler.ids()) + len(new_handler.ids()) < 2:
        time.sleep(0.2)
    time.sleep(2)
    stop_at[0] = 0
    for t in threads:
        t.join(60)
    handled = old_handler.ids() + new_handler.ids()
    assert errors or handled == ["X"], (
        f"X handled {len(handled)} times (partition-scope instance: {old_handler.ids()}, "
        f"topic-scope instance: {new_handler.ids()}); no error"
    )


# -- 7. one message too large for the by-id topic stalls the hop, every partition -------------


def test_rev14_a_message_the_by_id_topic_cannot_take_does_not_stall_the_hop(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """The source topic accepts 2 MB messages (``max.message.bytes``), which partition
    scope consumes and handles. The hop re-produces each message with the producer's
    default ``message.max.bytes`` (1 MB) to a by-id topic created with the broker's
    default limit: ``produce`` raises MSG_SIZE_TOO_LARGE, ``_move`` aborts, seeks back
    and reads the same batch again, forever (only ``repartition_aborted`` warnings).
    Every other message of that batch, on any partition, is held with it: nothing is
    handled any more and the consumer does not stop."""
    topic = kafka_topic(partitions=2, config={"max.message.bytes": "3000000"})
    settings = settings_for(
        kafka_bootstrap, topic, tmp_path / "state", dedupe={"scope": "topic", "id_source": "key"}
    )
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 3_000_000, "linger.ms": 50}
    )
    producer.produce(topic, key=b"big", value=b"x" * 2_000_000, partition=0)
    for i in range(20):
        producer.produce(topic, key=f"small-{i}".encode(), value=b"{}", partition=1)
    assert producer.flush(30) == 0
    handler = Seen()
    consumer = DedupeConsumer(handler, settings)
    errors: list[BaseException] = []
    try:
        run_for(consumer, lambda t: t.consumed >= 21, 45)
    except BaseException as exc:  # stopping with a clear error is acceptable too
        errors.append(exc)
    small = [i for i in handler.ids() if i.startswith("small-")]
    assert errors or len(small) == 20, (
        f"{len(small)} of 20 small messages handled, big one: {'big' in handler.ids()}; "
        "hop aborts: "
        f"{consumer.metrics.registry.get_sample_value('dedupe_repartition_aborts_total')}"
    )


# -- 8. transactional effects: staged state is split by event ID ------------------------------


class Ledger(Handler):
    """docs/concepts.md's ledger: a balance staged per account (the producers' key)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.balances: list[int] = []

    def handle(self, event: Event) -> None:
        key = f"balance:{(event.key or b'').decode()}"
        balance = int(event.staged(key) or b"0") + 1
        event.stage(key, str(balance))
        with self.lock:
            self.balances.append(balance)


def test_rev14_staged_state_keyed_by_the_producers_key_is_split_in_topic_scope_and_said(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """docs/concepts.md: "Staged state is per partition, so key the balance by what the
    producers key the events by". With topic scope the partition is the by-id one,
    chosen by event ID: one account's payments (one key, many IDs) land on every by-id
    partition and each keeps its own balance, so the ledger example computes N partial
    balances, silently (migrate-scope also leaves the staged state behind)."""
    topic = kafka_topic(partitions=1)
    settings = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "state",
        dedupe={"scope": "topic", "scope_partitions": 4, "id_source": "header:event-id"},
    )
    n = 40
    produce(
        kafka_bootstrap,
        topic,
        [(0, b"account-A", b"{}", [("event-id", str(uuid.uuid4()).encode())]) for _ in range(n)],
    )
    handler = Ledger()
    with captured_logs() as logs:
        run_for(DedupeConsumer(handler, settings), lambda t: t.handled >= n, 60)
    assert len(handler.balances) == n
    # Documented (docs/scope.md), and said once at run time: state keyed by anything but
    # the event ID is split over the by-id partitions.
    assert max(handler.balances) < n
    warned = [e for e in logs if e.get("event") == "staged_effects_in_topic_scope"]
    assert len(warned) == 1
