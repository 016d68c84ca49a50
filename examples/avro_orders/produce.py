"""Produce Avro orders with confluent-kafka's ``AvroSerializer`` (the schema is registered).

    python examples/avro_orders/produce.py -b localhost:9092 -r http://localhost:8081 -t orders

Every third order is sent twice (a producer retry): the consumer applies it once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

SCHEMA = (Path(__file__).parent / "order.avsc").read_text()
COUNTRIES = ("de", "fr", "jp")


def order(n: int) -> dict[str, Any]:
    customer = None if n % 4 == 3 else {"id": f"c-{n % 5}", "country": COUNTRIES[n % 3]}
    return {"order_id": f"order-{n}", "amount_cents": 100 * (n + 1), "customer": customer}


def serializer(registry_url: str) -> AvroSerializer:
    made: AvroSerializer = AvroSerializer(SchemaRegistryClient({"url": registry_url}), SCHEMA)
    return made


def produce_orders(producer: Producer, serialize: AvroSerializer, topic: str, count: int) -> int:
    """``count`` orders, every third twice; returns how many messages were produced."""
    sent = 0
    for n in range(count):
        record = order(n)
        value = serialize(record, SerializationContext(topic, MessageField.VALUE))
        for _ in range(2 if n % 3 == 0 else 1):
            producer.produce(topic, key=record["order_id"], value=value)
            sent += 1
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-b", "--bootstrap-servers", default="localhost:9092")
    parser.add_argument("-r", "--registry-url", default="http://localhost:8081")
    parser.add_argument("-t", "--topic", default="orders")
    parser.add_argument("-n", "--orders", type=int, default=30)
    args = parser.parse_args()
    producer = Producer({"bootstrap.servers": args.bootstrap_servers})
    sent = produce_orders(producer, serializer(args.registry_url), args.topic, args.orders)
    assert producer.flush(30) == 0
    print(json.dumps({"produced": sent, "orders": args.orders, "topic": args.topic}))


if __name__ == "__main__":
    main()
