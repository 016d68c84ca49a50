"""Make ``payments.jsonl``: produce ~50 payment events to a real topic, then record it.

Run once; the output is committed next to the test that replays it::

    python examples/replay_test/make_recording.py                  # starts a local Kafka
    python examples/replay_test/make_recording.py -b localhost:9092 # or uses yours

The events are what a payments topic really carries: most are unique, some are
producer retries (same key, value and headers: the same event sent twice), one
has a binary key, and every one has headers. The recording itself is made by
``dedupe-consumer record``, the command users run against their own topics.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # admin re-exports it without __all__

HERE = Path(__file__).resolve().parent
ACCOUNTS = [
    "acct-anna",
    "acct-bruno",
    "acct-chen",
    "acct-dana",
    "acct-emil",
]  # keys: both partitions
BINARY_KEY = b"\x00\xffacct-legacy\x81"
"""A key written by an old service in a binary format: not UTF-8, so it is stored as base64."""
BASE_TIMESTAMP_MS = 1_717_200_000_000  # fixed: the same run gives the same events


def produce_payments(bootstrap: str, topic: str, unique: int, retries: int, seed: int) -> int:
    """Produce ``unique`` payments plus ``retries`` re-sends of earlier ones; returns the count."""
    rng = random.Random(seed)
    sent: list[tuple[bytes, bytes, list[tuple[str, str | bytes | None]]]] = []
    producer = Producer(
        {"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "log_level": 3}
    )
    retry_at = set(rng.sample(range(5, unique + retries), retries))
    headers: list[tuple[str, str | bytes | None]]
    for n in range(unique + retries):
        if n in retry_at:
            key, value, headers = rng.choice(sent)  # a producer retry: byte-identical
        else:
            payment_id = str(uuid.UUID(int=rng.getrandbits(128)))
            legacy = len(sent) == 12  # one payment from the old service, with a binary key
            account = "acct-legacy" if legacy else ACCOUNTS[rng.randrange(len(ACCOUNTS))]
            key = BINARY_KEY if legacy else account.encode()
            body = {
                "payment_id": payment_id,
                "account": account,
                "amount_cents": rng.randrange(100, 50_000),
                "currency": "EUR",
            }
            value = json.dumps(body, sort_keys=True).encode()
            headers = [
                ("event-id", payment_id.encode()),
                ("content-type", b"application/json"),
                ("trace", f"checkout/{n}".encode()),
            ]
            sent.append((key, value, headers))
        producer.produce(
            topic, key=key, value=value, headers=headers, timestamp=BASE_TIMESTAMP_MS + n * 1000
        )
    if producer.flush(30):
        raise SystemExit("some events were not delivered")
    return unique + retries


def make_recording(bootstrap: str, out: Path, unique: int, retries: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    topic = "payments"
    if topic in admin.list_topics(timeout=10).topics:
        topic = f"payments-{uuid.uuid4().hex[:8]}"  # never write into somebody's topic
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(30)
    time.sleep(1)  # let the new partitions get leaders in the broker's metadata
    count = produce_payments(bootstrap, topic, unique, retries, seed=5)
    print(f"produced {count} events to {topic!r}", file=sys.stderr)
    subprocess.run(
        [
            sys.executable, "-m", "dedupe_consumer", "record",
            "--bootstrap-servers", bootstrap,
            "--topic", topic,
            "--until-end",
            "--out", str(out),
        ],
        check=True,
    )  # fmt: skip
    admin.delete_topics([topic])[topic].result(30)


def main() -> None:
    parser = argparse.ArgumentParser(description="Record ~50 payment events from a real topic.")
    parser.add_argument(
        "-b", "--bootstrap-servers", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    )
    parser.add_argument("--out", type=Path, default=HERE / "payments.jsonl")
    parser.add_argument("--unique", type=int, default=42)
    parser.add_argument("--retries", type=int, default=8)
    args = parser.parse_args()

    broker = None
    bootstrap = args.bootstrap_servers
    if not bootstrap:
        from dedupe_consumer.testing import LocalKafka

        print("starting a local Kafka (jars from Maven)...", file=sys.stderr)
        broker = LocalKafka().start()
        bootstrap = broker.bootstrap_servers
    try:
        make_recording(bootstrap, args.out, args.unique, args.retries)
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
