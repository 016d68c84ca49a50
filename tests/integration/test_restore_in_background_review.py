"""Adversarial review of issue 17 (restores off the polling thread): failing tests.

Each test is a scenario in which the background restore does worse than the
restore in the assignment callback did. See the review report for the analysis.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from dedupe_consumer import DedupeConsumer
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import (
    hung_changelog_transaction,
    produce_raw,
    running_consumer,
    settings_for,
    wait_for,
)
from ..log_capture import captured_logs
from .test_restore_in_background import Calls, consumer_settings, events_on

pytestmark = pytest.mark.kafka


def _decide_first(
    bootstrap: str, topic: str, group: str, store: Path, partitions: dict[int, int]
) -> None:
    """A first owner decides ``partitions`` (partition -> event count) and stops: the
    changelog then holds their records and watermarks, and the group their commits."""
    produce_raw(
        bootstrap,
        topic,
        [item for p, count in partitions.items() for item in events_on(p, f"old{p}", count)],
    )
    total = sum(partitions.values())
    handler = Calls()
    first = DedupeConsumer(handler, consumer_settings(bootstrap, topic, group, store))
    with running_consumer(first) as runner:
        wait_for(lambda: len(handler.ids()) == total, 60, "the first owner decided")
    assert not runner.is_alive()


def test_an_eager_rebalance_that_gives_the_partition_back_keeps_its_restore(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """Eager protocol (librdkafka's default range,roundrobin): every rebalance revokes
    everything, then assigns. A member joining for another topic gives this consumer
    the very same partitions back, yet its restore in progress is stopped and starts
    over from the changelog's start (a partial state has no watermark). Each rebalance
    throws a restore's work away: with rebalances more often than a restore lasts (a
    rolling deploy, autoscaling), a big partition's restore never ends. In the
    assignment callback, it ended."""
    topic = kafka_topic(partitions=2)
    other = kafka_topic(partitions=1)
    group = f"g-{topic}"
    _decide_first(kafka_bootstrap, topic, group, tmp_path / "first", {1: 30})
    hung = hung_changelog_transaction(kafka_bootstrap, group, topic, 1)

    handler = Calls()
    consumer = DedupeConsumer(
        handler, consumer_settings(kafka_bootstrap, topic, group, tmp_path / "s")
    )
    joiner: Consumer | None = None
    with captured_logs() as logs, running_consumer(consumer) as runner:
        try:
            wait_for(
                lambda: any(e["event"] == "changelog_open_transaction" for e in logs),
                60,
                "the restore of partition 1 waiting on the open transaction",
            )
            # Another member of the group, for another topic: an eager rebalance that
            # hands both partitions of ``topic`` straight back to the consumer.
            joiner = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
            joiner.subscribe([other])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not joiner.assignment():
                joiner.poll(0.2)
            assert joiner.assignment(), "the joining member got its topic"
            wait_for(
                lambda: sum(e["event"] == "restoring" for e in logs) >= 2,
                30,
                "the rebalance served by the consumer",
            )
            served = len(logs)
            hung.abort_transaction(30)
            wait_for(
                lambda: any(e["event"] == "changelog_restored" for e in logs[served:]),
                60,
                "the restore of partition 1 done",
            )
        finally:
            if joiner is not None:
                joiner.close()
    assert not runner.is_alive()
    stopped = [e for e in logs[:served] if e["event"] == "restore_stopped"]
    restarted = [
        e
        for e in logs[:served]
        if e["event"] == "changelog_restore_from_start"
        and e.get("reason") == "local state without a watermark"
    ]
    assert not stopped and not restarted, (
        "the partition came straight back, yet its restore was stopped and began again: "
        f"{stopped + restarted}"
    )


def test_a_restored_partition_resumes_while_its_committed_offset_is_unstable(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """A previous owner hung inside a transaction that commits the partition's source
    offset (KIP-447): until it ends, the broker answers the committed-offset fetch
    with UNSTABLE_OFFSET_COMMIT, so librdkafka does not start fetching the partition.
    Its restore (from the changelog) completes meanwhile; ``_take_restored`` then
    seeks the paused partition to the watermark, and librdkafka refuses a seek of a
    partition it has not started (``_STATE``): the KafkaException escapes ``poll``
    and the consumer dies. In the assignment callback, the start offset went into
    the ``assign`` itself and no seek was needed."""
    topic = kafka_topic(partitions=1)
    group = f"g-{topic}"
    _decide_first(kafka_bootstrap, topic, group, tmp_path / "first", {0: 10})
    # Offsets only (the records of its transaction went to another partition).
    hung = hung_changelog_transaction(kafka_bootstrap, group, topic, offsets={0: 10})
    produce_raw(kafka_bootstrap, topic, events_on(0, "new", 10))

    handler = Calls()
    settings = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "s",
        group=group,
        # Past the 30 s committed-offset query of _place (it blocks the poll): this test
        # is about the seek that follows it.
        kafka={"consumer": {"max.poll.interval.ms": 60000}},
    )
    consumer = DedupeConsumer(handler, settings)
    with captured_logs() as logs, running_consumer(consumer) as runner:
        wait_for(
            lambda: any(e["event"] == "committed_offsets_unavailable" for e in logs),
            60,
            "the committed-offset query of the restored partition given up",
        )
        time.sleep(0.5)
        hung.abort_transaction(30)  # the committed offset is stable again
        wait_for(lambda: len(handler.ids()) == 10 or not runner.is_alive(), 60, "the new events")
    assert not runner.failure, f"the consumer died: {runner.failure[0]!r}"  # poll raised
    assert sorted(handler.ids()) == sorted(f"new-{i}" for i in range(10))


def test_hooks_never_see_a_revocation_of_a_partition_they_were_not_given(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """``on_assign`` hooks run once a partition's state is restored; a partition whose
    restore is stopped was never given to them, so ``on_revoke`` must not name it.
    At a stop during a restore, ``close`` stops the restore, then librdkafka's
    revocation of the whole assignment reaches ``Engine.release`` and the hooks with
    the never-owned partition (a per-partition resource opened in ``on_assign`` is
    closed twice, or a KeyError in the user's hook)."""
    topic = kafka_topic(partitions=2)
    group = f"g-{topic}"
    hung = hung_changelog_transaction(kafka_bootstrap, group, topic, 1)
    produce_raw(kafka_bootstrap, topic, events_on(0, "zero", 5) + events_on(1, "one", 5))

    handler = Calls()
    consumer = DedupeConsumer(
        handler, consumer_settings(kafka_bootstrap, topic, group, tmp_path / "s")
    )
    given: set[int] = set()
    taken: list[int] = []
    consumer.on_assign(lambda tps: given.update(tp.partition for tp in tps))
    consumer.on_revoke(lambda tps: taken.extend(tp.partition for tp in tps))
    with captured_logs() as logs:
        try:
            with running_consumer(consumer) as runner:
                wait_for(lambda: len(handler.ids(0)) == 5, 60, "partition 0 decided")
                wait_for(
                    lambda: any(e["event"] == "changelog_open_transaction" for e in logs),
                    60,
                    "the restore of partition 1 waiting",
                )
        finally:
            hung.abort_transaction(30)
    assert not runner.is_alive()
    assert given == {0}
    assert sorted(taken) == [0], f"on_revoke named partitions on_assign never saw: {taken}"


def _recreate(bootstrap: str, topic: str, partitions: int) -> None:
    """Delete ``topic`` and create it again (a new topic ID, offsets from 0)."""
    client = AdminClient({"bootstrap.servers": bootstrap})
    client.delete_topics([topic], operation_timeout=30)[topic].result()
    deadline = time.monotonic() + 60
    while True:
        try:
            created = client.create_topics([NewTopic(topic, partitions, 1)], operation_timeout=30)
            created[topic].result()
            break
        except KafkaException:  # still being deleted
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the leaders are elected
        metadata = client.list_topics(topic, timeout=10).topics[topic]
        if metadata.error is None and all(p.leader >= 0 for p in metadata.partitions.values()):
            return
        time.sleep(0.2)


def test_an_offset_regression_found_after_a_restore_does_not_race_the_persister(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """``Engine.assign`` used to settle the persister first ("the changelog producer and
    the store are ours alone now"). Called from ``_take_restored`` (a poll, right after
    ``pipeline`` handed a batch to the persister), it no longer does; with
    ``on_offset_regression = "reset"``, ``_check_offsets`` then runs
    ``changelog.reset_epoch``: a transaction of its own on the transactional producer
    the persister is using for another partition's batch at that very moment."""
    topic = kafka_topic(partitions=2)
    group = f"g-{topic}"
    _decide_first(kafka_bootstrap, topic, group, tmp_path / "first", {0: 10, 1: 10})
    _recreate(kafka_bootstrap, topic, 2)  # offsets start over, below the watermarks
    hung = hung_changelog_transaction(kafka_bootstrap, group, topic, 1)

    handler = Calls()
    settings = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "s",
        group=group,
        kafka={"consumer": {"max.poll.interval.ms": 30000}},
        processing={"on_offset_regression": "reset", "batch_size": 20},
    )
    consumer = DedupeConsumer(handler, settings)
    streaming = threading.Event()

    def stream() -> None:  # partition 0 busy: a batch on the persister at every poll
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 2})
        i = 0
        while not streaming.is_set():
            for item in events_on(0, f"busy{i}", 20):
                producer.produce(topic, **item)
            producer.poll(0)
            i += 1
            time.sleep(0.01)
        producer.flush(30)

    with captured_logs() as logs, running_consumer(consumer) as runner:
        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        try:
            wait_for(
                lambda: any(e["event"] == "changelog_open_transaction" for e in logs),
                60,
                "the restore of partition 1 waiting",
            )
            wait_for(lambda: len(handler.ids(0)) > 200, 60, "partition 0 busy")
            hung.abort_transaction(30)
            produce_raw(kafka_bootstrap, topic, events_on(1, "new", 10))
            wait_for(lambda: len(handler.ids(1)) == 10 or not runner.is_alive(), 60, "partition 1")
        finally:
            streaming.set()
            streamer.join(30)
    assert not runner.failure, f"the consumer died: {runner.failure[0]!r}"
    assert sorted(handler.ids(1)) == sorted(f"new-{i}" for i in range(10))
    assert [e for e in logs if e["event"] == "offset_regression_reset"]
