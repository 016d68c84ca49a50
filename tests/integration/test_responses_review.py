"""Stored responses on a real broker, found by an adversarial review: each test fails on i15b."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from dedupe_consumer import DedupeConsumer, Event, Handler
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import headers_of, read_all, settings_for
from .test_emit import read_committed

pytestmark = pytest.mark.kafka


class Answering(Handler):
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def handle(self, event: Event) -> object:
        with self.lock:
            self.calls[event.id] = self.calls.get(event.id, 0) + 1
        return f"answer:{event.id}"


def test_a_reply_to_naming_a_kafka_internal_topic_does_not_wedge_the_partition(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """A request whose reply-to header says '__consumer_offsets' (any requester can
    write that header). check_topic only refuses this library's suffixes and the DLQ;
    the topic exists, so check_reply_to passes, the handler runs, and the reply is
    produced in the batch's transaction. The broker refuses writes to its internal
    topics, so the whole transaction (every decision of the batch, every other
    event's reply) fails, again and again: one header is a poison pill for the
    partition. Expected: refused before the call like a changelog topic
    (dead-lettered 'output-failed'), and the next request answered."""
    requests, replies = kafka_topic(partitions=1), kafka_topic(partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for event_id, reply_to in (("bad", "__consumer_offsets"), ("good", replies)):
        producer.produce(
            requests,
            key=event_id.encode(),
            value=b"request",
            headers=[
                ("event-id", event_id.encode()),
                ("reply-to", reply_to.encode()),
                ("correlation-id", event_id.encode()),
            ],
        )
    assert producer.flush(30) == 0
    handler = Answering()
    settings = settings_for(
        kafka_bootstrap,
        requests,
        tmp_path / "state",
        dedupe={"store_responses": True},
        processing={"max_retries": 1},
    )
    consumer = DedupeConsumer(handler, settings)
    deadline = time.monotonic() + 40
    failure: BaseException | None = None
    try:
        consumer.run(
            until=lambda totals: totals.consumed >= 2 or time.monotonic() > deadline,
            install_signal_handlers=False,
        )
    except Exception as raised:  # the consumer gave up on the batch
        failure = raised
    assert failure is None, f"the consumer failed: {failure!r}"
    assert handler.calls.get("bad") is None, "the handler ran for an unanswerable request"
    assert handler.calls.get("good") == 1
    answered = [value for _, value, _ in read_committed(kafka_bootstrap, replies)]
    assert answered == [b"answer:good"]
    letter = headers_of(read_all(kafka_bootstrap, settings.processing.dead_letter_topic, 1)[0])
    assert letter["dlq.reason"] == b"output-failed"


class Big(Answering):
    def handle(self, event: Event) -> object:
        super().handle(event)
        return b"x" * 200_000


def test_a_response_allowed_by_the_setting_but_over_the_producer_limit_is_refused(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """dedupe.max_response_bytes = 512 KiB, the producers' message.max.bytes = 100 kB
    (nothing relates the two). A 200 kB answer is accepted and put in the ID record,
    which is the changelog record: the batch's transaction fails and the consumer
    stops; every restart calls the handler again. Expected: refused up front."""
    requests = kafka_topic(partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(requests, key=b"r", value=b"q", headers=[("event-id", b"r")])
    assert producer.flush(30) == 0
    handler = Big()
    settings = settings_for(
        kafka_bootstrap,
        requests,
        tmp_path / "state",
        dedupe={"max_response_bytes": 512 * 1024, "store_responses": True},
        kafka={"producer": {"message.max.bytes": 100_000}},
    )
    deadline = time.monotonic() + 30
    failure: BaseException | None = None
    try:
        DedupeConsumer(handler, settings).run(
            until=lambda totals: totals.consumed >= 1 or time.monotonic() > deadline,
            install_signal_handlers=False,
        )
    except Exception as raised:
        failure = raised
    assert failure is None, f"the consumer failed: {failure!r}"
    letter = headers_of(read_all(kafka_bootstrap, settings.processing.dead_letter_topic, 1)[0])
    assert letter["dlq.reason"] == b"response-too-large"
    assert b"message.max.bytes" in letter["dlq.error.message"]
    assert handler.calls == {"r": 1}
