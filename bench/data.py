"""The data set every contender reads: produced once per run, to one topic.

Each message carries its event ID three times, the way real producers do: as
the ``event-id`` header (what dedupe_consumer reads by default), as the key
(so one ID always lands on one partition, which every per-partition store
needs, Quix's included) and inside a ~200-byte JSON body. A duplicate repeats
an earlier ID *with the same body*: producer retries and replays resend the
same bytes, and a body that differed would be a conflicting duplicate, which
dedupe_consumer logs one line for and so would be measured doing extra work.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from dataclasses import dataclass

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from rich.progress import Progress

PARTITIONS = 8
BODY_BYTES = 200
_BODY_PREFIX_BYTES = 151  # the body below with an empty note


@dataclass(frozen=True, slots=True)
class DataSet:
    topic: str
    events: int
    unique: int
    duplicates: float


def body_for(event_id: str) -> bytes:
    """The JSON value of ``event_id``: a function of the ID alone, exactly 200 bytes."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
    n = int.from_bytes(digest, "big")
    note = "x" * (BODY_BYTES - _BODY_PREFIX_BYTES)
    body = (
        f'{{"id":"{event_id}","account":"acct-{n % 100_000:05d}",'
        f'"amount_cents":{1000 + n % 9000},"currency":"EUR",'
        f'"created_at":"2025-01-01T00:00:00Z","note":"{note}"}}'
    )
    return body.encode()


def produce(bootstrap: str, topic: str, events: int, duplicates: float, seed: int) -> DataSet:
    """Create ``topic`` (8 partitions) and write ``events`` messages; return what it holds.

    A fraction ``duplicates`` of the messages repeat an ID drawn uniformly from
    all earlier ones, so a repeat may sit in the same batch as its first copy
    or hundreds of thousands of offsets later (a store lookup, not a cache hit).
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result()
    rng = random.Random(seed)
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
        }
    )
    ids: list[str] = []
    with Progress(transient=True) as bar:
        task = bar.add_task("producing", total=events)
        for n in range(events):
            if ids and rng.random() < duplicates:
                event_id = ids[rng.randrange(len(ids))]
            else:
                event_id = str(uuid.UUID(int=rng.getrandbits(128)))
                ids.append(event_id)
            while True:
                try:
                    producer.produce(
                        topic,
                        key=event_id.encode(),
                        value=body_for(event_id),
                        headers=[("event-id", event_id.encode())],
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
            if n % 20_000 == 0:
                producer.poll(0)
                bar.update(task, completed=n)
        remaining = producer.flush(300)
    if remaining:
        raise RuntimeError(f"{remaining} messages were not delivered to {topic}")
    return DataSet(topic, events, len(ids), duplicates)


def delete_topics_containing(bootstrap: str, token: str) -> list[str]:
    """Delete every topic whose name contains ``token`` (the data set, changelogs, DLQs).

    Only needed on a broker we did not start: our own broker is deleted whole.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    names = [t for t in admin.list_topics(timeout=30).topics if token in t]
    if names:
        for future in admin.delete_topics(names, operation_timeout=30).values():
            try:
                future.result()
            except Exception:  # already gone, or being deleted: nothing to clean
                continue
    return names
