"""A handler call twice as long as ``max.poll.interval.ms`` costs nothing (issue 13).

The concurrent engine runs handler calls off the consuming thread and keeps
polling with the partitions paused, so the consumer stays in its group however
long one call takes: no revocation, no lost partitions, no
``max_poll_interval_exceeded``, the event handled once and its offset committed.

``max.poll.interval.ms`` is set to 6000, the lowest a stock broker allows here:
librdkafka requires it to be >= ``session.timeout.ms``, and the broker refuses a
session timeout under ``group.min.session.timeout.ms`` (6000 by default).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from dedupe_consumer import DedupeConsumer, Event, Handler
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import committed_offsets, produce_events, settings_for
from ..log_capture import captured_logs

pytestmark = pytest.mark.kafka

MAX_POLL_INTERVAL_MS = 6000
LONG_CALL_S = 2 * MAX_POLL_INTERVAL_MS / 1000


class OneLongCall(Handler):
    """The first event's call takes twice ``max.poll.interval.ms``; the rest are instant.

    While the long call runs, ``during`` is called once (more traffic arrives then).
    """

    def __init__(self, slow_id: str, during: Callable[[], object]) -> None:
        self.slow_id = slow_id
        self.during = during
        self.lock = threading.Lock()
        self.ids: list[str] = []
        self.slow_took_s = 0.0

    def handle(self, event: Event) -> None:
        if event.id == self.slow_id:
            started = time.monotonic()
            threading.Thread(target=self.during, name="second-wave").start()
            time.sleep(LONG_CALL_S)
            self.slow_took_s = time.monotonic() - started
        with self.lock:
            self.ids.append(event.id)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_call_of_twice_max_poll_interval_keeps_the_membership_and_runs_once(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path, concurrency: int
) -> None:
    topic = kafka_topic(partitions=1)
    sent = produce_events(kafka_bootstrap, topic, 20, duplicates=0.0, seed=13)
    settings = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "state",
        kafka={
            "consumer": {
                "max.poll.interval.ms": MAX_POLL_INTERVAL_MS,
                "session.timeout.ms": MAX_POLL_INTERVAL_MS,
                "heartbeat.interval.ms": 500,
            }
        },
        processing={"concurrency": concurrency, "batch_size": 10},
    )
    wave: list[str] = []

    def second_wave() -> None:  # fetched while the partition is paused: kept, not lost
        time.sleep(1)
        wave.extend(produce_events(kafka_bootstrap, topic, 20, duplicates=0.0, seed=14))

    handler = OneLongCall(sent[0], second_wave)
    consumer = DedupeConsumer(handler, settings)
    finishing = threading.Event()  # revocations after this are the close's own
    assigned: list[Sequence[TopicPartition]] = []
    revoked: list[Sequence[TopicPartition]] = []
    lost: list[Sequence[TopicPartition]] = []
    consumer.on_assign(assigned.append)
    consumer.on_revoke(lambda tps: None if finishing.is_set() else revoked.append(tps))
    consumer.on_lost(lost.append)
    group = settings.kafka.group_id
    deadline = time.monotonic() + 90

    def done(_totals: object) -> bool:
        if time.monotonic() > deadline or (
            len(wave) == 20
            and len(handler.ids) >= len(sent) + len(wave)
            and committed_offsets(kafka_bootstrap, group, topic, 1) == {0: len(sent) + 20}
        ):
            finishing.set()
        return finishing.is_set()

    with captured_logs() as logs:
        consumer.run(until=done, install_signal_handlers=False)

    assert handler.slow_took_s >= LONG_CALL_S  # the call really outlived the interval twice
    assert revoked == [] and lost == [], "the long call cost the group membership"
    assert len(assigned) == 1
    exceeded = consumer.metrics.registry.get_sample_value("dedupe_max_poll_interval_exceeded_total")
    assert not exceeded
    assert [e for e in logs if e.get("event") == "max_poll_interval_exceeded"] == []
    # Each event handled exactly once, the long one included, and the second wave
    # that arrived during it; everything committed.
    assert sorted(handler.ids) == sorted(sent + wave)
    assert handler.ids.count(sent[0]) == 1
    assert consumer.totals.handled == len(sent) + len(wave) == 40
    assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: 40}
