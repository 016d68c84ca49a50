"""A restore never blocks the group (issue 17): it runs while the consumer polls.

A partition whose changelog restore cannot finish yet (here: a previous owner's
transaction is still open in the changelog, so the restore must wait for it) is
assigned paused; the consumer's other partitions are decided meanwhile, the
membership outlives ``max.poll.interval.ms``, and the partition's events are
decided once its state is complete. A revocation during the wait stops the restore.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dedupe_consumer import DedupeConsumer, Event, Handler
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import (
    ConsumerThread,
    hung_changelog_transaction,
    produce_raw,
    running_consumer,
    settings_for,
    wait_for,
)
from ..log_capture import captured_logs

pytestmark = pytest.mark.kafka

MAX_POLL_INTERVAL_MS = 7000  # librdkafka: at least session.timeout.ms (6 s here)


class Calls(Handler):
    def __init__(self) -> None:
        self.calls: list[tuple[float, int, str]] = []
        self.lock = threading.Lock()

    def handle(self, event: Event) -> None:
        with self.lock:
            self.calls.append((time.monotonic(), event.partition, event.id))

    def ids(self, partition: int | None = None) -> list[str]:
        with self.lock:
            return [i for _, p, i in self.calls if partition is None or p == partition]


def events_on(partition: int, prefix: str, count: int) -> list[dict[str, Any]]:
    """``count`` messages for ``produce_raw`` to ``partition``, IDs ``<prefix>-<n>`` (key
    and ``event-id`` header)."""
    return [
        {
            "partition": partition,
            "key": f"{prefix}-{i}".encode(),
            "value": b"{}",
            "headers": [("event-id", f"{prefix}-{i}".encode())],
        }
        for i in range(count)
    ]


def consumer_settings(bootstrap: str, topic: str, group: str, store: Path) -> Any:
    """``settings_for`` with ``max.poll.interval.ms`` at ``MAX_POLL_INTERVAL_MS``."""
    return settings_for(
        bootstrap,
        topic,
        store,
        group=group,
        kafka={"consumer": {"max.poll.interval.ms": MAX_POLL_INTERVAL_MS}},
    )


def test_a_waiting_restore_keeps_polling_and_the_other_partitions_decide(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=2)
    group = f"g-{topic}"
    hung = hung_changelog_transaction(kafka_bootstrap, group, topic, 1)
    produce_raw(kafka_bootstrap, topic, events_on(0, "zero", 50) + events_on(1, "one", 50))

    handler = Calls()
    consumer = DedupeConsumer(
        handler, consumer_settings(kafka_bootstrap, topic, group, tmp_path / "s")
    )
    with captured_logs() as logs, running_consumer(consumer) as runner:
        wait_for(lambda: len(handler.ids(0)) == 50, 60, "partition 0 decided")
        # Longer than max.poll.interval.ms with partition 1's restore still waiting:
        # a restore in the assignment callback would have cost the membership.
        time.sleep(MAX_POLL_INTERVAL_MS / 1000 + 2)
        assert handler.ids(1) == [], "decided before its state was restored"
        aborted_at = time.monotonic()
        hung.abort_transaction(30)
        wait_for(lambda: len(handler.ids(1)) == 50, 60, "partition 1 decided")
        before_stop = len(logs)
    assert not runner.is_alive()
    assert sorted(handler.ids()) == sorted(
        [f"zero-{i}" for i in range(50)] + [f"one-{i}" for i in range(50)]
    )  # each once
    assert min(t for t, p, _ in handler.calls if p == 1) >= aborted_at
    events = [e["event"] for e in logs[:before_stop]]
    assert "max_poll_interval_exceeded" not in events
    assert "changelog_open_transaction" in events
    assert events.count("partitions_assigned") == 2  # partition 0 at once, 1 once restored
    assert "revoked" not in events and "partitions_lost" not in events


def test_a_revocation_stops_a_waiting_restore_and_the_new_owner_decides(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """Both partitions' restores wait; a second member joins, so the first loses one of
    them, whichever the assignor picks: that restore is stopped, not left running."""
    topic = kafka_topic(partitions=2)
    group = f"g-{topic}"
    hung = hung_changelog_transaction(kafka_bootstrap, group, topic, 0, 1)
    produce_raw(kafka_bootstrap, topic, events_on(0, "zero", 20) + events_on(1, "one", 20))

    first, second = Calls(), Calls()
    a = DedupeConsumer(first, consumer_settings(kafka_bootstrap, topic, group, tmp_path / "a"))
    b = DedupeConsumer(second, consumer_settings(kafka_bootstrap, topic, group, tmp_path / "b"))
    threads = [ConsumerThread(a), ConsumerThread(b)]
    with captured_logs() as logs:
        threads[0].start()
        try:
            wait_for(
                lambda: sum(e["event"] == "changelog_open_transaction" for e in logs) >= 2,
                60,
                "both restores of the first member waiting",
            )
            threads[1].start()  # a rebalance while both partitions are being restored
            wait_for(
                lambda: any(e["event"] == "restore_stopped" for e in logs),
                60,
                "the restore of the partition that moved stopped",
            )
            assert first.ids() == [] and second.ids() == []  # nothing before the state
            hung.abort_transaction(30)
            wait_for(lambda: len(first.ids()) + len(second.ids()) >= 40, 90, "all decided")
            time.sleep(2)  # nothing more arrives: a second call would show here
        finally:
            a.stop()
            b.stop()
            for t in threads:
                t.join(60)
    assert not any(t.is_alive() for t in threads)
    everything = first.ids() + second.ids()
    assert sorted(everything) == sorted(
        [f"zero-{i}" for i in range(20)] + [f"one-{i}" for i in range(20)]
    )
    assert not any(e["event"] == "restore_not_stopped" for e in logs)
