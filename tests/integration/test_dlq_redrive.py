"""``dedupe-consumer dlq list|redrive``: a dead-lettered event comes back, handled at most once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dedupe_consumer import DedupeConsumer, Event, Handler, PermanentError, Settings
from dedupe_consumer.cli import app
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..faults.consumer_process import write_config
from ..kafka_helpers import end_offsets, produce_raw
from .test_emit import run_to_end

pytestmark = pytest.mark.kafka
runner = CliRunner()


class Refusing(Handler):
    """Refuses the IDs in ``refuse`` for good (until they are taken out)."""

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.lock = threading.Lock()
        self.handled: list[str] = []
        self.headers: dict[str, dict[str, bytes | None]] = {}

    def handle(self, event: Event) -> None:
        if event.id in self.refuse:
            raise PermanentError("the downstream refused it")
        with self.lock:
            self.handled.append(event.id)
            self.headers[event.id] = dict(event.headers)


def test_redriven_letters_are_handled_once_then_are_duplicates(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=2)
    dlq = kafka_topic(partitions=1, name=f"{topic}.dlq")
    ids = [f"r{n}" for n in range(6)]
    produce_raw(
        kafka_bootstrap,
        topic,
        [
            *(
                {
                    "key": i.encode(),
                    "value": f'{{"n": "{i}"}}'.encode(),
                    "headers": [("event-id", i.encode()), ("trace", b"t-" + i.encode())],
                }
                for i in ids
            ),
            {"key": b"x", "value": b"{}", "headers": [("trace", b"no-id")]},  # missing-id
        ],
    )
    produce_raw(kafka_bootstrap, dlq, [{"key": b"k", "value": b"not a letter"}])
    config = write_config(tmp_path, kafka_bootstrap, topic)
    settings = Settings.from_toml(config)
    handler = Refusing({"r1", "r3"})
    run_to_end(DedupeConsumer(handler, settings), 7)
    assert sorted(handler.handled) == ["r0", "r2", "r4", "r5"]

    listed = runner.invoke(app, ["dlq", "list", "-c", str(config)])
    assert listed.exit_code == 0, listed.output
    assert "3 dead letters" in listed.output and "1 messages without dlq.* headers" in listed.output
    assert "permanent-error: 2" in listed.output and "missing-id: 1" in listed.output
    only = runner.invoke(app, ["dlq", "list", "-c", str(config), "--event-id", "r3"])
    assert "1 dead letters" in only.output and "id='r3'" in only.output

    before = end_offsets(kafka_bootstrap, topic, 2)
    dry = runner.invoke(
        app, ["dlq", "redrive", "-c", str(config), "--reason", "permanent-error", "--dry-run"]
    )
    assert dry.exit_code == 0, dry.output
    assert f"would redrive 2 letters to {topic} (2)" in dry.output
    missing = runner.invoke(
        app,
        ["dlq", "redrive", "-c", str(config), "--to-topic", "no-such-topic-x1", "--yes"],
    )
    assert missing.exit_code == 2 and "Nothing was sent" in missing.output
    assert end_offsets(kafka_bootstrap, topic, 2) == before, "a refused redrive sent something"

    args = ["dlq", "redrive", "-c", str(config), "--reason", "permanent-error", "--yes"]
    sent = runner.invoke(app, args)
    assert sent.exit_code == 0, sent.output
    assert "redrove 2 letters" in sent.output

    handler.refuse.clear()  # the downstream is fixed
    handler.handled.clear()
    second = DedupeConsumer(handler, settings)
    run_to_end(second, 2)
    assert sorted(handler.handled) == ["r1", "r3"]  # eligible once more, handled
    redriven = handler.headers["r3"]
    assert redriven["trace"] == b"t-r3" and redriven["event-id"] == b"r3"  # as produced
    assert (redriven["dedupe.redrive"] or b"").startswith(f"{topic}.dlq/0/".encode())
    assert not any(name.startswith("dlq.") for name in redriven)

    again = runner.invoke(app, args)  # the same letters, redriven twice
    assert again.exit_code == 0, again.output
    third = DedupeConsumer(handler, settings)
    run_to_end(third, 2)
    assert sorted(handler.handled) == ["r1", "r3"], "a letter redriven twice was handled twice"
    assert third.totals.duplicates == 2
