"""What reading a payload costs: the engine's events/s for each payload kind (issue 18).

    python -m bench.payloads --events 20000 --batches 3

Drives the real engine (``Engine.process``, a real RocksDB store in a temporary
directory, no broker: the cost measured is the engine's own) with the same
events in five forms, each with a ``payload_model`` handler and 10% duplicates:

* ``raw-json``: JSON value, ID in an ``event-id`` header (the baseline);
* ``cloudevents-binary``: ``ce_*`` headers, JSON data, ``id_source = "cloudevents"``;
* ``cloudevents-structured``: a JSON envelope, ``application/cloudevents+json``;
* ``avro-field``: Avro in Confluent's wire format, ID from ``field:/order_id``,
  decoded with the schema from a real registry (``LocalSchemaRegistry``: Apicurio,
  started here; the schema is fetched once, then cached);
* ``avro-header``: the same Avro values, the ID from a header (decoded only for
  the handler).

Prints one JSON line per kind and a table of events/s and the ratio to
``raw-json`` measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

ORDER_SCHEMA = json.dumps(
    {
        "type": "record",
        "name": "Order",
        "fields": [
            {"name": "order_id", "type": "string"},
            {"name": "amount_cents", "type": "long"},
            {"name": "country", "type": "string"},
        ],
    }
)


class Order(BaseModel):
    order_id: str
    amount_cents: int
    country: str


def _orders(events: int, seed: int) -> list[dict[str, Any]]:
    """``events`` orders, 10% of them copies of an earlier one."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for n in range(events):
        if out and rng.random() < 0.1:
            out.append(rng.choice(out))
        else:
            out.append({"order_id": f"order-{n}", "amount_cents": n, "country": "de"})
    return out


def _records(
    kind: str, orders: Sequence[dict[str, Any]], avro: Callable[[Any], bytes]
) -> list[Any]:
    from dedupe_consumer.replay import Record

    records = []
    for offset, order in enumerate(orders):
        oid = order["order_id"].encode()
        headers: list[tuple[str, str | bytes | None]]
        if kind == "raw-json":
            value, headers = json.dumps(order).encode(), [("event-id", oid)]
        elif kind == "cloudevents-binary":
            value = json.dumps(order).encode()
            headers = [
                ("ce_specversion", b"1.0"),
                ("ce_id", oid),
                ("ce_source", b"/shop"),
                ("ce_type", b"order.created"),
                ("content-type", b"application/json"),
            ]
        elif kind == "cloudevents-structured":
            envelope = {
                "specversion": "1.0",
                "id": order["order_id"],
                "source": "/shop",
                "type": "order.created",
                "datacontenttype": "application/json",
                "data": order,
            }
            value = json.dumps(envelope).encode()
            headers = [("content-type", b"application/cloudevents+json")]
        else:
            value, headers = avro(order), [("event-id", oid)]
        records.append(Record("orders", 0, offset, oid, value, headers, 1_700_000_000_000))
    return records


def _settings(kind: str, store: Path, registry_url: str) -> Any:
    from dedupe_consumer import Settings

    id_source = {
        "raw-json": "header:event-id",
        "cloudevents-binary": "cloudevents",
        "cloudevents-structured": "cloudevents",
        "avro-field": "field:/order_id",
        "avro-header": "header:event-id",
    }[kind]
    payload = (
        {"format": "avro", "schema_registry_url": registry_url} if kind.startswith("avro") else {}
    )
    return Settings.load(
        kafka={"bootstrap_servers": "unused:9092", "group_id": "bench", "topics": ["orders"]},
        store={"path": str(store), "changelog": False},
        dedupe={"id_source": id_source},
        payload=payload,
        processing={"dead_letter_topic": "orders.dlq"},
    )


def _run(kind: str, records: Sequence[Any], registry_url: str, batch: int) -> dict[str, Any]:
    from dedupe_consumer import Event, Handler
    from dedupe_consumer.dead_letters import MemoryDeadLetters
    from dedupe_consumer.engine import Engine
    from dedupe_consumer.models import TopicPartition
    from dedupe_consumer.payloads import PayloadDecoder
    from dedupe_consumer.store import RocksStore

    class Totals(Handler):
        payload_model = Order

        def __init__(self) -> None:
            self.total = 0

        def handle(self, event: Event) -> None:
            self.total += event.payload.amount_cents

    with tempfile.TemporaryDirectory(prefix="bench-payloads-") as tmp:
        settings = _settings(kind, Path(tmp) / "store", registry_url)
        store = RocksStore(settings.store.path, retention_ms=7 * 86_400_000)
        handler = Totals()
        engine = Engine(
            handler,
            settings.dedupe,
            settings.processing,
            store,
            MemoryDeadLetters(),
            sweep_keys=settings.store.sweep_keys,
            revoked_state_grace=settings.store.revoked_state_grace,
            payloads=PayloadDecoder.from_settings(
                settings.payload, cloudevents=settings.dedupe.id_source == "cloudevents"
            ),
        )
        engine.assign([TopicPartition("orders", 0)])
        handled = duplicates = 0
        started = time.perf_counter()
        for at in range(0, len(records), batch):
            stats = engine.process(records[at : at + batch]).stats
            handled += stats.handled
            duplicates += stats.duplicates
        seconds = time.perf_counter() - started
        engine.close()
        store.close()
    return {
        "kind": kind,
        "events": len(records),
        "handled": handled,
        "duplicates": duplicates,
        "seconds": round(seconds, 3),
        "events_per_s": round(len(records) / seconds),
        "checksum": handler.total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500, help="events per engine batch")
    parser.add_argument("--rounds", type=int, default=3, help="runs per kind; the best counts")
    args = parser.parse_args()

    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    from dedupe_consumer.testing import LocalSchemaRegistry

    orders = _orders(args.events, seed=7)
    with LocalSchemaRegistry() as registry:
        serializer = AvroSerializer(SchemaRegistryClient({"url": registry.url}), ORDER_SCHEMA)
        context = SerializationContext("orders", MessageField.VALUE)

        def avro(order: dict[str, Any]) -> bytes:
            return bytes(serializer(order, context))

        kinds = [
            "raw-json",
            "cloudevents-binary",
            "cloudevents-structured",
            "avro-field",
            "avro-header",
        ]
        best: dict[str, dict[str, Any]] = {}
        for _ in range(args.rounds):  # alternated, so load changes hit every kind alike
            for kind in kinds:
                records = _records(kind, orders, avro)
                result = _run(kind, records, registry.url, args.batch)
                if kind not in best or result["events_per_s"] > best[kind]["events_per_s"]:
                    best[kind] = result
    base = best["raw-json"]["events_per_s"]
    checksums = {r["checksum"] for r in best.values()}
    for kind in kinds:
        print(
            json.dumps(
                {**best[kind], "ratio_to_raw_json": round(best[kind]["events_per_s"] / base, 2)}
            )
        )
    print("\n| payload | events/s | ratio to raw JSON |\n|---|---|---|")
    for kind in kinds:
        r = best[kind]
        print(f"| {kind} | {r['events_per_s']:,} | {r['events_per_s'] / base:.2f}x |")
    if len(checksums) != 1:
        raise SystemExit(f"the kinds disagree on what was handled: {checksums}")


if __name__ == "__main__":
    main()
