"""The emit rows' output topic: created before the consumer starts, read back after it stops.

Shared by the dedupe_consumer and the Quix Streams contenders, so it imports
only confluent-kafka (the Quix virtualenv has its own, older copy, see
``bench/setup.sh``) and the standard library.

* :func:`output_topic` names it after the row's consumer group, which carries
  the run's token, so ``bench.data.delete_topics_containing`` removes it with
  the run's other topics on a broker the run did not start.
* :func:`create_like` creates it with the input topic's partition count before
  the clock can start, so neither contender pays for (or races) its creation.
* :func:`read_back` reads it from the beginning with ``isolation.level =
  read_committed`` to each partition's end, after the consumer has stopped:
  what a downstream reader would see. Every output must name its own key's ID
  in its value (each output copies its input's value, keyed by the input's
  key, the event ID), and there must be one output per unique input ID.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic


@dataclass(frozen=True, slots=True)
class ReadBack:
    outputs: int
    """Committed messages in the output topic."""
    ids: int
    """Distinct keys (event IDs) among them."""
    mismatched: int
    """Outputs whose value is not the event of their key (does not start ``{"id":"<key>"``)."""


def output_topic(group: str) -> str:
    """The row's output topic: unique per run and row (the group is), gone with the run."""
    return f"{group}-out"


def create_like(bootstrap: str, topic: str, like: str, timeout_s: float = 30.0) -> None:
    """Create ``topic`` with as many partitions as ``like`` (replication 1) and wait until
    its metadata lists every partition."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    found = admin.list_topics(timeout=timeout_s).topics.get(like)
    if found is None or found.error is not None:
        raise RuntimeError(f"input topic {like!r} not found")
    partitions = len(found.partitions)
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        made = admin.list_topics(timeout=timeout_s).topics.get(topic)
        if made is not None and made.error is None and len(made.partitions) == partitions:
            return
        time.sleep(0.1)
    raise RuntimeError(f"output topic {topic!r} did not appear within {timeout_s:.0f}s")


def read_back(bootstrap: str, topic: str, timeout_s: float = 120.0) -> ReadBack:
    """Read ``topic`` with ``read_committed`` from the start to every partition's end.

    The end is where librdkafka reports ``PARTITION_EOF``: the last stable offset,
    so a transaction still open would stop it short and show as missing outputs.
    Joins no group and commits nothing.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}.read-back",  # required by the client; never joined
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=30).topics[topic]
        partitions = sorted(metadata.partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        at_end: set[int] = set()
        outputs = mismatched = 0
        keys: set[bytes] = set()
        deadline = time.monotonic() + timeout_s
        while len(at_end) < len(partitions):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"read-back of {topic!r}: {len(partitions) - len(at_end)} partitions did "
                    f"not reach their end in {timeout_s:.0f}s ({outputs} outputs read)"
                )
            for message in consumer.consume(10_000, 1.0):
                error = message.error()
                if error is not None:
                    partition = message.partition()
                    if error.code() == KafkaError._PARTITION_EOF and partition is not None:
                        at_end.add(partition)
                        continue
                    raise RuntimeError(f"read-back of {topic!r}: {error}")
                outputs += 1
                key = message.key() or b""
                keys.add(key)
                if not (message.value() or b"").startswith(b'{"id":"' + key + b'"'):
                    mismatched += 1
    finally:
        consumer.close()
    return ReadBack(outputs, len(keys), mismatched)
