"""Stored responses: ``handle``'s answer is kept with the ID record and replayed to duplicates.

A request/reply consumer must answer a repeated request with the *first* answer
(the first reply may have been lost on the requester's side), never call the
handler again, and never send a reply that its decision does not back. The
handler here answers with a random token, so a byte-identical reply proves it
was stored, not computed again.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from dedupe_consumer import DedupeConsumer, Event, Handler, Response
from dedupe_consumer.testing.pytest_plugin import OutputReader, TopicFactory

from ..kafka_helpers import headers_of, read_all, settings_for
from .test_emit import read_committed, run_to_end

pytestmark = pytest.mark.kafka


class Answering(Handler):
    """Answers each request with a token drawn at call time; records calls and duplicates."""

    def __init__(self, size: dict[str, int] | None = None) -> None:
        self.size = size or {}
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.answers: dict[str, bytes] = {}
        self.duplicates: list[tuple[str, bytes | None, bytes | None]] = []

    def handle(self, event: Event) -> object:
        answer = f"answer:{event.id}:{uuid.uuid4().hex}".encode()
        if event.id in self.size:
            answer = answer[:1] * self.size[event.id]
        with self.lock:
            self.calls[event.id] += 1
            self.answers[event.id] = answer
        return answer

    def on_duplicate(self, event: Event, stored: Response | None) -> None:
        with self.lock:
            self.duplicates.append(
                (event.id, event.header("correlation-id"), None if stored is None else stored.value)
            )


def produce_requests(
    bootstrap: str,
    topic: str,
    count: int,
    reply_to: str | None,
    *,
    duplicates: float,
    seed: int,
    ids: list[str] | None = None,
) -> list[tuple[str, str]]:
    """``count`` requests keyed by ID, each delivery with its own correlation ID; returns
    (event ID, correlation ID) per delivery."""
    rng = random.Random(seed)
    known = ids if ids is not None else []
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    sent: list[tuple[str, str]] = []
    for n in range(count):
        if known and rng.random() < duplicates:
            event_id = rng.choice(known)
        else:
            event_id = f"req-{seed}-{n}"
            known.append(event_id)
        correlation = f"c-{seed}-{n}"
        headers: list[tuple[str, str | bytes | None]] = [
            ("event-id", event_id.encode()),
            ("correlation-id", correlation.encode()),
        ]
        if reply_to is not None:
            headers.append(("reply-to", reply_to.encode()))
        producer.produce(topic, key=event_id.encode(), value=b"request", headers=headers)
        producer.poll(0)
        sent.append((event_id, correlation))
    assert producer.flush(30) == 0
    return sent


def replies_by_correlation(bootstrap: str, topic: str) -> dict[str, tuple[bytes, bytes]]:
    """Each committed reply: correlation ID -> (key, value); a correlation ID twice fails."""
    got: dict[str, tuple[bytes, bytes]] = {}
    for key, value, headers in read_committed(bootstrap, topic):
        correlation = headers["correlation-id"].decode()
        assert correlation not in got, f"two replies to {correlation}"
        got[correlation] = (key or b"", value or b"")
    return got


def test_every_duplicate_gets_the_first_reply_byte_for_byte_and_the_handler_runs_once(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    requests, reply_topic = kafka_topic(partitions=4), kafka_topic(partitions=2)
    sent = produce_requests(kafka_bootstrap, requests, 400, reply_topic, duplicates=0.3, seed=1)
    handler = Answering()
    settings = settings_for(
        kafka_bootstrap,
        requests,
        tmp_path / "first",
        processing={"concurrency": 4, "reply_on_duplicate": True},
    )
    run_to_end(DedupeConsumer(handler, settings), len(sent))
    unique = {event_id for event_id, _ in sent}
    assert set(handler.calls) == unique and max(handler.calls.values()) == 1
    replies = replies_by_correlation(kafka_bootstrap, reply_topic)
    assert set(replies) == {c for _, c in sent}, "a request without its reply, or a stray one"
    for event_id, correlation in sent:
        key, value = replies[correlation]
        assert key == event_id.encode()
        assert value == handler.answers[event_id], "a duplicate's reply is not the first one"
    # on_duplicate saw the same stored bytes for every duplicate delivery.
    duplicates = len(sent) - len(unique)
    assert duplicates > 50
    assert len(handler.duplicates) == duplicates
    assert all(stored == handler.answers[i] for i, _, stored in handler.duplicates)

    # A new instance with an empty store (the partition moved): the responses come
    # with the partition from the changelog, and the old requests get the old answers.
    again = produce_requests(
        kafka_bootstrap, requests, 60, reply_topic, duplicates=1.0, seed=2, ids=sorted(unique)
    )
    later = Answering()
    moved = settings_for(
        kafka_bootstrap,
        requests,
        tmp_path / "second",
        processing={"concurrency": 4, "reply_on_duplicate": True},
    )
    run_to_end(DedupeConsumer(later, moved), len(again))
    assert later.calls == Counter()
    replies = replies_by_correlation(kafka_bootstrap, reply_topic)
    for event_id, correlation in again:
        assert replies[correlation][1] == handler.answers[event_id]


def test_without_reply_on_duplicate_only_the_first_request_is_answered(
    kafka_bootstrap: str, kafka_topic: TopicFactory, kafka_outputs: OutputReader, tmp_path: Path
) -> None:
    requests, reply_topic = kafka_topic(partitions=1), kafka_topic(partitions=1)
    sent = produce_requests(kafka_bootstrap, requests, 40, None, duplicates=0.5, seed=3)
    handler = Answering()
    settings = settings_for(
        kafka_bootstrap, requests, tmp_path / "state", processing={"reply_topic": reply_topic}
    )
    run_to_end(DedupeConsumer(handler, settings), len(sent))
    # The plugin's reader (read_committed) sees the same as the suite's own.
    committed = kafka_outputs(reply_topic)
    replies = replies_by_correlation(kafka_bootstrap, reply_topic)
    assert sorted(m.value() for m in committed) == sorted(v for _, v in replies.values())
    firsts: dict[str, str] = {}
    for event_id, correlation in sent:
        firsts.setdefault(event_id, correlation)
    assert set(replies) == set(firsts.values())  # processing.reply_topic: no header needed
    assert len(handler.duplicates) == len(sent) - len(firsts)  # on_duplicate all the same


def test_a_response_over_the_limit_is_dead_lettered_never_truncated(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    requests, reply_topic = kafka_topic(partitions=1), kafka_topic(partitions=1)
    sent = produce_requests(kafka_bootstrap, requests, 4, reply_topic, duplicates=0.0, seed=4)
    too_big = sent[1][0]
    handler = Answering(size={too_big: 65, sent[2][0]: 64})
    settings = settings_for(
        kafka_bootstrap,
        requests,
        tmp_path / "state",
        dedupe={"max_response_bytes": 64},
        processing={"reply_on_duplicate": True},
    )
    consumer = DedupeConsumer(handler, settings)
    run_to_end(consumer, len(sent))
    assert consumer.totals.handled == 3 and consumer.totals.dead_lettered == 1
    assert handler.calls[too_big] == 1, "a deterministic refusal is not retried"
    letter = read_all(kafka_bootstrap, settings.processing.dead_letter_topic, 1)[0]
    headers = headers_of(letter)
    assert headers["dlq.reason"] == b"response-too-large"
    assert headers["dlq.event.id"] == too_big.encode()
    assert b"65 bytes" in headers["dlq.error.message"]
    assert b"max_response_bytes" in headers["dlq.error.message"]
    replies = replies_by_correlation(kafka_bootstrap, reply_topic)
    assert set(replies) == {c for i, c in sent if i != too_big}
    assert replies[sent[2][1]][1] == b"a" * 64  # exactly at the limit: kept whole


def test_a_reply_to_naming_an_internal_topic_is_dead_lettered_without_a_call(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    requests = kafka_topic(partitions=1)
    dlq = f"{requests}.dlq"
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    bad = {
        "to-changelog": f"{requests}.g.dedupe-changelog".encode(),
        "to-dlq": dlq.encode(),
        "not-text": b"\xff\xfe",
        "missing": f"no-such-{uuid.uuid4().hex[:8]}".encode(),
    }
    for event_id, reply_to in bad.items():
        producer.produce(
            requests,
            key=event_id.encode(),
            value=b"request",
            headers=[("event-id", event_id.encode()), ("reply-to", reply_to)],
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
    run_to_end(consumer, len(bad))
    assert handler.calls == Counter(), "the handler ran for a request it could not answer"
    letters = read_all(kafka_bootstrap, dlq, len(bad))
    reasons = {headers_of(m)["dlq.event.id"].decode(): headers_of(m) for m in letters}
    assert set(reasons) == set(bad)
    assert {h["dlq.reason"] for h in reasons.values()} == {b"output-failed"}
    assert b"dedupe_consumer's own" in reasons["to-changelog"]["dlq.error.message"]
    assert b"dedupe_consumer's own" in reasons["to-dlq"]["dlq.error.message"]
    assert b"not UTF-8" in reasons["not-text"]["dlq.error.message"]
    assert b"does not exist" in reasons["missing"]["dlq.error.message"]


class FanOut(Handler):
    def __init__(self, topic: str, count: int) -> None:
        self.topic, self.count = topic, count

    def handle(self, event: Event) -> None:
        for n in range(self.count):
            event.emit(self.topic, f"{event.id}:{n}")


def test_outputs_per_event_are_bounded(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    requests, out = kafka_topic(partitions=1), kafka_topic(partitions=1)
    produce_requests(kafka_bootstrap, requests, 2, None, duplicates=0.0, seed=5)
    settings = settings_for(
        kafka_bootstrap,
        requests,
        tmp_path / "state",
        processing={"max_outputs_per_event": 3, "max_retries": 0},
    )
    consumer = DedupeConsumer(FanOut(out, 4), settings)
    run_to_end(consumer, 2)
    assert consumer.totals.dead_lettered == 2
    letter = headers_of(read_all(kafka_bootstrap, settings.processing.dead_letter_topic, 2)[0])
    assert letter["dlq.reason"] == b"output-failed"
    assert b"max_outputs_per_event" in letter["dlq.error.message"]
    assert read_committed(kafka_bootstrap, out) == []  # nothing half-emitted


def test_a_missing_output_topic_is_created_only_when_configured(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    requests = kafka_topic(partitions=1)
    new_topic = f"created-{uuid.uuid4().hex[:10]}"
    produce_requests(kafka_bootstrap, requests, 5, None, duplicates=0.0, seed=6)
    settings = settings_for(
        kafka_bootstrap,
        requests,
        tmp_path / "state",
        processing={"create_output_topics": True},
    )
    consumer = DedupeConsumer(FanOut(new_topic, 2), settings)
    try:
        run_to_end(consumer, 5)
        assert consumer.totals.handled == 5
        outputs = read_committed(kafka_bootstrap, new_topic)
        assert sorted(value or b"" for _, value, _ in outputs) == sorted(
            f"req-6-{n}:{k}".encode() for n in range(5) for k in range(2)
        )
    finally:
        AdminClient({"bootstrap.servers": kafka_bootstrap}).delete_topics([new_topic])
