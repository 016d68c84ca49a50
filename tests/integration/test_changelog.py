"""The changelog topic against a real broker: policy, tombstones, restore, fencing, names."""

from __future__ import annotations

import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, not in __all__
    AdminClient,
    ConfigResource,
    ResourceType,
)
from structlog.testing import capture_logs

from dedupe_consumer import DedupeConsumer, Event, Handler
from dedupe_consumer.config import KafkaConnection
from dedupe_consumer.errors import StoreError
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.observability import Metrics
from dedupe_consumer.store import IdRecord, RocksStore, WriteSet
from dedupe_consumer.store.base import RecordStatus
from dedupe_consumer.store.changelog_codec import changelog_topic, legacy_changelog_topic
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import produce_events, settings_for

pytestmark = pytest.mark.kafka


class Ledger(Handler):
    """Transactional effects: one staged counter per event ID."""

    def handle(self, event: Event) -> None:
        key = b"count:" + event.id.encode()
        event.stage(key, str(int(event.staged(key) or b"0") + 1))


def cleanup_policy(bootstrap: str, topic: str) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    resource = ConfigResource(ResourceType.TOPIC, topic)
    entries = admin.describe_configs([resource])[resource].result(timeout=30)
    return str(entries["cleanup.policy"].value)


def changelog_for(bootstrap: str, group: str, **kw: Any) -> Changelog:
    return Changelog(
        KafkaConnection(bootstrap_servers=bootstrap),
        group,
        timedelta(days=7),
        f"test-{group}-{time.monotonic_ns()}",
        **kw,
    )


