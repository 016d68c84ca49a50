"""Assignment, revocation and commit logs carry plain, stable values (issue 11).

No ``TopicPartition(topic=...)`` reprs, no ``-1001`` (librdkafka's "invalid offset"
marker), no ``KafkaError{code=...}`` strings: what a log pipeline can index.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError

from dedupe_consumer import DedupeConsumer, Event, Handler
from dedupe_consumer.kafka.logs import kafka_error_fields, plain_offset
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import produce_events, settings_for
from ..log_capture import captured_logs

pytestmark = pytest.mark.kafka

OURS = ("assigned", "revoked", "partitions_lost", "commit_failed", "consumer_error", "stopped")


class Quiet(Handler):
    def handle(self, event: Event) -> None:
        pass


def _negative_ints(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value] if value < 0 else []
    if isinstance(value, dict):
        return [n for v in value.values() for n in _negative_ints(v)]
    if isinstance(value, list | tuple):
        return [n for v in value for n in _negative_ints(v)]
    return []


def _run(settings: Any, consumed: int) -> list[dict[str, Any]]:
    consumer = DedupeConsumer(Quiet(), settings)
    deadline = time.monotonic() + 60
    with captured_logs() as logs:
        consumer.run(
            until=lambda t: t.consumed >= consumed or time.monotonic() > deadline,
            install_signal_handlers=False,
        )
    return [dict(e) for e in logs if e["event"] in OURS]


def _plain(events: list[dict[str, Any]]) -> None:
    for event in events:
        text = json.dumps(event)  # no default=: every key a str, every value JSON-native
        assert "TopicPartition" not in text, text
        assert "KafkaError{" not in text, text
        assert _negative_ints(event) == [], text


def test_assignment_and_revocation_logs_are_plain(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=2)
    produce_events(kafka_bootstrap, topic, 20, duplicates=0.0)
    settings = settings_for(kafka_bootstrap, topic, tmp_path / "state")

    first = _run(settings, 20)
    _plain(first)
    # One line per set of partitions whose restore ended at one poll (the restores run
    # beside the loop): a new group has no commit, so both start at auto.offset.reset.
    starts = [s for e in first if e["event"] == "assigned" for s in e["partitions"]]
    assert sorted(starts, key=lambda s: str(s["partition"])) == [
        {"partition": f"{topic}[0]", "offset": None, "from": "auto.offset.reset"},
        {"partition": f"{topic}[1]", "offset": None, "from": "auto.offset.reset"},
    ]
    assert [e["partitions"] for e in first if e["event"] == "revoked"] == [
        [f"{topic}[0]", f"{topic}[1]"]
    ]

    produce_events(kafka_bootstrap, topic, 4, duplicates=0.0, seed=2)
    second = _run(settings, 4)  # same store: each partition resumes after its watermark
    _plain(second)
    starts = [s for e in second if e["event"] == "assigned" for s in e["partitions"]]
    assert len(starts) == 2
    assert {s["from"] for s in starts} == {"watermark"}
    assert sum(s["offset"] for s in starts) == 20  # watermark + 1 of both partitions
    [stopped] = [e for e in second if e["event"] == "stopped"]
    assert stopped["consumed"] == 4


def test_kafka_errors_and_offsets_are_logged_as_plain_text() -> None:
    error = KafkaError(KafkaError.REBALANCE_IN_PROGRESS)
    assert kafka_error_fields(error) == {
        "error": error.str(),
        "error_code": "REBALANCE_IN_PROGRESS",
    }
    assert "{" not in kafka_error_fields(error)["error"]
    assert kafka_error_fields(ValueError("x")) == {"error": "x", "error_code": "ValueError"}
    assert [plain_offset(o) for o in (-1001, -1, 0, 7, None)] == [None, None, 0, 7, None]
