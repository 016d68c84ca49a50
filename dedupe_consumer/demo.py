"""``dedupe-consumer demo``: the whole engine, offline, in a few seconds.

librdkafka's embedded mock cluster stands in for Kafka (fine for a demo; the
tests use a real broker). We produce events where a share repeat an earlier
event ID, as producer retries and re-publishes do, run the real consumer loop
with a handler that counts its calls, and check it ran once per unique ID.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import Producer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dedupe_consumer.config import Settings
from dedupe_consumer.consumer import DedupeConsumer
from dedupe_consumer.contracts import BatchResult
from dedupe_consumer.handler import Handler
from dedupe_consumer.kafka.logs import kafka_log_config
from dedupe_consumer.models import Event
from dedupe_consumer.observability import configure_logging

TOPIC = "demo.payments"


class CountingHandler(Handler):
    """Counts calls per event ID: more than one call for an ID would be a double charge."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def handle(self, event: Event) -> None:
        self.calls[event.id] = self.calls.get(event.id, 0) + 1


def _produce(producer: Producer, events: int, duplicates: float, seed: int) -> set[str]:
    rng = random.Random(seed)
    ids: list[str] = []
    for n in range(events):
        if ids and rng.random() < duplicates:
            event_id = rng.choice(ids)  # a redelivery of an earlier event: same ID, same body
        else:
            event_id = str(uuid.UUID(int=rng.getrandbits(128)))
            ids.append(event_id)
        body = {"id": event_id, "amount_cents": 100 + (hash(event_id) % 9900), "currency": "EUR"}
        producer.produce(
            TOPIC,
            key=event_id.encode(),
            value=json.dumps(body, sort_keys=True).encode(),
            headers=[("event-id", event_id.encode())],
        )
        if n % 10_000 == 0:
            producer.poll(0)
    producer.flush(60)
    return set(ids)


def run_demo(events: int = 20_000, duplicates: float = 0.1, seed: int = 7) -> bool:
    """Run the demo; True when handled == unique IDs and every ID was handled once."""
    configure_logging("warning")
    out = Console()
    # The mock cluster lives as long as the client that created it.
    cluster = Producer(
        {"test.mock.num.brokers": 1, "log_level": 3, "linger.ms": 20, **kafka_log_config()}
    )
    brokers = cluster.list_topics(timeout=10).brokers.values()
    bootstrap = ",".join(f"{b.host}:{b.port}" for b in brokers)
    out.print(f"mock Kafka cluster at [bold]{bootstrap}[/] (embedded librdkafka, offline)")
    unique = _produce(cluster, events, duplicates, seed)
    out.print(f"produced {events:,} events, {len(unique):,} unique IDs to {TOPIC!r}")

    with tempfile.TemporaryDirectory(prefix="dedupe-demo-") as tmp:
        settings = Settings.load(
            kafka={
                "bootstrap_servers": bootstrap,
                "group_id": "demo",
                "topics": [TOPIC],
                "consumer": {"log_level": 3},
                "producer": {"log_level": 3},
            },
            # One instance, and the mock cluster has no transactions: no changelog needed.
            store={"path": str(Path(tmp) / "state"), "changelog": False},
            processing={
                "dead_letter_topic": f"{TOPIC}.dlq",
                "batch_size": 1000,
                "poll_timeout": "200ms",
            },
        )
        handler = CountingHandler()
        consumer = DedupeConsumer(handler, settings)
        started = time.monotonic()
        deadline = started + 120
        with Progress(
            TextColumn("consuming"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=out,
            transient=True,
        ) as bar:
            task = bar.add_task("consume", total=events)

            def advance(result: BatchResult) -> None:
                bar.update(task, advance=result.stats.consumed)

            totals = consumer.run(
                until=lambda t: t.consumed >= events or time.monotonic() > deadline,
                on_batch=advance,
            )
        seconds = time.monotonic() - started

    twice = sum(1 for c in handler.calls.values() if c > 1)
    table = Table(title="dedupe_consumer demo")
    for column in (
        "consumed",
        "handled",
        "duplicates",
        "dead-lettered",
        "unique IDs",
        "seconds",
        "events/s",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        f"{totals.consumed:,}",
        f"{totals.handled:,}",
        f"{totals.duplicates:,}",
        f"{totals.dead_lettered:,}",
        f"{len(unique):,}",
        f"{seconds:.2f}",
        f"{totals.consumed / seconds:,.0f}",
    )
    out.print(table)
    ok = totals.handled == len(unique) and twice == 0 and set(handler.calls) == unique
    if ok:
        out.print("[bold green]OK[/]: every unique event ID was handled exactly once")
    else:
        out.print(
            f"[bold red]FAILED[/]: handled {totals.handled} of {len(unique)} unique IDs; "
            f"{twice} IDs handled more than once"
        )
    return ok
