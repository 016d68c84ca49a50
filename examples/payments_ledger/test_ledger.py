"""The ledger example against a real broker and a real SQLite file."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from dedupe_consumer import DedupeConsumer, Event, Settings
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from .ledger import LedgerHandler, Payment


def payment_event(event_id: str, account: str, cents: int, offset: int = 0) -> Event:
    value = json.dumps({"account": account, "amount_cents": cents}).encode()
    return Event(
        id=event_id,
        topic="payments",
        partition=0,
        offset=offset,
        key=None,
        value=value,
        headers=(),
        timestamp=None,
        payload=Payment.model_validate_json(value),
    )


def test_a_repeated_call_is_a_no_op_and_reconcile_sees_the_payment(tmp_path: Path) -> None:
    handler = LedgerHandler(tmp_path / "ledger.sqlite3")
    handler.setup()
    try:
        event = payment_event("p-1", "alice", 500)
        handler.handle(event)
        handler.handle(event)  # the plain-mode crash window, replayed by hand
        assert handler.balances() == {"alice": 500}
        assert handler.reconcile(event) is True
        assert handler.reconcile(payment_event("p-2", "alice", 1)) is False
    finally:
        handler.teardown()


@pytest.mark.kafka
def test_ledger_balances_match_unique_payments(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=3)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    expected: dict[str, int] = {}
    sent = 0
    for n in range(300):
        event_id = str(uuid.UUID(int=n))
        account = f"acct-{n % 7}"
        cents = 100 + n
        expected[account] = expected.get(account, 0) + cents
        body = json.dumps({"account": account, "amount_cents": cents}).encode()
        for _ in range(2 if n % 4 == 0 else 1):  # every 4th payment is published twice
            producer.produce(topic, key=account, value=body, headers=[("event-id", event_id)])
            sent += 1
    assert producer.flush(30) == 0

    settings = Settings.load(
        kafka={
            "bootstrap_servers": kafka_bootstrap,
            "group_id": f"{topic}-ledger",
            "topics": [topic],
        },
        store={"path": str(tmp_path / "state")},
        processing={
            "dead_letter_topic": f"{topic}.dlq",
            "mode": "claim",
            "on_uncertain": "reconcile",
            "poll_timeout": "200ms",
        },
    )
    handler = LedgerHandler(tmp_path / "ledger.sqlite3")
    consumer = DedupeConsumer(handler, settings)
    deadline = time.monotonic() + 90
    consumer.run(
        until=lambda t: t.consumed >= sent or time.monotonic() > deadline,
        install_signal_handlers=False,
    )
    assert consumer.totals.handled == 300
    assert consumer.totals.duplicates == sent - 300

    handler.setup()
    try:
        assert handler.balances() == expected
    finally:
        handler.teardown()
