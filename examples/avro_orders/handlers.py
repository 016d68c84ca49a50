"""Avro orders from a Schema Registry topic: the ID is a field of the decoded record.

Run it from the repository root against topic ``orders`` (a registry at
``http://localhost:8081``; ``dedupe-consumer schema-registry`` starts a test one)::

    dedupe-consumer run --config examples/avro_orders/consumer.toml \\
        --handler examples.avro_orders.handlers:OrderTotals
"""

from __future__ import annotations

from pydantic import BaseModel

from dedupe_consumer import Event, Handler, PermanentError


class Customer(BaseModel):
    id: str
    country: str


class Order(BaseModel):
    order_id: str
    amount_cents: int
    customer: Customer | None = None


class OrderTotals(Handler):
    """Adds each order once to its country's total.

    ``[payload] format = "avro"`` decodes the value with the writer's schema from the
    registry; ``id_source = "field:/order_id"`` takes the ID from that record, and
    ``payload_model`` validates the same decoded record: one decoding per event.
    """

    payload_model = Order

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.orders: list[str] = []

    def handle(self, event: Event) -> None:
        order: Order = event.payload
        if order.amount_cents <= 0:
            raise PermanentError("non-positive amount")  # dead-lettered, never retried
        country = order.customer.country if order.customer else "unknown"
        self.totals[country] = self.totals.get(country, 0) + order.amount_cents
        self.orders.append(event.id)
