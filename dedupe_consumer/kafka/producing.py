"""One produce call that waits out a full local queue: every producer of the library's."""

from __future__ import annotations

from typing import Any

from confluent_kafka import Producer


def produce_waiting(producer: Producer, topic: str, **kwargs: Any) -> None:
    """``producer.produce(topic, **kwargs)``; while librdkafka's local queue is full (a
    large batch, a burst), serve delivery reports for 0.1 s and try again."""
    while True:
        try:
            producer.produce(topic, **kwargs)
            return
        except BufferError:
            producer.poll(0.1)
