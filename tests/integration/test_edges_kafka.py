"""The Kafka edges against a real broker: a refused commit is a logged retry, and
extensions see a real rebalance through the consumer's hooks."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dedupe_consumer import DedupeConsumer, Event, Handler, kafka
from dedupe_consumer.contracts import AssignmentListener, BatchResult, Source
from dedupe_consumer.kafka import KafkaSource
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import committed_offsets, produce_events, settings_for, wait_for
from ..log_capture import captured_logs

pytestmark = pytest.mark.kafka


class Recorder(Handler):
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.lock = threading.Lock()

    def handle(self, event: Event) -> None:
        with self.lock:
            self.ids.append(event.id)


def test_a_commit_the_broker_refuses_is_logged_and_retried_never_fatal(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    sent = produce_events(kafka_bootstrap, topic, 50, duplicates=0.0)
    settings = settings_for(
        kafka_bootstrap, topic, tmp_path / "state", processing={"batch_size": 10}
    )
    edges = kafka.edges(settings)
    opened: list[KafkaSource] = []

    def open_source(listener: AssignmentListener) -> Source:
        source = edges.source(listener)
        assert isinstance(source, KafkaSource)
        opened.append(source)
        return source

    injected: list[bool] = []

    def on_batch(result: BatchResult) -> None:
        if not injected:
            injected.append(True)
            # Partition 7 does not exist: the broker refuses this commit. Its answer
            # comes during a later poll; the next commit raises it as a CommitError.
            opened[0].commit({TopicPartition(topic, 7): 1})

    handler = Recorder()
    consumer = DedupeConsumer(handler, settings, edges=replace(edges, source=open_source))
    idle = 0

    def until(totals: Any) -> bool:
        nonlocal idle
        if totals.consumed >= len(sent):
            idle += 1
        return idle >= 3

    try:
        with captured_logs() as logs:
            totals = consumer.run(until=until, on_batch=on_batch, install_signal_handlers=False)
    finally:
        edges.close()

    assert totals.handled == len(sent)  # the run went on to the end
    failed = [e for e in logs if e["event"] == "commit_failed" and e.get("error_code")]
    assert failed, "the refused commit was not logged"
    assert failed[0]["error_code"] == "UNKNOWN_TOPIC_OR_PART"
    assert failed[0]["offsets"] == {f"{topic}[7]": 1}
    assert consumer.metrics.registry.get_sample_value("dedupe_commit_failures_total")
    # The real partition's offsets were committed all the same.
    group = settings.kafka.group_id
    assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: len(sent)}


def test_assignment_hooks_see_a_real_rebalance(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=2)
    events: list[tuple[str, str, list[int]]] = []
    lock = threading.Lock()

    def recorder(who: str, what: str) -> Any:
        def hook(tps: Sequence[TopicPartition]) -> None:
            with lock:
                events.append((who, what, sorted(tp.partition for tp in tps)))

        return hook

    def consumer_for(who: str) -> DedupeConsumer:
        settings = settings_for(kafka_bootstrap, topic, tmp_path / who, group=f"g-{topic}")
        consumer = DedupeConsumer(Recorder(), settings)
        consumer.on_assign(recorder(who, "assign"))
        consumer.on_revoke(recorder(who, "revoke"))
        consumer.on_lost(recorder(who, "lost"))
        return consumer

    def assigned_to(who: str) -> set[int]:
        with lock:
            return {p for w, what, tps in events if (w, what) == (who, "assign") for p in tps}

    def started(consumer: DedupeConsumer) -> threading.Thread:
        thread = threading.Thread(
            target=consumer.run, kwargs={"install_signal_handlers": False}, daemon=True
        )
        thread.start()
        return thread

    first = consumer_for("a")
    first_thread = started(first)
    second: DedupeConsumer | None = None
    second_thread: threading.Thread | None = None
    try:
        # Each partition reaches the hooks once its state is restored: in one call, or
        # in two when the two restores end at different polls.
        wait_for(lambda: assigned_to("a") == {0, 1}, 60, "a assigned both partitions")
        second = consumer_for("b")
        second_thread = started(second)
        wait_for(
            lambda: any(who == "b" and what == "assign" and tps for who, what, tps in events),
            60,
            "b assigned a partition",
        )
    finally:
        for consumer in (first, second):
            if consumer is not None:
                consumer.stop()
        for thread in (first_thread, second_thread):
            if thread is not None:
                thread.join(60)

    with lock:
        seen = list(events)
    b_assigned = next(i for i, (who, what, tps) in enumerate(seen) if who == "b" and tps)
    a_revoked = [tps for who, what, tps in seen[:b_assigned] if (who, what) == ("a", "revoke")]
    assert a_revoked and all(a_revoked), seen  # a gave partitions up before b got one
    leading = list(itertools.takewhile(lambda e: e[:2] == ("a", "assign"), seen))
    assert {p for _, _, tps in leading for p in tps} == {0, 1}, seen  # a got both first


def test_a_failing_revoke_hook_neither_skips_the_commit_nor_leaks_the_edges(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """Review of issue 12: a raising on_revoke hook skipped the revoked partitions'
    commit (close() committed them later, no longer ours) and run()'s clean-up, so
    the RocksDB lock stayed held and the next start failed."""
    topic = kafka_topic(partitions=1)
    sent = produce_events(kafka_bootstrap, topic, 30, duplicates=0.0)
    settings = settings_for(kafka_bootstrap, topic, tmp_path / "state")
    first = Recorder()
    consumer = DedupeConsumer(first, settings)

    @consumer.on_revoke
    def broken(tps: Sequence[TopicPartition]) -> None:
        raise RuntimeError("user hook failed")

    with captured_logs() as logs:
        consumer.run(until=lambda t: t.consumed >= len(sent), install_signal_handlers=False)
    assert sorted(first.ids) == sorted(sent)
    assert any(r["event"] == "hook_failed" and r["hook"] == "on_revoke" for r in logs)
    assert committed_offsets(kafka_bootstrap, settings.kafka.group_id, topic, 1) == {0: 30}
    # The store was closed: the same path opens again in this process.
    again = Recorder()
    DedupeConsumer(again, settings).run(until=lambda t: True, install_signal_handlers=False)
    assert again.ids == []
