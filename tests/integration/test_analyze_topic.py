"""``dedupe-consumer analyze --topic``: the same report from a live topic as from a recording."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dedupe_consumer.cli import app
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import produce_raw

pytestmark = pytest.mark.kafka
runner = CliRunner()


def test_a_topic_is_read_to_its_end_and_measured(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=3)
    # 20 IDs; the first 5 come twice (same payload), a-5 a second time with another payload
    items: list[dict[str, Any]] = [
        {"key": f"k{n}".encode(), "value": b"v", "headers": [("event-id", f"a-{n}".encode())]}
        for n in [*range(20), *range(5)]
    ]
    items += [
        {"key": b"k5", "value": b"other", "headers": [("event-id", b"a-5")]},
        {"key": b"k-none", "value": b"v"},  # no event-id header
    ]
    produce_raw(kafka_bootstrap, topic, items)

    shown = runner.invoke(app, ["analyze", "--topic", topic, "-b", kafka_bootstrap])
    assert shown.exit_code == 0, shown.output
    assert "messages: 27" in shown.output
    assert "unique IDs: 20" in shown.output
    assert "duplicates (same ID, same payload): 5 (18.52%)" in shown.output
    assert "conflicts (same ID, another payload): 1 (3.70%)" in shown.output
    assert "without a usable ID: 1 (3.70%)" in shown.output
    assert "recommended dedupe.retention:" in shown.output

    # The consumer's own config: its connection, and its id_source and retention by default.
    config = tmp_path / "consumer.toml"
    config.write_text(
        f'[kafka]\nbootstrap_servers = "{kafka_bootstrap}"\ngroup_id = "g"\n'
        f'topics = ["{topic}"]\n[dedupe]\nid_source = "key"\nretention = "2h"\n'
        f'[store]\npath = "{tmp_path / "state"}"\n[processing]\ndead_letter_topic = "{topic}.dlq"\n'
    )
    by_key = runner.invoke(app, ["analyze", "--topic", topic, "-c", str(config)])
    assert by_key.exit_code == 0, by_key.output
    assert "unique IDs: 21" in by_key.output  # k0..k19 and k-none
    assert 'with retention 2.0 h and dedupe.scope "partition": 0 of 6 repeats' in by_key.output

    missing = runner.invoke(app, ["analyze", "--topic", f"{topic}-absent", "-b", kafka_bootstrap])
    assert missing.exit_code == 1, missing.output
    assert f"{topic}-absent" in missing.output


def test_topic_needs_a_broker_address() -> None:
    shown = runner.invoke(app, ["analyze", "--topic", "orders"])
    assert shown.exit_code == 2
    assert "--bootstrap-servers or --config" in shown.output
