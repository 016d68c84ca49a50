"""Record a real topic, replay it through the engine, re-produce it into Kafka."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest
import structlog
from confluent_kafka import Consumer, Message, Producer
from typer.testing import CliRunner

from dedupe_consumer import DedupeConsumer, Event, Handler, PermanentError
from dedupe_consumer.cli import app
from dedupe_consumer.kafka import recording as recorder_module
from dedupe_consumer.models import header_pairs
from dedupe_consumer.replay import Record, read_recording, record_topic, replay_recording
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import (
    admin,
    committed_offsets,
    end_offsets,
    headers_of,
    produce_events,
    produce_raw,
    read_all,
    settings_for,
    wait_for,
)

pytestmark = pytest.mark.kafka


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The commands configure structlog to print to the sys.stderr of the moment, which
    CliRunner replaces and then closes; later log lines in this process must not go there."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


BASE_TS = 1_717_200_000_000

# (partition, key, value, headers): every encoding case the format has.
AWKWARD: list[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = [
    (0, b"text-key", b'{"id": "1"}', [("event-id", b"1"), ("trace", b"a"), ("trace", b"b")]),
    (0, b"\x00\xff\xfe", bytes(range(256)), [("sig", b"\x80\x81"), ("null", None), ("e", b"")]),
    (0, b"k", b"v", [("trace", b"x"), ("event-id", b"2"), ("trace", b"x")]),
    (1, None, None, []),
    (1, b"", b"", [("\u00fc", "\u00df".encode())]),
    (2, "ключ".encode(), "zürich\n\t\u2028 ✓".encode(), [("event-id", b"3")]),
    (2, b"\xc0\xaf", b"\xed\xa0\x80", [("bin", b"\xc0\xaf")]),  # overlong / surrogate: not UTF-8
]


def produce_awkward(bootstrap: str, topic: str) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for n, (partition, key, value, headers) in enumerate(AWKWARD):
        producer.produce(
            topic,
            key=key,
            value=value,
            headers=list[tuple[str, str | bytes | None]](headers),
            partition=partition,
            timestamp=BASE_TS + n,
        )
    assert producer.flush(30) == 0


def as_tuple(message: Message | Record) -> tuple[Any, ...]:
    """Everything the format must keep, in comparable form."""
    return (
        message.partition(),
        message.offset(),
        message.key(),
        message.value(),
        header_pairs(message),
        message.timestamp()[1],
    )


def content(message: Message | Record) -> tuple[Any, ...]:
    """As :func:`as_tuple`, without where it landed."""
    return as_tuple(message)[2:]


def record_cli(*args: str) -> str:
    result = CliRunner().invoke(app, ["record", *args])
    assert result.exit_code == 0, result.output
    return result.stderr


def read_sorted(bootstrap: str, topic: str, expect: int) -> list[Message]:
    found = read_all(bootstrap, topic, expect)
    assert len(found) == expect
    return sorted(found, key=lambda m: (m.partition() or 0, m.offset() or 0))


def test_record_round_trip_is_byte_exact(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=3)
    produce_awkward(kafka_bootstrap, topic)
    out = tmp_path / "rec.jsonl"

    said = record_cli("-b", kafka_bootstrap, "-t", topic, "--until-end", "--out", str(out))

    assert f"recorded {len(AWKWARD)} message(s)" in said
    recording = read_recording(out)
    assert recording.header.topic == topic
    assert recording.header.partitions == 3
    assert recording.header.extra["end_offsets"] == {"0": 3, "1": 2, "2": 2}
    recorded = sorted(recording.records, key=lambda r: (r.partition_, r.offset_))
    consumed = read_sorted(kafka_bootstrap, topic, len(AWKWARD))
    assert [as_tuple(r) for r in recorded] == [as_tuple(m) for m in consumed]
    # and what Kafka holds is what was produced: nulls, repeats and order included
    assert [(p, k, v, h) for p, k, v, h in AWKWARD] == [
        (r.partition_, r.key_, r.value_, header_pairs(r)) for r in recorded
    ]
    assert [r.timestamp() for r in recorded] == [(1, BASE_TS + n) for n in range(len(AWKWARD))]
    assert not Path(str(out) + ".partial").exists()


def test_record_partition_from_time_gzip_max_messages_and_latest(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=2)
    start = int(time.time() * 1000) - 3_600_000
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for n in range(20):
        producer.produce(topic, value=f"p0-{n}".encode(), partition=0, timestamp=start + n * 1000)
    for n in range(5):
        producer.produce(topic, value=f"p1-{n}".encode(), partition=1, timestamp=start + n * 1000)
    assert producer.flush(30) == 0

    since = datetime.fromtimestamp((start + 10_000) / 1000, tz=UTC).isoformat()
    gz = tmp_path / "from-time.jsonl.gz"
    record_cli(
        "-b", kafka_bootstrap, "-t", topic, "-p", "0", "--from", since, "--until-end",
        "--out", str(gz),
    )  # fmt: skip
    assert gz.read_bytes()[:2] == b"\x1f\x8b"
    recording = read_recording(gz)
    assert [(r.partition_, r.offset_) for r in recording.records] == [(0, n) for n in range(10, 20)]
    assert recording.header.extra["selected_partitions"] == [0]
    assert recording.header.extra["start_offsets"] == {"0": 10}  # found by offsets_for_times

    capped = tmp_path / "capped.jsonl"
    said = record_cli("-b", kafka_bootstrap, "-t", topic, "--max-messages", "7", "-o", str(capped))
    assert "--max-messages reached" in said
    assert len(read_recording(capped).records) == 7

    latest = tmp_path / "latest.jsonl"
    began = time.monotonic()
    record_cli(
        "-b", kafka_bootstrap, "-t", topic, "--from", "latest", "--until-end", "-o", str(latest)
    )
    assert read_recording(latest).records == []
    assert time.monotonic() - began < 30


def test_record_errors_exit_2(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    runner = CliRunner()
    out = str(tmp_path / "x.jsonl")
    missing = runner.invoke(
        app, ["record", "-b", kafka_bootstrap, "-t", "no-such-topic-x1", "-o", out]
    )
    assert missing.exit_code == 2 and "cannot record topic 'no-such-topic-x1'" in missing.stderr
    partition = runner.invoke(
        app, ["record", "-b", kafka_bootstrap, "-t", topic, "-p", "4", "-o", out]
    )
    assert partition.exit_code == 2 and "no partition 4" in partition.stderr
    owned = runner.invoke(
        app, ["record", "-b", kafka_bootstrap, "-t", topic, "-X", "group.id=mine", "-o", out]
    )
    assert owned.exit_code == 2 and "group.id cannot be set" in owned.stderr
    assert not Path(out).exists()
    nowhere = str(tmp_path / "no" / "such" / "dir" / "x.jsonl")
    unwritable = runner.invoke(app, ["record", "-b", kafka_bootstrap, "-t", topic, "-o", nowhere])
    assert unwritable.exit_code == 2 and "cannot write" in unwritable.stderr


def test_ctrl_c_ends_an_open_recording_cleanly(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    produce_events(kafka_bootstrap, topic, 300, duplicates=0.0)  # ~40 KiB: past write buffers
    out = tmp_path / "open.jsonl"
    partial = Path(str(out) + ".partial")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dedupe_consumer", "record", "-b", kafka_bootstrap, "-t", topic,
         "-o", str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: partial.exists() and partial.stat().st_size > 16_384, 60, "records on disk"
        )
        assert not out.exists()  # incomplete: not under the final name yet
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "stopped on request" in stderr
    assert not partial.exists()
    said = re.search(r"recorded (\d+) message", stderr)
    assert said is not None, stderr
    offsets = [r.offset_ for r in read_recording(out).records]
    assert offsets == list(range(int(said.group(1))))  # what it said it wrote, nothing lost
    assert len(offsets) > 50


class SpyConsumer(Consumer):
    """The real consumer, noting the calls that would make the recorder visible."""

    made: ClassVar[list[SpyConsumer]] = []

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.config = config
        self.calls: list[str] = []
        SpyConsumer.made.append(self)

    def subscribe(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("subscribe")
        super().subscribe(*args, **kwargs)

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("commit")
        return super().commit(*args, **kwargs)


def test_until_end_stops_at_the_end_offsets_taken_at_start_and_leaves_no_trace(
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = kafka_topic(partitions=2)
    produce_events(kafka_bootstrap, topic, 300, duplicates=0.0)
    keep_producing = threading.Event()
    keep_producing.set()

    def producer_loop() -> None:  # the topic stays busy while it is recorded
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 1})
        n = 0
        while keep_producing.is_set():
            producer.produce(topic, key=str(n).encode(), value=b"late")
            producer.poll(0.002)
            n += 1
        producer.flush(30)

    busy = threading.Thread(target=producer_loop)
    busy.start()
    SpyConsumer.made.clear()
    monkeypatch.setattr(recorder_module, "Consumer", SpyConsumer)
    try:
        time.sleep(0.3)
        summary = record_topic(kafka_bootstrap, topic, tmp_path / "r.jsonl", until_end=True)
        assert summary.end_offsets is not None
        ends = summary.end_offsets
        wait_for(
            lambda: sum(end_offsets(kafka_bootstrap, topic, 2).values()) > sum(ends.values()),
            30,
            "the producer to pass the recorded end",
        )
    finally:
        keep_producing.clear()
        busy.join(60)

    assert summary.stopped_by == "end"
    assert sum(ends.values()) >= 300
    records = read_recording(summary.path).records
    for p in (0, 1):
        assert [r.offset_ for r in records if r.partition_ == p] == list(range(ends[p]))
    # never joined a group, never committed: nothing for the real consumers to notice
    (spy,) = SpyConsumer.made
    assert spy.calls == []
    assert spy.config["enable.auto.commit"] is False
    assert all(
        offset < 0
        for offset in committed_offsets(kafka_bootstrap, summary.group_id, topic, 2).values()
    )
    groups = admin(kafka_bootstrap).list_consumer_groups().result(30).valid
    assert summary.group_id not in {g.group_id for g in groups}


def test_to_topic_reproduces_keys_values_headers_timestamps_and_partitions(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    source = kafka_topic(partitions=3)
    produce_awkward(kafka_bootstrap, source)
    out = tmp_path / "rec.jsonl.gz"
    record_cli("-b", kafka_bootstrap, "-t", source, "--until-end", "-o", str(out))
    recorded = sorted(read_recording(out).records, key=lambda r: (r.partition_, r.offset_))

    same = kafka_topic(partitions=3)
    result = CliRunner().invoke(
        app, ["replay", str(out), "--to-topic", same, "--bootstrap-servers", kafka_bootstrap]
    )
    assert result.exit_code == 0, result.output
    assert "original partitions" in result.stderr
    copied = read_sorted(kafka_bootstrap, same, len(AWKWARD))
    assert [as_tuple(m) for m in copied] == [as_tuple(r) for r in recorded]

    fewer = kafka_topic(partitions=2)
    result = CliRunner().invoke(
        app, ["replay", str(out), "--to-topic", fewer, "-b", kafka_bootstrap]
    )
    assert result.exit_code == 0, result.output
    assert "partitions chosen by key" in result.stderr
    moved = read_all(kafka_bootstrap, fewer, len(AWKWARD))
    assert Counter(repr(content(m)) for m in moved) == Counter(repr(content(r)) for r in recorded)
    by_key: dict[bytes, set[int | None]] = {}
    for m in moved:
        key = m.key()
        if key is not None:
            by_key.setdefault(key, set()).add(m.partition())
    assert all(len(partitions) == 1 for partitions in by_key.values())

    missing = CliRunner().invoke(
        app, ["replay", str(out), "--to-topic", "no-such-topic-y2", "-b", kafka_bootstrap]
    )
    assert (
        missing.exit_code == 1 and "target topic 'no-such-topic-y2' is unusable" in missing.stderr
    )


class CountCalls(Handler):
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def handle(self, event: Event) -> None:
        self.calls[event.id] += 1


def test_replay_of_a_recorded_topic_matches_the_real_consumer(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=3)
    sent = produce_events(kafka_bootstrap, topic, 600, duplicates=0.2, seed=4)
    out = tmp_path / "rec.jsonl"
    record_cli("-b", kafka_bootstrap, "-t", topic, "--until-end", "-o", str(out))

    settings = settings_for(kafka_bootstrap, topic, tmp_path / "live")
    live = DedupeConsumer(CountCalls(), settings)
    deadline = time.monotonic() + 60
    live.run(
        until=lambda t: t.consumed >= len(sent) or time.monotonic() > deadline,
        install_signal_handlers=False,
    )

    handler = CountCalls()
    report = replay_recording(handler, out, state_dir=tmp_path / "replay")
    assert report.ok, report.to_json()
    assert report.handled_ids == report.unique_ids == set(sent)
    assert (report.handled, report.duplicates, report.dead_lettered) == (
        live.totals.handled,
        live.totals.duplicates,
        live.totals.dead_lettered,
    )
    assert report.handled == len(set(sent))

    stressed = replay_recording(
        CountCalls, out, inject_duplicates=0.3, redeliver_batches=True, seed=9,
        state_dir=tmp_path / "stressed",
    )  # fmt: skip
    assert stressed.ok, stressed.to_json()
    assert stressed.handled_ids == stressed.unique_ids == set(sent)
    assert stressed.injected == 180
    assert stressed.replays == stressed.events == 780


class RejectPoison(Handler):
    def handle(self, event: Event) -> None:
        if event.id.startswith("poison"):
            raise PermanentError("rejected on purpose")


def test_redriving_a_recorded_dead_letter_topic_keeps_each_letters_original_partition(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """Dedupe state is per partition: a redriven dead letter must go back where it came from."""
    topic = kafka_topic(partitions=3)
    dlq = kafka_topic(partitions=1, name=f"{topic}.dlq")
    items: list[dict[str, Any]] = [
        {"key": f"ok-{n}".encode(), "value": b"{}", "partition": n % 3,
         "headers": [("event-id", f"ok-{n}".encode())]}
        for n in range(6)
    ]  # fmt: skip
    items += [
        {"key": b"k", "value": b"{}", "partition": 2, "headers": [("event-id", b"poison-2")]},
        {"key": b"k", "value": b"{}", "partition": 1, "headers": [("event-id", b"poison-1")]},
    ]
    produce_raw(kafka_bootstrap, topic, items)
    consumer = DedupeConsumer(RejectPoison(), settings_for(kafka_bootstrap, topic, tmp_path / "s"))
    deadline = time.monotonic() + 60
    consumer.run(
        until=lambda t: t.consumed >= len(items) or time.monotonic() > deadline,
        install_signal_handlers=False,
    )
    assert consumer.totals.dead_lettered == 2

    out = tmp_path / "dlq.jsonl"
    record_cli("-b", kafka_bootstrap, "-t", dlq, "--until-end", "-o", str(out))
    target = kafka_topic(partitions=3)
    result = CliRunner().invoke(
        app, ["replay", str(out), "--to-topic", target, "-b", kafka_bootstrap]
    )
    assert result.exit_code == 0, result.output
    assert "2 dead letter(s) back to their dlq.original.partition" in result.stderr
    placed = {
        headers_of(m)["event-id"]: m.partition() for m in read_all(kafka_bootstrap, target, 2)
    }
    assert placed == {b"poison-2": 2, b"poison-1": 1}

    too_few = kafka_topic(partitions=2)
    refused = CliRunner().invoke(
        app, ["replay", str(out), "--to-topic", too_few, "-b", kafka_bootstrap]
    )
    assert refused.exit_code == 1
    assert "dead letter from partition 2" in refused.stderr
    assert "--ignore-dlq-partition" in refused.stderr
    forced = CliRunner().invoke(
        app,
        [
            "replay",
            str(out),
            "--to-topic",
            too_few,
            "-b",
            kafka_bootstrap,
            "--ignore-dlq-partition",
        ],
    )
    assert forced.exit_code == 0, forced.output
