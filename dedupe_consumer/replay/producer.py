"""Re-produce a recording into a topic: ``dedupe-consumer replay FILE --to-topic T``.

This is for integration tests of a *real* consumer (any consumer, not only
ours): the recorded traffic goes back to a broker with its keys, values,
headers (order and repeats kept) and timestamps.

Partitions: a message that carries a ``dlq.original.partition`` header (a
recording of a dead-letter topic, redriven by hand) goes back to that
partition, because dedupe state is kept per partition: the same event ID on
another partition would be handled again. If the target has no such partition
the produce fails instead of guessing; ``keep_dead_letter_partition=False``
(``--ignore-dlq-partition``) turns this off. Otherwise, when the target topic
has at least as many partitions as the recorded one, each message goes to its
original partition, so per-partition order and the key-to-partition mapping
are exactly as recorded. Otherwise the original partition may not exist, and
the partitioner chooses by key. We use ``murmur2_random``, the Java client's
algorithm, so keys land where a Java producer would put them (librdkafka's own
default hashes differently).

The producer (:class:`~dedupe_consumer.kafka.recording.RecordingProducer`) is
idempotent with ``acks=all``: a retried send must not become a duplicate the
recording never had, or the test would measure the replay.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dedupe_consumer.errors import DedupeError
from dedupe_consumer.kafka.recording import RecordingProducer, TopicUnavailableError
from dedupe_consumer.replay.format import RecordingReader

Progress = Callable[[int, int | None], None]

_TIMEOUT_S: Final = 30.0


class ProduceError(DedupeError):
    """The target topic is unusable, or a message could not be delivered."""


@dataclass(frozen=True, slots=True)
class ProduceSummary:
    topic: str
    messages: int
    kept_partitions: bool
    """True: every message went to its recorded partition; False: the partitioner chose."""
    dead_letter_partitions: int = 0
    """Messages sent back to the partition named by their ``dlq.original.partition`` header."""


DEAD_LETTER_PARTITION_HEADER: Final = "dlq.original.partition"


def dead_letter_partition(headers: Sequence[tuple[str, str | bytes | None]]) -> int | None:
    """The source partition a dead letter came from, or None for an ordinary message."""
    for name, value in reversed(headers):  # ours are appended after the original headers
        if name == DEAD_LETTER_PARTITION_HEADER and value is not None:
            text = value if isinstance(value, str) else value.decode("ascii", "replace")
            return int(text) if text.isascii() and text.isdigit() else None
    return None


def produce_recording(
    path: str | Path,
    topic: str,
    bootstrap_servers: str,
    *,
    properties: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    keep_dead_letter_partition: bool = True,
) -> ProduceSummary:
    """Produce every message of the recording at ``path`` to ``topic`` and wait for acks."""
    producer = RecordingProducer(bootstrap_servers, properties)
    with RecordingReader(path) as reader:
        target = _partition_count(producer, topic)
        keep = target >= reader.header.partitions
        sent = redriven = 0
        for record in reader:
            kind, ms = record.timestamp()
            partition: int | None = None
            headers = record.headers()
            original = dead_letter_partition(headers) if keep_dead_letter_partition else None
            if original is not None:
                if original >= target:
                    raise ProduceError(
                        f"record at offset {record.offset_} is a dead letter from partition "
                        f"{original}, but {topic!r} has only {target} partition(s): sending it "
                        "elsewhere would bypass its dedupe state; add partitions, or pass "
                        "--ignore-dlq-partition to let the partitioner choose"
                    )
                partition = original
                redriven += 1
            elif keep:
                partition = record.partition_
            producer.send(
                topic,
                record.key_,
                record.value_,
                headers,
                partition=partition,
                timestamp_ms=ms if kind else None,
            )
            sent += 1
            if producer.failures:
                break
            if progress is not None and sent % 1000 == 0:
                progress(sent, None)
        remaining = producer.flush(_TIMEOUT_S)
    if producer.failures:
        raise ProduceError(f"delivery to {topic!r} failed: {producer.failures[0]}")
    if remaining:
        raise ProduceError(
            f"{remaining} message(s) to {topic!r} not acknowledged after {_TIMEOUT_S:.0f} s"
        )
    if progress is not None:
        progress(sent, sent)
    return ProduceSummary(topic, sent, keep, redriven)


def _partition_count(producer: RecordingProducer, topic: str) -> int:
    try:
        return producer.partition_count(topic, _TIMEOUT_S)
    except TopicUnavailableError as exc:
        raise ProduceError(
            f"target topic {topic!r} is unusable ({exc.reason}); create it first, with at least "
            "as many partitions as the recording to keep every message in its partition"
        ) from None
