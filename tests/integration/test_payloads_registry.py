"""Schema Registry payloads end to end: a real broker, a real registry (Apicurio, the
``schema_registry`` fixture), values written by confluent-kafka's own serializers.

* ``dedupe-consumer run`` (a real process) decodes Protobuf and reads the ID from a field;
* ``dedupe-consumer sidecar`` (a real process) POSTs JSON Schema records as JSON;
* a registry that is down stops the consumer without committing or dead-lettering;
* a recorded Avro topic replays with the registry (IDs from fields), and without one
  (IDs from headers).

The whole file takes ~30 s, ~6 s of it starting the session's registry.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from dedupe_consumer import DedupeConsumer, Event, Handler, Settings
from dedupe_consumer.errors import SchemaRegistryUnavailableError
from dedupe_consumer.kafka.schema_registry import RegistryDecoder
from dedupe_consumer.replay import Record, record_topic, replay_recording
from dedupe_consumer.testing import LocalSchemaRegistry
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..faults.consumer_process import (
    APPEND_HANDLER,
    REPO,
    effects_of,
    log_tail,
    start_consumer,
    stop_consumer,
)
from ..kafka_helpers import (
    admin,
    committed_offsets,
    end_offsets,
    headers_of,
    read_all,
    settings_for,
    wait_for,
)
from ..protos.orders_pb2 import Customer as CustomerProto
from ..protos.orders_pb2 import Order as OrderProto
from .test_sidecar import Target, free_port
from .test_sidecar import write_config as write_sidecar_config

pytestmark = pytest.mark.kafka

NOT_THE_WIRE_FORMAT = b'{"order_id": "plain-json"}'
UNKNOWN_SCHEMA_ID = (2147483632).to_bytes(4, "big")
"""A schema ID the registry never issued."""


def with_unknown_schema(value: bytes) -> bytes:
    """A serialized value whose schema ID (after the magic byte) the registry never issued."""
    return value[:1] + UNKNOWN_SCHEMA_ID + value[5:]


ORDER_AVRO = json.dumps(
    {
        "type": "record",
        "name": "Order",
        "namespace": "dedupe.it",
        "fields": [
            {"name": "order_id", "type": "string"},
            {"name": "amount", "type": "long"},
            {"name": "note", "type": ["null", "string"], "default": None},
        ],
    }
)
ORDER_JSON_SCHEMA = json.dumps(
    {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Order",
        "type": "object",
        "properties": {
            "order_id": {"type": "string"},
            "amount": {"type": "integer"},
            "lines": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["order_id", "amount"],
    }
)


def value_context(topic: str) -> SerializationContext:
    return SerializationContext(topic, MessageField.VALUE)


def no_dead_letters(bootstrap: str, topic: str) -> bool:
    """The dead-letter topic of ``topic`` does not exist, or is empty."""
    dlq = admin(bootstrap).list_topics(timeout=10).topics.get(f"{topic}.dlq")
    if dlq is None or dlq.error is not None:
        return True
    return sum(end_offsets(bootstrap, f"{topic}.dlq", len(dlq.partitions)).values()) == 0


def dead_letter_reasons(bootstrap: str, topic: str, expect: int) -> list[str]:
    letters = read_all(bootstrap, f"{topic}.dlq", expect)
    return sorted(headers_of(m)["dlq.reason"].decode() for m in letters)


def produce_avro_orders(bootstrap: str, registry_url: str, topic: str, count: int) -> list[str]:
    """``count`` Avro orders (ID in ``order_id`` and in an ``event-id`` header), every
    third sent twice; returns the order ID of each message sent."""
    serialize = AvroSerializer(SchemaRegistryClient({"url": registry_url}), ORDER_AVRO)
    producer = Producer({"bootstrap.servers": bootstrap})
    sent: list[str] = []
    for n in range(count):
        order_id = f"avro-{n}"
        record = {"order_id": order_id, "amount": n, "note": None if n % 2 else f"n{n}"}
        value = serialize(record, value_context(topic))
        for _ in range(2 if n % 3 == 0 else 1):
            producer.produce(
                topic, key=order_id, value=value, headers=[("event-id", order_id.encode())]
            )
            sent.append(order_id)
    assert producer.flush(30) == 0
    return sent


def avro_record(order_id: str) -> dict[str, Any]:
    n = int(order_id.removeprefix("avro-"))
    return {"order_id": order_id, "amount": n, "note": None if n % 2 else f"n{n}"}


class RecordingHandler(Handler):
    """Keeps each handled event's ID and payload (no model: the decoded record itself,
    or None when no format decodes the value) and its raw value."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.values: dict[str, bytes | None] = {}
        self.lock = threading.Lock()

    def handle(self, event: Event) -> None:
        with self.lock:
            self.seen.append((event.id, event.payload))
            self.values[event.id] = event.value


