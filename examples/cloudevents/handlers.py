"""Order events as CloudEvents: deduplicated by (source, id), dispatched on ``type``.

Run it from the repository root against topic ``order-events``::

    dedupe-consumer run --config examples/cloudevents/consumer.toml \\
        --handler examples.cloudevents.handlers:OrderEventsHandler
"""

from __future__ import annotations

import structlog
from pydantic import BaseModel

from dedupe_consumer import Event, Handler, PermanentError

log = structlog.get_logger("examples.cloudevents")


class Order(BaseModel):
    order_id: str
    amount_cents: int


class OrderEventsHandler(Handler):
    """Handles ``com.example.order.created`` and ``...order.cancelled`` events.

    ``event.id`` is ``["<source>","<id>"]``: the same ``id`` sent by two services is
    two events, the same event sent twice is one. ``event.payload`` is the event's
    data (the value in binary mode, the envelope's ``data`` in structured mode),
    validated by ``payload_model``.
    """

    payload_model = Order

    def __init__(self) -> None:
        self.created: dict[str, int] = {}
        self.cancelled: set[str] = set()

    def handle(self, event: Event) -> None:
        assert event.cloudevent is not None  # id_source = "cloudevents"
        order: Order = event.payload
        if event.cloudevent.type == "com.example.order.created":
            self.created[order.order_id] = order.amount_cents
        elif event.cloudevent.type == "com.example.order.cancelled":
            self.cancelled.add(order.order_id)
        else:  # never retried: the dead letter says why
            raise PermanentError(f"unknown event type {event.cloudevent.type!r}")
        log.info(
            "order_event",
            event_id=event.id,
            type=event.cloudevent.type,
            subject=event.cloudevent.subject,
            order_id=order.order_id,
        )
