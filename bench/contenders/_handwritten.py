"""The consume loop teams write by hand around an external "seen IDs" store.

For each message: read the ``event-id`` header, ask the store whether the ID
is new with one blocking round trip, call the handler only if it is; after the
batch, commit the offsets synchronously. Nothing is pipelined or batched,
because hand-written code almost never is, and that is the point of the
comparison: the cost of one network round trip (and, for PostgreSQL, one
durable transaction) per message.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Literal

from confluent_kafka import Consumer, KafkaError, KafkaException, Message

from bench.child import Stopwatch

Headers = list[tuple[str, str | bytes | None]] | dict[str, str | bytes | None] | None


def event_id_of(headers: Headers) -> str:
    """The last ``event-id`` header, as dedupe_consumer's ``header:event-id`` reads it."""
    found: str | bytes | None = None
    pairs = headers.items() if isinstance(headers, dict) else headers or ()
    for name, value in pairs:
        if name == "event-id":
            found = value
    if not found:
        raise ValueError("message has no event-id header")
    return found if isinstance(found, str) else found.decode()


def batch_loop(
    args: argparse.Namespace,
    on_message: Callable[[Message], bool],
    commit: Literal["sync", "async"] = "sync",
) -> tuple[int, int, float]:
    """Consume ``args.events`` messages of ``args.topic`` in batches, commit after each.

    ``on_message`` returns whether the message was handled. The raw baseline and
    the hand-written dedupe loops share this, so they differ only in that call.
    ``commit="async"`` issues each batch's commit without waiting for it and
    ends with one synchronous commit, so the clock still stops at the last
    offset committed. Returns (consumed, handled, seconds).
    """
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([args.topic])
    clock = Stopwatch()
    consumed = handled = 0
    try:
        while consumed < args.events:
            # Never ask for more than is left: a short last batch would otherwise wait
            # out the whole poll timeout and be measured as processing time.
            batch = consumer.consume(min(args.batch, args.events - consumed), 1.0)
            if not batch:
                continue
            clock.start_once()
            for message in batch:
                if message.error():
                    raise RuntimeError(f"consume error: {message.error()}")
                if on_message(message):
                    handled += 1
            consumed += len(batch)
            if commit == "async":
                consumer.commit(asynchronous=True)
            else:
                consumer.commit(asynchronous=False)
            clock.lap()
        if commit == "async":
            _commit_the_rest(consumer)
            clock.lap()
    finally:
        consumer.close()
    return consumed, handled, clock.seconds


def _commit_the_rest(consumer: Consumer) -> None:
    """Wait for the offsets the asynchronous commits left; nothing left is fine."""
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError._NO_OFFSET:
            raise


def consume_loop(args: argparse.Namespace, is_new: Callable[[str], bool]) -> tuple[int, int, float]:
    """The hand-written dedupe loop: one round trip to the "seen" store per message."""

    def on_message(message: Message) -> bool:
        if not is_new(event_id_of(message.headers())):
            return False
        message.value()  # the (no-op) handler
        return True

    return batch_loop(args, on_message)