# -- 1. dedupe-consumer run: Protobuf, ID from a field ----------------------------------------


def test_run_decodes_protobuf_once_per_id_and_dead_letters_bad_records(
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
    schema_registry: LocalSchemaRegistry,
    tmp_path: Path,
) -> None:
    """A real ``dedupe-consumer run`` process; measured ~5 s (registry already up)."""
    topic = kafka_topic(partitions=2)
    serialize = ProtobufSerializer(
        OrderProto,
        SchemaRegistryClient({"url": schema_registry.url}),
        {"use.deprecated.format": False},
    )
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    orders = [f"proto-{n}" for n in range(12)]
    sent = 0
    for n, order_id in enumerate(orders):
        customer = CustomerProto(id=f"c-{n}") if n % 2 else None
        value = serialize(
            OrderProto(order_id=order_id, amount=n, customer=customer), value_context(topic)
        )
        for _ in range(3 if n % 4 == 0 else 1):  # producer retries: same key, same partition
            producer.produce(topic, key=order_id, value=value)
            sent += 1
    producer.produce(topic, key=b"bad", value=NOT_THE_WIRE_FORMAT)
    producer.produce(topic, key=b"bad", value=with_unknown_schema(value))
    assert producer.flush(30) == 0
    assert sent > len(orders)

    config = tmp_path / "consumer.toml"
    config.write_text(f"""
[kafka]
bootstrap_servers = "{kafka_bootstrap}"
group_id = "{topic}-group"
topics = ["{topic}"]
[kafka.consumer]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500
[payload]
format = "protobuf"
schema_registry_url = "{schema_registry.url}"
protobuf_message = "tests.protos.orders_pb2:Order"
registry_retry_for = "10s"
[dedupe]
id_source = "field:/order_id"
[store]
path = "{tmp_path / "state"}"
[processing]
poll_timeout = "100ms"
dead_letter_topic = "{topic}.dlq"
[observability]
log_level = "warning"
""")
    effects = tmp_path / "effects"
    proc = start_consumer(config, effects)  # tests.faults' own: stderr to consumer.log
    group, ends = f"{topic}-group", end_offsets(kafka_bootstrap, topic, 2)
    try:
        wait_for(
            lambda: (
                proc.poll() is not None
                or committed_offsets(kafka_bootstrap, group, topic, 2) == ends
            ),
            60,
            "every message decided and committed",
        )
        assert proc.poll() is None, "the consumer died: " + log_tail(config)
    finally:
        code = proc.poll()
        if code is None:
            code = stop_consumer(proc)
    assert code == 0, log_tail(config)
    assert effects_of(effects) == dict.fromkeys(orders, 1)
    assert dead_letter_reasons(kafka_bootstrap, topic, 2) == ["invalid-payload", "unknown-schema"]


# -- 2. dedupe-consumer sidecar: JSON Schema records POSTed as JSON -----------------------------


