"""Throughput of dedupe_consumer next to a raw confluent-kafka consumer, in one run.

    python -m bench.compare --events 1000000 --duplicates 0.1

Starts (or uses ``--bootstrap``) a real broker, produces the data set once
(event-ID header, ~200-byte JSON body keyed by event ID, 8 partitions), then
runs each contender in its own process over the same topic with its own
consumer group and prints one table: messages/s, ratio to raw, peak RSS and
whether handled == unique IDs. Rates are measured from the first message to
the last, so the group join is not counted for anyone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

PARTITIONS = 8


def produce(bootstrap: str, topic: str, events: int, duplicates: float, seed: int) -> int:
    """Produce the data set; return the number of unique IDs."""
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
    padding = "x" * 90
    with Progress(transient=True) as bar:
        task = bar.add_task("producing", total=events)
        for n in range(events):
            if ids and rng.random() < duplicates:
                event_id = ids[rng.randrange(len(ids))]
            else:
                event_id = str(uuid.UUID(int=rng.getrandbits(128)))
                ids.append(event_id)
            body = (
                f'{{"id":"{event_id}","amount_cents":{n % 10000},"currency":"EUR",'
                f'"note":"{padding}"}}'
            )
            while True:
                try:
                    producer.produce(
                        topic, key=event_id, value=body, headers=[("event-id", event_id.encode())]
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
            if n % 20_000 == 0:
                producer.poll(0)
                bar.update(task, completed=n)
        producer.flush(120)
    return len(ids)


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_raw(bootstrap: str, topic: str, events: int) -> dict[str, Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"raw-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    seen = 0
    first = 0.0
    while seen < events:
        batch = consumer.consume(500, 1.0)
        if not batch:
            continue
        if not first:
            first = time.perf_counter()
        for m in batch:  # touch every message like a handler would
            m.value()
            m.headers()
        seen += len(batch)
        consumer.commit(asynchronous=False)
    elapsed = time.perf_counter() - first
    consumer.close()
    return {"consumed": seen, "handled": seen, "seconds": elapsed}


def run_dedupe(bootstrap: str, topic: str, events: int, changelog: bool) -> dict[str, Any]:
    from dedupe_consumer import DedupeConsumer, Event, Handler, Settings
    from dedupe_consumer.engine import BatchResult
    from dedupe_consumer.observability import configure_logging

    class NoOp(Handler):
        def handle(self, event: Event) -> None:
            return None

    configure_logging("warning")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        settings = Settings.load(
            kafka={
                "bootstrap_servers": bootstrap,
                "group_id": f"dedupe-{uuid.uuid4()}",
                "topics": [topic],
            },
            store={"path": tmp, "changelog": changelog},
            processing={"dead_letter_topic": f"{topic}.dlq", "batch_size": 500},
        )
        consumer = DedupeConsumer(NoOp(), settings)
        first = 0.0

        def on_batch(result: BatchResult) -> None:
            nonlocal first
            if not first:
                first = time.perf_counter()

        totals = consumer.run(until=lambda t: t.consumed >= events, on_batch=on_batch)
        elapsed = time.perf_counter() - first
    return {"consumed": totals.consumed, "handled": totals.handled, "seconds": elapsed}


CONTENDERS: dict[str, Callable[[str, str, int], dict[str, Any]]] = {
    "raw confluent-kafka (commit per batch)": run_raw,
    "dedupe_consumer plain": lambda b, t, n: run_dedupe(b, t, n, changelog=True),
    "dedupe_consumer plain, no changelog": lambda b, t, n: run_dedupe(b, t, n, changelog=False),
}


def child(name: str, bootstrap: str, topic: str, events: int) -> None:
    result = CONTENDERS[name](bootstrap, topic, events)
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--duplicates", type=float, default=0.1)
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.bootstrap, args.topic, args.events)
        return

    out = Console()
    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        from dedupe_consumer.testing import start_broker

        broker = start_broker()
        bootstrap = broker.bootstrap_servers
    try:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        unique = produce(bootstrap, topic, args.events, args.duplicates, args.seed)
        out.print(
            f"produced {args.events:,} events ({unique:,} unique IDs, {PARTITIONS} "
            f"partitions) in {time.perf_counter() - started:.1f}s to {topic}"
        )
        results: dict[str, dict[str, Any]] = {}
        for name in CONTENDERS:
            out.print(f"running: {name}")
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.compare",
                    "--child",
                    name,
                    "--bootstrap",
                    bootstrap,
                    "--topic",
                    topic,
                    "--events",
                    str(args.events),
                ],
                capture_output=True,
                text=True,
                check=True,
                cwd=Path(__file__).resolve().parents[1],
            )
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if broker is not None:
            broker.stop()

    raw_rate = (
        results[next(iter(CONTENDERS))]["consumed"] / results[next(iter(CONTENDERS))]["seconds"]
    )
    table = Table(
        title=f"{args.events:,} events, {args.duplicates:.0%} duplicates, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    for column in ("contender", "msg/s", "x raw", "peak RSS MB", "handled == unique"):
        table.add_column(column, justify="right" if column != "contender" else "left")
    lines = [
        "| contender | msg/s | x raw | peak RSS MB | handled == unique |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        rate = r["consumed"] / r["seconds"]
        correct = "n/a (no dedupe)" if name.startswith("raw") else str(r["handled"] == unique)
        row = (name, f"{rate:,.0f}", f"{rate / raw_rate:.2f}", f"{r['peak_rss_mb']:.0f}", correct)
        table.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    out.print(table)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
