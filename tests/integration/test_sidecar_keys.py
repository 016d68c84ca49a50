"""End to end: two IDs whose keys used to collide both reach the example receiver."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import headers_of, produce_raw, read_all, wait_for
from .test_emit import read_committed
from .test_sidecar import (
    IN_ORDER,
    Target,
    _answers,
    event,
    free_port,
    running,
    sidecar_for,
)

pytestmark = pytest.mark.kafka
REPO = Path(__file__).resolve().parents[2]


def test_an_id_and_the_base64_of_another_are_both_delivered(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    ids = [" pay-1", "IHBheS0x", ":IHBheS0x:", "pay-2"]  # base64(" pay-1") == "IHBheS0x"
    produce_raw(kafka_bootstrap, topic, [event(i, f"v{n}".encode()) for n, i in enumerate(ids)])
    port, out = free_port(), tmp_path / "received.jsonl"
    script = REPO / "examples" / "sidecar_target" / "app.py"
    app = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: _answers(port, "/healthz"), 30, "the example app to listen")
        sidecar = sidecar_for(
            kafka_bootstrap,
            topic,
            tmp_path,
            f"http://127.0.0.1:{port}/events",
            processing=IN_ORDER,
        )
        with running(sidecar):
            wait_for(lambda: sidecar.consumer.totals.consumed >= len(ids), 90, "all decided")
        lines = [json.loads(line) for line in out.read_text().splitlines()]
    finally:
        app.send_signal(signal.SIGTERM)
        _, stderr = app.communicate(timeout=30)
    assert app.returncode == 0, stderr.decode()[-2000:]
    assert sidecar.consumer.totals.handled == len(ids)
    assert [e["event_id"] for e in lines] == ids  # every one recorded, none as a duplicate
    assert [e["body"] for e in lines] == ["v0", "v1", "v2", "v3"]
    assert len({e["idempotency_key"] for e in lines}) == len(ids)


def test_a_target_reply_is_emitted_once_stored_and_replayed_to_duplicates(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """The HTTP target answers with a body and Kafka-Reply-Topic/Key: the body is produced
    there exactly once per delivery of the request (the first time from the answer, then
    from the store, without a POST); a body over dedupe.max_response_bytes is refused."""
    topic, reply_topic = kafka_topic(partitions=2), kafka_topic(partitions=1)
    ids = [f"order-{n}" for n in range(6)]
    deliveries = [*ids, *ids[:4], *ids[:2]]  # 12 deliveries of 6 requests
    big = "order-5"

    def script(key: bytes | None, seen: int) -> tuple[int, dict[str, str], bytes]:
        body = b"x" * 300 if key == big.encode() else f"accepted {key!r} {uuid.uuid4()}".encode()
        return 200, {"Kafka-Reply-Topic": reply_topic, "Kafka-Reply-Key": "k-" + str(key)}, body

    target = Target(script)
    produce_raw(kafka_bootstrap, topic, [event(i, b"{}", key=i.encode()) for i in deliveries])
    try:
        sidecar = sidecar_for(
            kafka_bootstrap,
            topic,
            tmp_path,
            target.url,
            processing={"reply_on_duplicate": True},
            dedupe={"max_response_bytes": 256},
        )
        with running(sidecar):
            wait_for(lambda: sidecar.consumer.totals.consumed >= len(deliveries), 90, "all decided")
    finally:
        target.close()
    posted = Counter(r.key for r in target.accepted())
    assert posted == Counter({i: 1 for i in ids}), "a duplicate reached the target"
    letters = read_all(kafka_bootstrap, f"{topic}.dlq", 1)
    assert headers_of(letters[0])["dlq.reason"] == b"response-too-large"
    replies = read_committed(kafka_bootstrap, reply_topic)
    per_key: dict[bytes, set[bytes]] = {}
    for key, value, _ in replies:
        per_key.setdefault(key or b"", set()).add(value or b"")
    expected = Counter(d for d in deliveries if d != big)
    assert Counter(len(per_key[f"k-{i.encode()!r}".encode()]) for i in expected) == Counter(
        {1: len(expected)}
    ), "a duplicate's reply differs from the first"
    assert len(replies) == sum(expected.values())