def test_sidecar_posts_each_json_schema_record_once_as_json(
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
    schema_registry: LocalSchemaRegistry,
    tmp_path: Path,
) -> None:
    """A real ``dedupe-consumer sidecar`` process; measured ~5 s (registry already up)."""
    topic = kafka_topic(partitions=2)
    serialize = JSONSerializer(
        ORDER_JSON_SCHEMA, SchemaRegistryClient({"url": schema_registry.url})
    )
    records: list[dict[str, Any]] = [
        {"order_id": f"json-{n}", "amount": 10 * n, "lines": [f"sku-{i}" for i in range(n % 3)]}
        for n in range(10)
    ]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for n, record in enumerate(records):
        value = serialize(record, value_context(topic))
        for _ in range(2 if n % 3 == 0 else 1):
            producer.produce(topic, key=record["order_id"], value=value)
    assert producer.flush(30) == 0

    server = Target()
    config = write_sidecar_config(tmp_path, kafka_bootstrap, topic, server.url, free_port())
    with config.open("a") as toml:
        toml.write(f"""
[payload]
format = "json-schema"
schema_registry_url = "{schema_registry.url}"
[dedupe]
id_source = "field:/order_id"
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dedupe_consumer", "sidecar", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    group, ends = f"{topic}-group", end_offsets(kafka_bootstrap, topic, 2)
    try:
        wait_for(
            lambda: (
                proc.poll() is not None
                or committed_offsets(kafka_bootstrap, group, topic, 2) == ends
            ),
            60,
            "every record delivered and committed",
        )
        assert proc.poll() is None, "the sidecar died (see its log below)"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        server.close()
    assert proc.returncode == 0, stderr.decode(errors="replace")[-3000:]
    received = server.snapshot()
    assert sorted(r.key for r in received) == sorted(r["order_id"] for r in records)
    by_key = {r.key: r for r in received}
    for record in records:
        got = by_key[record["order_id"]]
        assert json.loads(got.body) == record
        assert got.header("Content-Type") == b"application/json"
        assert got.header("Kafka-Value-Format") == b"json-schema"
    assert no_dead_letters(kafka_bootstrap, topic)


# -- 3. the registry is down: stop, commit nothing, dead-letter nothing ------------------------


def test_registry_down_stops_without_commit_or_dead_letter_then_a_restart_handles_all(
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
    schema_registry: LocalSchemaRegistry,
    tmp_path: Path,
) -> None:
    """In process; measured ~6 s (2 s of it the registry retry)."""
    topic = kafka_topic(partitions=1)
    sent = produce_avro_orders(kafka_bootstrap, schema_registry.url, topic, 6)
    group = f"{topic}-group"

    def settings(registry_url: str) -> Settings:
        return settings_for(
            kafka_bootstrap,
            topic,
            tmp_path / "state",
            group=group,
            payload={
                "format": "avro",
                "schema_registry_url": registry_url,
                "registry_retry_for": "2s",
            },
            dedupe={"id_source": "header:event-id"},
        )

    down = RecordingHandler()
    consumer = DedupeConsumer(down, settings(f"http://127.0.0.1:{free_port()}"))
    deadline = time.monotonic() + 60
    with pytest.raises(SchemaRegistryUnavailableError, match="registry_retry_for"):
        consumer.run(until=lambda t: time.monotonic() > deadline, install_signal_handlers=False)
    assert time.monotonic() < deadline, "run() returned by its deadline, not by the error"
    assert down.seen == []
    assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: -1001}  # nothing
    assert no_dead_letters(kafka_bootstrap, topic)

    up = RecordingHandler()
    consumer = DedupeConsumer(up, settings(schema_registry.url))
    deadline = time.monotonic() + 60
    consumer.run(
        until=lambda t: t.consumed >= len(sent) or time.monotonic() > deadline,
        install_signal_handlers=False,
    )
    unique = list(dict.fromkeys(sent))
    assert sorted(event_id for event_id, _ in up.seen) == sorted(unique)
    assert dict(up.seen) == {order_id: avro_record(order_id) for order_id in unique}
    assert consumer.totals.duplicates == len(sent) - len(unique)
    assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: len(sent)}
    assert no_dead_letters(kafka_bootstrap, topic)


def test_registry_retry_for_bounds_the_wait_for_a_registry_that_is_down() -> None:
    """``payload.registry_retry_for`` is how long a registry that is down is waited for,
    not that plus the registry client's own retries. No broker, no registry: a closed
    loopback port; measured ~1 s."""
    decoder = RegistryDecoder("avro", f"http://127.0.0.1:{free_port()}", retry_for_s=1.0)
    value = b"\x00\x00\x00\x00\x01\x02"  # the wire format, schema ID 1
    started = time.monotonic()
    with pytest.raises(SchemaRegistryUnavailableError, match="registry_retry_for"):
        decoder.decode(value, Record("orders", 0, 0, value_=value))
    took = time.monotonic() - started
    # Before the fix it gave up after 8-10 s (the client retried under our loop); the
    # margin is for a loaded machine, not a performance bound.
    assert 1.0 <= took < 5.0, f"gave up after {took:.1f}s, registry_retry_for is 1s"


def test_registry_retry_for_bounds_the_wait_for_a_registry_that_never_answers() -> None:
    """A registry that accepts connections and never answers (a hung process, a load
    balancer with no backend) stops the consumer too. No broker, no registry: a
    loopback socket that listens and never accepts; measured ~2 s."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)  # the kernel completes the handshake; nothing ever reads
        port = hung.getsockname()[1]
        decoder = RegistryDecoder("avro", f"http://127.0.0.1:{port}", retry_for_s=1.0)
        value = b"\x00\x00\x00\x00\x01\x02"
        outcome: list[BaseException] = []

        def decode() -> None:
            try:
                decoder.decode(value, Record("orders", 0, 0, value_=value))
            except BaseException as failure:
                outcome.append(failure)

        started = time.monotonic()
        thread = threading.Thread(target=decode, daemon=True)
        thread.start()
        thread.join(8)
        took = time.monotonic() - started
    # (closing the socket resets the hung connection: a thread still waiting ends)
    assert not thread.is_alive(), "decode still waits for the registry after 8 s"
    assert outcome and isinstance(outcome[0], SchemaRegistryUnavailableError), outcome
    assert took < 6.0, f"gave up after {took:.1f}s, registry_retry_for is 1s (margin: load)"


# -- 4. replay of a recorded Avro topic ---------------------------------------------------------


def test_replay_of_an_avro_recording_decodes_with_the_registry_and_dedupes(
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
    schema_registry: LocalSchemaRegistry,
    tmp_path: Path,
) -> None:
    """Record, then replay six ways; measured ~5 s (registry already up)."""
    topic = kafka_topic(partitions=2)
    sent = produce_avro_orders(kafka_bootstrap, schema_registry.url, topic, 9)
    unique = list(dict.fromkeys(sent))
    recording = tmp_path / "orders.jsonl"
    summary = record_topic(kafka_bootstrap, topic, recording, until_end=True)
    assert summary.messages == len(sent)

    def settings(id_source: str, payload: dict[str, Any] | None = None) -> Settings:
        return settings_for(
            kafka_bootstrap,
            topic,
            tmp_path / "unused",
            dedupe={"id_source": id_source},
            payload=payload or {},
        )

    registry = {"format": "avro", "schema_registry_url": schema_registry.url}

    # With [payload] pointing at the registry, the handler gets the decoded records,
    # whether the ID is a decoded field or a header.
    for id_source in ("field:/order_id", "header:event-id"):
        decoded = RecordingHandler()
        report = replay_recording(
            decoded,
            recording,
            settings=settings(id_source, registry),
            inject_duplicates=0.5,
            redeliver_batches=True,
            seed=3,
        )
        assert report.ok, report.to_json()
        assert sorted(event_id for event_id, _ in decoded.seen) == sorted(unique)
        assert dict(decoded.seen) == {order_id: avro_record(order_id) for order_id in unique}
        assert report.duplicates > 0
        assert report.replays > 0

    # The ID from a header or the key and no [payload]: no registry needed; the value
    # stays the recorded wire-format bytes (magic byte 0), nothing decodes it.
    for id_source in ("header:event-id", "key"):
        raw = RecordingHandler()
        report = replay_recording(
            raw, recording, settings=settings(id_source), inject_duplicates=0.5, seed=3
        )
        assert report.ok, report.to_json()
        assert sorted(event_id for event_id, _ in raw.seen) == sorted(unique)
        assert report.duplicates > 0
        assert all(payload is None for _, payload in raw.seen)
        assert all(value is not None and value[:1] == b"\x00" for value in raw.values.values())

    # The command: `dedupe-consumer replay --config` with the [payload] section.
    config = tmp_path / "replay.toml"
    config.write_text(f"""
[kafka]
bootstrap_servers = "{kafka_bootstrap}"
group_id = "unused"
topics = ["{topic}"]
[payload]
format = "avro"
schema_registry_url = "{schema_registry.url}"
[dedupe]
id_source = "field:/order_id"
[processing]
dead_letter_topic = "{topic}.dlq"
""")
    effects = tmp_path / "effects"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    env["DEDUPE_TEST_EFFECTS"] = str(effects)
    command = [sys.executable, "-m", "dedupe_consumer", "replay", str(recording)]
    command += ["--config", str(config), "--handler", APPEND_HANDLER, "--json"]
    command += ["--inject-duplicates", "0.5", "--redeliver-batches"]
    done = subprocess.run(
        command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads(done.stdout)["handled"] == len(unique)
    assert effects_of(effects) == dict.fromkeys(unique, 1)

    # The ID from a field and no registry reachable: the replay stops with the error.
    gone = {**registry, "schema_registry_url": f"http://127.0.0.1:{free_port()}"}
    with pytest.raises(SchemaRegistryUnavailableError):
        replay_recording(
            RecordingHandler(),
            recording,
            settings=settings("field:/order_id", {**gone, "registry_retry_for": "1s"}),
        )
