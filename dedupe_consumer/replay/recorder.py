"""Record a topic to a file: ``dedupe-consumer record``.

The recorder is a bystander on the topic, so it must leave no trace there: it
reads with :class:`~dedupe_consumer.kafka.recording.TopicReader` (``assign``,
never ``subscribe``, so it joins no group and triggers no rebalance of the real
consumers; a throwaway ``group.id``; it never commits). Recording the same
topic twice therefore starts from the same place both times.

``--until-end`` takes each partition's high watermark once, at start, and stops
there: a recording of a busy topic then has a defined end instead of chasing
the producer forever. A partition also counts as finished when librdkafka
reports partition EOF, because the last offsets below the high watermark may
hold no message at all (transaction markers, compacted records).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import structlog

from dedupe_consumer.kafka.recording import PartitionEnd, TopicReader, TopicUnavailableError
from dedupe_consumer.replay.format import RecordingError, RecordingHeader, RecordingWriter

log = structlog.get_logger("dedupe_consumer.replay")

StartSpec = Literal["earliest", "latest"] | datetime
Progress = Callable[[int, int | None], None]
"""Called as ``progress(recorded, total)``; ``total`` is None when the end is open."""

_METADATA_TIMEOUT_S: Final = 15.0


def parse_start(spec: str) -> StartSpec:
    """``earliest``, ``latest`` or an ISO-8601 time (no zone means UTC); ValueError if not."""
    if spec in ("earliest", "latest"):
        return spec  # type: ignore[return-value]  # narrowed by the membership test
    try:
        when = datetime.fromisoformat(spec)
    except ValueError:
        raise ValueError(
            f"--from {spec!r}: expected 'earliest', 'latest' or an ISO-8601 time such as "
            "'2024-05-01T12:00:00Z'"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(slots=True)
class RecordSummary:
    """What a recording run did."""

    path: Path
    messages: int
    stopped_by: Literal["end", "max-messages", "stop-requested"]
    group_id: str
    """The throwaway group.id (never joined, never committed to)."""
    start_offsets: dict[int, int] = field(default_factory=dict)
    end_offsets: dict[int, int] | None = None


def record_topic(
    bootstrap_servers: str,
    topic: str,
    out: str | Path,
    *,
    partitions: Sequence[int] | None = None,
    start: StartSpec = "earliest",
    max_messages: int | None = None,
    until_end: bool = False,
    properties: Mapping[str, Any] | None = None,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
) -> RecordSummary:
    """Record ``topic`` into ``out`` (gzip when it ends in ``.gz``).

    Stops at the high watermarks taken at start (``until_end``), after
    ``max_messages``, or when ``stop`` is set -- whichever comes first. Without
    any of them it records until ``stop`` is set (Ctrl-C in the CLI).
    """
    out = Path(out)
    if max_messages is not None and max_messages < 1:
        raise ValueError("max_messages must be at least 1")
    consumer = TopicReader(bootstrap_servers, properties)
    try:
        count = _partition_count(consumer, topic, out)
        parts = sorted(set(partitions)) if partitions else list(range(count))
        wrong = [p for p in parts if not 0 <= p < count]
        if wrong:
            raise RecordingError(
                f"topic {topic!r} has {count} partition(s) (0..{count - 1}); "
                f"no partition {', '.join(map(str, wrong))}",
                path=out,
            )
        lows, highs = _watermarks(consumer, topic, parts, out)
        starts = _start_offsets(consumer, topic, parts, start, lows, highs, out)
        ends = highs if until_end else None
        header = RecordingHeader.new(
            topic,
            count,
            recorder="dedupe-consumer",
            **{"from": start if isinstance(start, str) else start.isoformat()},
            selected_partitions=parts,
            start_offsets={str(p): o for p, o in starts.items()},
            end_offsets=None if ends is None else {str(p): o for p, o in ends.items()},
        )
        with RecordingWriter(out, header) as writer:
            stopped_by = _consume(
                consumer, topic, parts, starts, ends, max_messages, stop, progress, writer
            )
        log.info("recorded", topic=topic, messages=writer.messages, path=str(out))
        return RecordSummary(out, writer.messages, stopped_by, consumer.group_id, starts, ends)
    finally:
        consumer.close()


def _consume(
    consumer: TopicReader,
    topic: str,
    parts: list[int],
    starts: dict[int, int],
    ends: dict[int, int] | None,
    max_messages: int | None,
    stop: threading.Event | None,
    progress: Progress | None,
    writer: RecordingWriter,
) -> Literal["end", "max-messages", "stop-requested"]:
    done: set[int] = set()
    total: int | None = None
    if ends is not None:
        done = {p for p in parts if starts[p] >= ends[p]}
        total = sum(max(ends[p] - starts[p], 0) for p in parts)
    if max_messages is not None:
        total = max_messages if total is None else min(total, max_messages)
    consumer.assign(topic, {p: starts[p] for p in parts if p not in done})

    def finish(partition: int) -> None:
        done.add(partition)
        consumer.pause(topic, partition)  # stop fetching past the end

    if progress is not None:
        progress(0, total)
    while True:
        if ends is not None and len(done) == len(parts):
            return "end"
        if max_messages is not None and writer.messages >= max_messages:
            return "max-messages"
        if stop is not None and stop.is_set():
            return "stop-requested"
        wanted = 500 if max_messages is None else min(500, max_messages - writer.messages)
        for message in consumer.read(wanted, 0.5):
            if isinstance(message, PartitionEnd):
                if ends is not None and message.partition not in done:
                    finish(message.partition)  # at the log end, which is >= the end taken at start
                continue
            partition = message.partition() or 0
            offset = message.offset() or 0
            if ends is not None:
                if partition in done:
                    continue
                if offset >= ends[partition]:  # produced after we started
                    finish(partition)
                    continue
            writer.write(message)
            if ends is not None and offset >= ends[partition] - 1:
                finish(partition)
        if progress is not None:
            progress(writer.messages, total)


def _partition_count(consumer: TopicReader, topic: str, out: Path) -> int:
    try:
        return consumer.partition_count(topic, _METADATA_TIMEOUT_S)
    except TopicUnavailableError as exc:
        raise RecordingError(f"cannot record topic {topic!r}: {exc.reason}", path=out) from None


def _watermarks(
    consumer: TopicReader, topic: str, parts: list[int], out: Path
) -> tuple[dict[int, int], dict[int, int]]:
    lows: dict[int, int] = {}
    highs: dict[int, int] = {}
    for p in parts:
        found = consumer.watermarks(topic, p, _METADATA_TIMEOUT_S)
        if found is None:
            raise RecordingError(
                f"timed out reading the offsets of {topic}[{p}] after {_METADATA_TIMEOUT_S:.0f} s",
                path=out,
            )
        lows[p], highs[p] = found
    return lows, highs


def _start_offsets(
    consumer: TopicReader,
    topic: str,
    parts: list[int],
    start: StartSpec,
    lows: dict[int, int],
    highs: dict[int, int],
    out: Path,
) -> dict[int, int]:
    if start == "earliest":
        return dict(lows)
    if start == "latest":
        return dict(highs)
    assert isinstance(start, datetime)
    ms = int(start.timestamp() * 1000)
    starts: dict[int, int] = {}
    for partition, offset, error in consumer.offsets_at(topic, parts, ms, _METADATA_TIMEOUT_S):
        if error is not None:
            raise RecordingError(
                f"cannot look up offsets of {topic}[{partition}] at {start.isoformat()}: {error}",
                path=out,
            )
        # -1: no message at or after that time yet -> start at the end.
        starts[partition] = offset if offset >= 0 else highs[partition]
    return starts
