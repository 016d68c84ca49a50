"""Produce order CloudEvents with the ``cloudevents`` SDK, in both content modes.

    python examples/cloudevents/produce.py -b localhost:9092 -t order-events

Each order is sent twice (a producer retry: same source and id); one event goes in
structured mode (``content-type: application/cloudevents+json``), the rest in
binary mode (``ce_*`` headers).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from cloudevents.core.bindings import kafka as binding
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from confluent_kafka import Producer


def order_event(
    order_id: str, amount_cents: int, *, source: str = "/shop/orders", kind: str = "created"
) -> CloudEvent:
    return CloudEvent(
        {
            "id": f"{order_id}-{kind}",
            "source": source,
            "type": f"com.example.order.{kind}",
            "specversion": "1.0",
            "subject": f"orders/{order_id}",
            "datacontenttype": "application/json",
            # The binding's message key: every copy of an order's events on one partition,
            # where the default dedupe scope ("partition") finds them.
            "partitionkey": order_id,
        },
        {"order_id": order_id, "amount_cents": amount_cents},
    )


def kafka_message(event: CloudEvent, *, structured: bool = False) -> dict[str, Any]:
    """``Producer.produce`` keyword arguments for ``event``."""
    encoded = (binding.to_structured if structured else binding.to_binary)(event, JSONFormat())
    return {"key": encoded.key, "value": encoded.value, "headers": list(encoded.headers.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-b", "--bootstrap-servers", default="localhost:9092")
    parser.add_argument("-t", "--topic", default="order-events")
    args = parser.parse_args()
    producer = Producer({"bootstrap.servers": args.bootstrap_servers})
    for n in range(10):
        event = order_event(f"o-{n}", 100 * (n + 1))
        for _ in range(2):  # sent twice: one effect
            producer.produce(args.topic, **kafka_message(event, structured=n == 0))
    assert producer.flush(30) == 0
    print(json.dumps({"produced": 20, "unique": 10, "topic": args.topic}))


if __name__ == "__main__":
    main()
