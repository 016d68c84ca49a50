"""Review of issue 16's operator side against the real broker: failing tests for defects."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from dedupe_consumer import DedupeConsumer, Settings
from dedupe_consumer.cli import app
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..faults.consumer_process import write_config
from ..kafka_helpers import produce_raw, settings_for
from .test_dlq_redrive import Refusing
from .test_emit import run_to_end

pytestmark = pytest.mark.kafka
runner = CliRunner()


def test_a_letter_redriven_twice_to_another_topic_is_handled_at_most_once(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """``dlq redrive`` promises "redriving the same letter twice handles it at most once".
    With ``--to-topic`` it produces with ``partition=None``, and the redrive producer's
    partitioner (``murmur2_random``) puts a message without a key on a random partition.
    Event IDs in a header (``header:event-id``, the default ``id_source``) often come
    without keys. The two copies of one letter then land on different partitions of the
    target topic, and with ``dedupe.scope = "partition"`` (the default) each partition
    has its own records: the second redrive is handled again. A redrive to another topic
    should place every copy of a letter on the same partition (e.g. its original
    partition, or one derived from its event ID), so the second copy is a duplicate."""
    topic = kafka_topic(partitions=1)
    kafka_topic(partitions=1, name=f"{topic}.dlq")
    retry = kafka_topic(partitions=6)
    kafka_topic(partitions=1, name=f"{retry}.dlq")
    ids = [f"k{n}" for n in range(8)]
    produce_raw(
        kafka_bootstrap,
        topic,
        [{"value": f'{{"n": "{i}"}}'.encode(), "headers": [("event-id", i.encode())]} for i in ids],
    )
    (tmp_path / "first").mkdir()
    config = write_config(tmp_path / "first", kafka_bootstrap, topic)
    run_to_end(DedupeConsumer(Refusing(set(ids)), Settings.from_toml(config)), len(ids))

    args = ["dlq", "redrive", "-c", str(config), "--to-topic", retry, "--yes"]
    for _ in range(2):  # the same letters, redriven twice
        sent = runner.invoke(app, args)
        assert sent.exit_code == 0, sent.output
        assert f"redrove {len(ids)} letters" in sent.output, sent.output

    handler = Refusing(set())
    consumer = DedupeConsumer(handler, settings_for(kafka_bootstrap, retry, tmp_path / "retry"))
    run_to_end(consumer, 2 * len(ids))
    assert consumer.totals.consumed == 2 * len(ids)
    twice = sorted({i for i in handler.handled if handler.handled.count(i) > 1})
    assert twice == [], f"redriven twice and handled twice: {twice}"
