"""The async sidecar with its default concurrency (32, key ordering) on a real broker.

* A retry holds only its own key: the target answers 500 to one event's first
  two attempts, and every other event is delivered while it waits.
* Each unique event is POSTed exactly once with 32 POSTs in flight and 10%
  duplicates on the topic, to a target that takes 2 ms per answer.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import committed_offsets, end_offsets, produce_events, produce_raw, wait_for
from .test_sidecar import Target, event, metric, replies, running, sidecar_for

pytestmark = pytest.mark.kafka


def test_an_event_answered_500_twice_does_not_hold_up_the_others(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    ids = [f"e-{n}" for n in range(10)]  # no keys: each event ID is its own lane
    produce_raw(kafka_bootstrap, topic, [event(i, f"v{n}".encode()) for n, i in enumerate(ids)])
    server = Target(replies({b"e-0": [(500, {}, b"boom"), (500, {}, b"boom")]}))
    try:
        # 1 s between e-0's attempts: time enough for the others to be delivered.
        sidecar = sidecar_for(
            kafka_bootstrap,
            topic,
            tmp_path,
            server.url,
            retry_backoff="1s",
            retry_backoff_max="1s",
        )
        assert sidecar.settings.processing.concurrency == 32  # the sidecar's default
        assert sidecar.settings.processing.ordering == "key"
        with running(sidecar):
            wait_for(lambda: len(server.accepted()) == len(ids), 90, "every event delivered")
            wait_for(
                lambda: committed_offsets(kafka_bootstrap, f"g-{topic}", topic, 1) == {0: 10},
                30,
                "offsets committed to the end",
            )
    finally:
        server.close()

    attempts = server.snapshot()
    first = [r for r in attempts if r.key == "e-0"]
    assert [r.status for r in first] == [500, 500, 200]
    others = [r for r in attempts if r.key != "e-0"]
    assert sorted(r.key for r in others) == ids[1:]  # each once
    assert all(r.status == 200 for r in others)
    # Offsets 1..9 were delivered before e-0 (offset 0) got its second answer: the
    # retry held e-0's lane only, not the partition.
    assert max(r.at for r in others) < first[1].at
    assert metric(sidecar, "dedupe_handler_retries_total", topic=topic) == 2
    totals = sidecar.consumer.totals
    assert (totals.handled, totals.dead_lettered, totals.duplicates) == (10, 0, 0)


def test_each_unique_event_is_posted_exactly_once_at_concurrency_32_with_10pct_duplicates(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=3)
    sent = produce_events(kafka_bootstrap, topic, 1000, duplicates=0.1, seed=64)
    unique = set(sent)
    assert len(sent) - len(unique) > 50  # duplicates there are
    server = Target(delay_s=0.002)  # an application that takes 2 ms per answer
    try:
        sidecar = sidecar_for(kafka_bootstrap, topic, tmp_path, server.url)
        assert sidecar.settings.processing.concurrency == 32
        with running(sidecar):
            wait_for(
                lambda: (
                    committed_offsets(kafka_bootstrap, f"g-{topic}", topic, 3)
                    == end_offsets(kafka_bootstrap, topic, 3)
                ),
                120,
                "offsets committed to the end",
            )
    finally:
        server.close()

    posts = Counter(r.key for r in server.snapshot())
    assert set(posts) == unique  # none lost
    assert [k for k, n in posts.items() if n > 1] == []  # none twice
    assert all(r.status == 200 for r in server.snapshot())
    totals = sidecar.consumer.totals
    assert totals.handled == len(unique)
    assert totals.duplicates == len(sent) - len(unique)
    assert totals.dead_lettered == 0
    assert server.peak > 1  # POSTs really were in flight together
    assert server.peak <= 32  # and never more than processing.concurrency