def run(consumer: DedupeConsumer, until: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    consumer.run(
        until=lambda t: until(t) or time.monotonic() > deadline, install_signal_handlers=False
    )


def test_expired_ids_leave_the_changelog_by_tombstones_and_effects_never_expire(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    ids = produce_events(kafka_bootstrap, topic, 30, duplicates=0.0, seed=61)
    settings = settings_for(kafka_bootstrap, topic, tmp_path / "a", dedupe={"retention": "2s"})
    metrics = Metrics()
    first = DedupeConsumer(Ledger(), settings, metrics=metrics)
    # Handle everything, then stay idle past the retention: the idle sweep tombstones.
    run(first, lambda t: metrics.expired_deleted._value.get() >= len(ids))
    assert first.totals.handled == len(ids)
    assert metrics.expired_deleted._value.get() == len(ids)

    name = changelog_topic(settings.kafka.group_id, topic)
    assert cleanup_policy(kafka_bootstrap, name) == "compact"  # nothing expires by time

    # The partition moves to an instance with an empty store (another machine).
    fresh = RocksStore(tmp_path / "b", retention_ms=10**12)
    try:
        changelog = changelog_for(kafka_bootstrap, settings.kafka.group_id)
        changelog.restore(TopicPartition(topic, 0), fresh)
        changelog.close()
        tp = TopicPartition(topic, 0)
        assert fresh.watermark(tp) == len(ids) - 1
        # The effects came back; the expired IDs did not (now_ms=0: nothing reads as expired).
        assert all(fresh.effect(tp, b"count:" + i.encode()) == b"1" for i in ids)
        assert fresh.lookup(tp, ids, 0) == [None] * len(ids)
    finally:
        fresh.close()


def test_an_existing_compact_delete_changelog_topic_is_altered_to_compact(
    kafka_bootstrap: str, kafka_topic: TopicFactory
) -> None:
    topic = kafka_topic(partitions=2)
    group = f"g-{topic}"
    name = changelog_topic(group, topic)
    kafka_topic(
        partitions=2,
        config={"cleanup.policy": "compact,delete", "retention.ms": "86400000"},
        name=name,
    )
    changelog = changelog_for(kafka_bootstrap, group)
    with capture_logs() as logs:
        changelog.ensure_topics([topic])
    changelog.close()
    assert cleanup_policy(kafka_bootstrap, name) == "compact"
    [updated] = [e for e in logs if e["event"] == "changelog_config_updated"]
    assert updated["old"] == {"cleanup.policy": "compact,delete"}
    assert updated["new"] == {"cleanup.policy": "compact"}


def test_a_changelog_topic_under_the_legacy_name_is_reported(
    kafka_bootstrap: str, kafka_topic: TopicFactory
) -> None:
    topic = kafka_topic(partitions=1)
    group = f"g-{topic}"
    legacy = kafka_topic(partitions=1, name=legacy_changelog_topic(group, topic))
    changelog = changelog_for(kafka_bootstrap, group)
    with capture_logs() as logs:
        changelog.ensure_topics([topic])
    changelog.close()
    [warning] = [e for e in logs if e["event"] == "changelog_legacy_topic"]
    assert warning["legacy_topic"] == legacy
    assert warning["changelog_topic"] == changelog_topic(group, topic)
    assert "no longer read" in warning["consequence"]


def test_restore_of_an_empty_changelog_partition_stores_its_position(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    changelog = changelog_for(kafka_bootstrap, f"g-{topic}")
    changelog.ensure_topics([topic])
    store = RocksStore(tmp_path / "s", retention_ms=10**9)
    try:
        tp = TopicPartition(topic, 0)
        assert changelog.restore(tp, store) == 0  # records applied
        assert store.changelog_position(changelog.position_key(tp)) == 0
    finally:
        store.close()
        changelog.close()


def open_transaction(bootstrap: str, topic: str, event_id: str) -> Producer:
    """A previous owner's producer with a decision in a transaction not yet committed."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"previous-owner-{time.monotonic_ns()}",
            "transaction.timeout.ms": 60000,
        }
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    decision = IdRecord(RecordStatus.HANDLED, 7, int(time.time() * 1000), b"\x00" * 8)
    producer.produce(topic, key=b"d:" + event_id.encode(), value=decision.encode(), partition=0)
    producer.flush(30)
    return producer


@pytest.mark.parametrize("outcome", ["commit", "abort"])
def test_restore_waits_for_an_open_transaction_of_the_previous_owner(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path, outcome: str
) -> None:
    topic = kafka_topic(partitions=1)
    changelog = changelog_for(kafka_bootstrap, f"g-{topic}")
    changelog.ensure_topics([topic])
    previous = open_transaction(kafka_bootstrap, changelog.topic(topic), "in-flight")
    finish = previous.commit_transaction if outcome == "commit" else previous.abort_transaction
    timer = threading.Timer(3.0, finish)
    timer.start()
    store = RocksStore(tmp_path / "s", retention_ms=10**9)
    tp = TopicPartition(topic, 0)
    try:
        with capture_logs() as logs:
            changelog.restore(tp, store)
        timer.join()
        assert any(e["event"] == "changelog_open_transaction" for e in logs)
        found = store.lookup(tp, ["in-flight"], int(time.time() * 1000))
        assert (found[0] is not None) == (outcome == "commit")
    finally:
        timer.cancel()
        store.close()
        changelog.close()


def test_restore_fails_clearly_when_a_transaction_stays_open(
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("dedupe_consumer.kafka.changelog._OPEN_TRANSACTION_MARGIN_S", 0.0)
    topic = kafka_topic(partitions=1)
    changelog = changelog_for(
        kafka_bootstrap, f"g-{topic}", producer_config={"transaction.timeout.ms": 2000}
    )
    changelog.ensure_topics([topic])
    previous = open_transaction(kafka_bootstrap, changelog.topic(topic), "stuck")
    store = RocksStore(tmp_path / "s", retention_ms=10**9)
    try:
        with pytest.raises(StoreError, match="still open"):
            changelog.restore(TopicPartition(topic, 0), store)
    finally:
        previous.abort_transaction(30)
        store.close()
        changelog.close()


def test_a_cloned_store_directory_is_a_clear_error_not_a_fencing_loop(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=2)
    produce_events(kafka_bootstrap, topic, 20, duplicates=0.0, seed=62)
    original = settings_for(kafka_bootstrap, topic, tmp_path / "a")
    first = DedupeConsumer(Ledger(), original)
    run(first, lambda t: t.consumed >= 20)
    shutil.copytree(tmp_path / "a", tmp_path / "clone")  # a volume snapshot, restored twice
    clone = settings_for(kafka_bootstrap, topic, tmp_path / "clone")

    errors: dict[str, BaseException] = {}
    stop = threading.Event()

    def start(label: str, settings: Any) -> tuple[DedupeConsumer, threading.Thread]:
        consumer = DedupeConsumer(Ledger(), settings)

        def body() -> None:
            try:
                run(consumer, lambda t: stop.is_set(), timeout_s=90)
            except BaseException as exc:
                errors[label] = exc

        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        return consumer, thread

    a, a_thread = start("original", original)
    time.sleep(3)  # the original's producer is up before the clone fences it
    b, b_thread = start("clone", clone)
    try:
        deadline = time.monotonic() + 60
        while not errors and time.monotonic() < deadline:
            produce_events(kafka_bootstrap, topic, 10, duplicates=0.0, seed=int(time.time()))
            time.sleep(1)
    finally:
        stop.set()
        a.stop()
        b.stop()
        a_thread.join(60)
        b_thread.join(60)
    assert errors, "two instances with one instance id ran side by side without an error"
    for error in errors.values():
        assert isinstance(error, StoreError), repr(error)
        assert "cloned" in str(error) and "own store" in str(error), str(error)


def test_the_transaction_commits_the_source_offsets_and_refuses_without_a_generation(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    from confluent_kafka import Consumer

    from dedupe_consumer.errors import NotOwnerError

    from ..kafka_helpers import committed_offsets

    topic = kafka_topic(partitions=1)
    group = f"g-{topic}"
    member = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    member.subscribe([topic])
    wait_for_assignment = time.monotonic() + 30
    while not member.assignment() and time.monotonic() < wait_for_assignment:
        member.poll(0.2)
    assert member.assignment(), "the member got no partition"
    changelog = changelog_for(kafka_bootstrap, group)
    changelog.ensure_topics([topic])
    store = RocksStore(tmp_path / "s", retention_ms=10**9)
    tp = TopicPartition(topic, 0)
    decision = IdRecord(RecordStatus.HANDLED, 41, int(time.time() * 1000), b"\x00" * 8)
    try:
        changelog.group_metadata = member.consumer_group_metadata
        sent = changelog.write(
            WriteSet({tp: [("a", decision)]}, watermarks={tp: 41}), store, {tp: 42}
        )
        assert sent == {tp: 42}
        assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 42}

        outsider = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
        changelog.group_metadata = outsider.consumer_group_metadata  # generation -1
        with pytest.raises(NotOwnerError, match="no generation"):
            changelog.write(WriteSet({tp: [("b", decision)]}, watermarks={tp: 50}), store, {tp: 51})
        outsider.close()
        assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 42}
    finally:
        member.close()
        store.close()
        changelog.close()


def test_a_store_without_the_partitions_watermark_restores_from_the_start(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    changelog = changelog_for(kafka_bootstrap, f"g-{topic}")
    changelog.ensure_topics([topic])
    tp = TopicPartition(topic, 0)
    decision = IdRecord(RecordStatus.HANDLED, 3, int(time.time() * 1000), b"\x00" * 8)
    store = RocksStore(tmp_path / "s", retention_ms=10**9)
    try:
        write = WriteSet({tp: [("a", decision)]}, watermarks={tp: 3})
        changelog.write(write, store)
        store.persist(write)  # as the engine does: the changelog first, then the store
        assert changelog.restore(tp, store) == 0  # its own write: nothing new
        # The partition's local state is dropped (revoked long ago), its position kept.
        store._meta.delete(f"wm:p:{topic}:0".encode())
        assert store.changelog_position(changelog.position_key(tp)) is not None
        assert changelog.restore(tp, store) == 2  # read again from the start: d:a and w
        assert store.watermark(tp) == 3
    finally:
        store.close()
        changelog.close()


def test_a_store_that_missed_another_owners_writes_is_rebuilt_not_patched(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """A store that held a partition before another owner wrote (and compaction then
    removed the tombstone and the reset record) must not keep its stale effect and
    watermark: a restore from its old position would. Real broker compaction."""
    from confluent_kafka import Consumer
    from confluent_kafka import TopicPartition as KafkaTopicPartition
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AlterConfigOpType,
        ConfigEntry,
    )

    from dedupe_consumer.store import EPOCH

    source = kafka_topic(partitions=1)
    group = f"g-{source}"
    changelog = changelog_for(kafka_bootstrap, group)
    changelog.ensure_topics([source])
    name = changelog.topic(source)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    fast = {
        "segment.ms": "500",
        "min.cleanable.dirty.ratio": "0.001",
        "delete.retention.ms": "0",
        "min.compaction.lag.ms": "0",
    }
    entries = [
        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in fast.items()
    ]
    resource = ConfigResource(ResourceType.TOPIC, name, incremental_configs=entries)
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})

    def send(key: bytes, value: bytes | None) -> None:
        producer.produce(name, key=key, value=value, partition=0)
        assert producer.flush(30) == 0

    tp = TopicPartition(source, 0)
    old, new = EPOCH.pack(b"A" * 16, 0), EPOCH.pack(b"B" * 16, 1)
    store = RocksStore(tmp_path / "a", retention_ms=7 * 86_400_000)
    try:
        send(b"t", old + b"\x00")
        send(b"w", (99).to_bytes(8, "big"))
        send(b"e:balance", b"100")
        changelog.restore(tp, store)
        assert (store.watermark(tp), store.effect(tp, b"balance")) == (99, b"100")
        # Another owner: a reset (new epoch), the effect deleted, 0..5 decided, and later
        # the same epoch announced again (adopt) by a restarted owner.
        send(b"t", new + b"\x01")
        send(b"w", (-1).to_bytes(8, "big", signed=True))
        send(b"e:balance", None)
        send(b"w", (5).to_bytes(8, "big"))
        send(b"t", new + b"\x00")
        deadline = time.monotonic() + 90
        while True:  # wait until compaction removed the reset record and the tombstone
            time.sleep(1.0)
            send(b"roll", b"x")  # rolls the segment so that the cleaner can run
            reader = Consumer(
                {
                    "bootstrap.servers": kafka_bootstrap,
                    "group.id": f"peek-{time.monotonic_ns()}",
                    "enable.partition.eof": True,
                }
            )
            reader.assign([KafkaTopicPartition(name, 0, 0)])
            keys: list[bytes | None] = []
            while (m := reader.poll(3)) is not None and m.error() is None:
                keys.append(m.key())
            reader.close()
            if b"e:balance" not in keys and keys.count(b"t") == 1:
                break
            assert time.monotonic() < deadline, f"the broker never compacted {name}: {keys}"
        changelog.restore(tp, store)
        assert store.watermark(tp) == 5
        assert store.epoch(tp) == new
        assert store.effect(tp, b"balance") is None
    finally:
        store.close()
        changelog.close()


class _HangingSendOffsets:
    """The real producer, except that send_offsets_to_transaction never returns (as
    librdkafka's does when its cached group coordinator went away: #5456, #5511)."""

    def __init__(self, producer: Any, release: threading.Event) -> None:
        self._producer = producer
        self._release = release

    def send_offsets_to_transaction(self, *args: Any) -> None:
        self._release.wait()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)


def test_a_hung_send_offsets_replaces_the_producer_and_the_batch_is_written_once(
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from confluent_kafka import Consumer

    from ..kafka_helpers import committed_offsets

    monkeypatch.setattr("dedupe_consumer.kafka.changelog._HANG_MARGIN_S", 0.5)
    topic = kafka_topic(partitions=1)
    group = f"g-{topic}"
    member = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    member.subscribe([topic])
    deadline = time.monotonic() + 30
    while not member.assignment() and time.monotonic() < deadline:
        member.poll(0.2)
    changelog = changelog_for(kafka_bootstrap, group, timeout_s=3.0)
    changelog.ensure_topics([topic])
    changelog.group_metadata = member.consumer_group_metadata
    release = threading.Event()
    changelog._producer = _HangingSendOffsets(changelog._producer, release)  # type: ignore[assignment]
    store = RocksStore(tmp_path / "s", retention_ms=10**9)
    tp = TopicPartition(topic, 0)
    decision = IdRecord(RecordStatus.HANDLED, 9, int(time.time() * 1000), b"\x00" * 8)
    try:
        with capture_logs() as logs:
            sent = changelog.write(
                WriteSet({tp: [("a", decision)]}, watermarks={tp: 9}), store, {tp: 10}
            )
        assert sent == {tp: 10}
        assert any(e["event"] == "changelog_producer_stuck" for e in logs)
        assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 10}
        fresh = RocksStore(tmp_path / "fresh", retention_ms=10**9)
        try:
            assert changelog.restore(tp, fresh) == 2  # d:a and w, once: the hung one aborted
            assert fresh.watermark(tp) == 9
        finally:
            fresh.close()
    finally:
        release.set()
        member.close()
        store.close()
        changelog.close()


def test_our_own_aborted_transaction_is_not_taken_for_another_owners_writes(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """After an aborted attempt of ours (a stale-generation retry, a stuck producer), the
    position still advances: the next restore reads nothing and rebuilds nothing, so a
    fenced batch kept for this partition can still be adopted (review finding)."""
    source = kafka_topic(partitions=1)
    changelog = changelog_for(kafka_bootstrap, f"g-{source}", timeout_s=10.0)
    changelog.ensure_topics([source])
    tp = TopicPartition(source, 0)
    store = RocksStore(tmp_path / "s", retention_ms=10**9)

    def batch(offset: int) -> None:
        decision = IdRecord(RecordStatus.HANDLED, offset, int(time.time() * 1000), b"\0" * 8)
        write = WriteSet({tp: [(f"id{offset}", decision)]}, watermarks={tp: offset})
        changelog.write(write, store)
        store.persist(write)

    try:
        assert changelog.restore(tp, store) == 0
        batch(0)
        producer = changelog._producer  # an attempt of ours that is aborted
        producer.begin_transaction()
        changelog._send(tp, b"d:junk", b"x" * 25)
        producer.flush(10)
        producer.abort_transaction(10)
        batch(1)
        batch(2)
        with capture_logs() as logs:
            assert changelog.restore(tp, store) == 0
        assert not [e for e in logs if e["event"] == "changelog_restore_from_start"]
        assert store.watermark(tp) == 2
    finally:
        store.close()
        changelog.close()
