"""While a batch is walked, the source reads the next one ahead instead of pausing.

``keep_alive`` polls while handler calls run. Pausing every partition there made
librdkafka drop what it had fetched and fetch again only up to a second after the
resume: a consumer whose batches take longer than a keep-alive (200 ms) lost
0.4-1 s after each one. Now it keeps up to one batch read ahead, and pauses only
past that bound; either way every message comes out once, in order.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dedupe_consumer.kafka.source import KafkaSource
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import NullListener, produce_events, settings_for

pytestmark = pytest.mark.kafka


class _Listener(NullListener):
    pass


def _walk(source: KafkaSource, seconds: float) -> None:
    """What the engine does while handler calls run: keep_alive every 50 ms."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        source.keep_alive()
        time.sleep(0.05)


def test_a_walk_reads_the_next_batch_ahead_without_pausing(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    produce_events(kafka_bootstrap, topic, 50, duplicates=0.0, seed=5)
    settings = settings_for(
        kafka_bootstrap, topic, tmp_path / "state", processing={"batch_size": 500}
    )
    source = KafkaSource(settings, _Listener())
    try:
        first: list[int] = []
        deadline = time.monotonic() + 30
        while len(first) < 50 and time.monotonic() < deadline:
            first.extend(m.offset() or 0 for m in source.poll(500, 0.2))
        assert first == list(range(50))
        produce_events(kafka_bootstrap, topic, 40, duplicates=0.0, seed=6)  # during the walk
        _walk(source, 1.0)
        assert not source._paused, "paused below the read-ahead bound"
        assert [m.offset() for m in source._kept] == list(range(50, 90))
        assert [m.offset() for m in source.poll(500, 0)] == list(range(50, 90))
    finally:
        source.close()


def test_past_one_batch_read_ahead_the_partitions_pause_and_nothing_is_lost(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    produce_events(kafka_bootstrap, topic, 120, duplicates=0.0, seed=5)
    settings = settings_for(
        kafka_bootstrap, topic, tmp_path / "state", processing={"batch_size": 7}
    )
    source = KafkaSource(settings, _Listener())
    try:
        paused: list[bool] = []
        offsets: list[int] = []
        deadline = time.monotonic() + 60
        while len(offsets) < 120 and time.monotonic() < deadline:
            batch = source.poll(7, 0.2)
            assert len(batch) <= 7
            offsets.extend(m.offset() or 0 for m in batch)
            if batch:
                _walk(source, 0.3)
                paused.append(source._paused)
                assert len(source._kept) <= 7 + 1000  # one batch, and what came before the pause
        assert offsets == list(range(120))  # nothing lost, nothing twice, in order
        assert any(paused), "never paused past the read-ahead bound"
    finally:
        source.close()
