"""The README's commands, run as written on a real broker.

Only what names the broker and the topic changes: ``-b``/``--bootstrap-servers``
and ``-t``/``--to-topic`` values, or the ``DEDUPE_*`` variables the README
documents for overriding ``config/consumer.toml``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from dedupe_consumer.replay import read_recording
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import wait_for
from ..unit.test_readme_examples import RECORDING, ROOT, cli_commands, fenced_blocks

pytestmark = pytest.mark.kafka


def quickstart_commands() -> list[list[str]]:
    """The Quickstart's two ways to run ChargeHandler, as the README writes them."""
    script = [
        shlex.split(line)
        for block in fenced_blocks("bash")
        for line in block.splitlines()
        if line.startswith("python examples/quickstart/")
    ]
    cli = [a for a in cli_commands() if a[1] == "run" and "examples.quickstart" in " ".join(a)]
    assert len(script) == 1 and len(cli) == 1, (script, cli)
    return [script[0], cli[0]]


def executable(argv: list[str]) -> list[str]:
    """``python``/``dedupe-consumer`` of this interpreter, the rest as written."""
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    assert argv[0] == "dedupe-consumer", argv
    return [sys.executable, "-m", "dedupe_consumer", *argv[1:]]


def with_option(argv: list[str], names: tuple[str, ...], value: str) -> list[str]:
    (at,) = [i for i, arg in enumerate(argv) if arg in names]
    return [*argv[: at + 1], value, *argv[at + 2 :]]


def charges(database: Path) -> list[tuple[Any, ...]]:
    if not database.exists():
        return []
    with sqlite3.connect(database) as db:
        try:
            return db.execute("SELECT idempotency_key, amount_cents FROM charges").fetchall()
        except sqlite3.OperationalError:  # the table is not there yet
            return []


def stopped_totals(output: str) -> dict[str, int]:
    """The totals of the console log's ``stopped`` line."""
    for line in output.splitlines():
        if " stopped " in line:
            return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
    raise AssertionError(f"no 'stopped' line in:\n{output[-3000:]}")


@pytest.mark.parametrize("which", ["script", "cli"])
def test_the_quickstart_runs_as_written(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path, which: str
) -> None:
    argv = quickstart_commands()[0 if which == "script" else 1]
    topic = kafka_topic(partitions=1)  # one partition: the last event is decided last
    first, second, last = (str(uuid.uuid4()) for _ in range(3))
    events = [(first, 100), (second, 200), (first, 100), ("refund", -50), (second, 200)]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for event_id, cents in [*events, (last, 300)]:
        value = json.dumps({"account": "acct-1", "amount_cents": cents})
        producer.produce(topic, key="acct-1", value=value, headers=[("event-id", event_id)])
    assert producer.flush(10) == 0

    database = tmp_path / "charges.sqlite3"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    env |= {
        "CHARGES_DB": str(database),
        "DEDUPE_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "DEDUPE_KAFKA__GROUP_ID": f"{topic}-group",
        "DEDUPE_KAFKA__TOPICS": json.dumps([topic]),
        "DEDUPE_STORE__PATH": str(tmp_path / "state"),
        "DEDUPE_PROCESSING__DEAD_LETTER_TOPIC": f"{topic}.dlq",
    }
    proc = subprocess.Popen(
        executable(argv),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(
            lambda: len(charges(database)) >= 3 or proc.poll() is not None, 90, "three charges"
        )
        assert proc.poll() is None, "the consumer died (see its output below)"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)

    assert proc.returncode == 0, output[-3000:]
    assert sorted(charges(database)) == sorted([(first, 100), (second, 200), (last, 300)])
    totals = stopped_totals(output)
    assert (totals["handled"], totals["duplicates"], totals["dead_lettered"]) == (3, 2, 1)


def test_record_and_to_topic_commands_run_as_written(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """``replay --to-topic`` puts the example recording into a topic; ``record`` gets it back."""
    commands = cli_commands()
    (to_topic,) = [a for a in commands if a[1] == "replay" and "--to-topic" in a]
    (record,) = [a for a in commands if a[1] == "record"]
    topic = kafka_topic(partitions=read_recording(RECORDING).header.partitions)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}

    def run(argv: list[str], cwd: Path) -> None:
        argv = with_option(argv, ("-b", "--bootstrap-servers"), kafka_bootstrap)
        result = subprocess.run(
            executable(argv),
            check=False,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    sent, received = tmp_path / "sent", tmp_path / "received"
    sent.mkdir()
    received.mkdir()
    (sent / "payments.jsonl").write_bytes(RECORDING.read_bytes())
    run(with_option(to_topic, ("--to-topic",), topic), sent)
    run(with_option(record, ("-t", "--topic"), topic), received)

    def messages(path: Path) -> list[tuple[Any, ...]]:
        # The recorder interleaves partitions in the order the broker answers: compare
        # each partition's messages in offset order.
        records = sorted(read_recording(path).records, key=lambda r: (r.partition(), r.offset()))
        return [
            (r.partition(), r.offset(), r.key(), r.value(), r.headers(), r.timestamp())
            for r in records
        ]

    assert messages(received / "payments.jsonl") == messages(RECORDING)
