"""The test schema registry itself: a real server that confluent-kafka's own client and
serializers work against, or every Schema Registry test above it would prove nothing.

The ``schema_registry`` fixture is Apicurio Registry (Maven Central, in-memory
storage) speaking Confluent's API under ``/apis/ccompat/v7``. Each format goes
the whole way a user's record goes: registered by the real serializer, produced
to a real topic with ``SerializingProducer``, read back with
``DeserializingConsumer``, its schema fetched from the server by the ID in the
wire format. Protobuf's message imports another of our files, so the serializer
registers a schema *reference* and the server has to keep it.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    DeserializingConsumer,
    SerializingProducer,
    TopicPartition,
)
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.json_schema import JSONDeserializer, JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer, ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    timestamp_pb2,
)

from dedupe_consumer.testing import LocalSchemaRegistry
from dedupe_consumer.testing.pytest_plugin import TopicFactory

pytestmark = pytest.mark.kafka

REPO_ROOT = Path(__file__).resolve().parents[2]

SUBJECT_NOT_FOUND = 40401
SCHEMA_NOT_FOUND = 40403
"""Confluent's error codes: what a client (and the consumer built on it) branches on."""

ORDER_AVRO = """{
  "type": "record", "name": "Order", "namespace": "dedupe.test",
  "fields": [
    {"name": "id", "type": "string"},
    {"name": "amount_cents", "type": "long"},
    {"name": "coupon", "type": ["null", "string"], "default": null}
  ]
}"""

ORDER_JSON_SCHEMA = """{
  "$schema": "http://json-schema.org/draft-07/schema#",
  "title": "Order",
  "type": "object",
  "properties": {
    "id": {"type": "string"},
    "amount_cents": {"type": "integer"},
    "customer": {"type": "object", "properties": {"email": {"type": "string"}}}
  },
  "required": ["id", "amount_cents"]
}"""


@functools.cache
def _protobuf_order_class() -> Any:
    """``dedupe.test.Order`` in ``dedupe/test/order.proto``, which imports ``Money`` from
    ``dedupe/test/money.proto`` (a reference the serializer registers as its own subject)
    and ``google/protobuf/timestamp.proto`` (a well-known type, skipped by default)."""
    pool = descriptor_pool.DescriptorPool()
    timestamp_file = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(timestamp_file)
    pool.Add(timestamp_file)

    money = descriptor_pb2.FileDescriptorProto(
        name="dedupe/test/money.proto", package="dedupe.test", syntax="proto3"
    )
    money_message = money.message_type.add(name="Money")
    money_message.field.add(name="cents", number=1, type=3, label=1)  # int64
    money_message.field.add(name="currency", number=2, type=9, label=1)  # string
    pool.Add(money)

    order = descriptor_pb2.FileDescriptorProto(
        name="dedupe/test/order.proto",
        package="dedupe.test",
        syntax="proto3",
        dependency=["dedupe/test/money.proto", "google/protobuf/timestamp.proto"],
    )
    order_message = order.message_type.add(name="Order")
    order_message.field.add(name="id", number=1, type=9, label=1)
    order_message.field.add(
        name="total", number=2, type=11, label=1, type_name=".dedupe.test.Money"
    )
    order_message.field.add(
        name="placed_at", number=3, type=11, label=1, type_name=".google.protobuf.Timestamp"
    )
    pool.Add(order)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("dedupe.test.Order"))


@dataclass(frozen=True)
class Format:
    name: str
    serializer: Callable[[SchemaRegistryClient], Any]
    deserializer: Callable[[SchemaRegistryClient], Any]
    record: Callable[[], Any]
    as_dict: Callable[[Any], Any]


def _protobuf_record() -> Any:
    order = _protobuf_order_class()(id="p-1")
    order.total.cents = 1250
    order.total.currency = "EUR"
    order.placed_at.FromSeconds(1_700_000_000)
    return order


def _protobuf_as_dict(message: Any) -> Any:
    return (
        message.id,
        message.total.cents,
        message.total.currency,
        message.placed_at.seconds,
    )


FORMATS = [
    Format(
        "avro",
        lambda client: AvroSerializer(client, ORDER_AVRO),
        AvroDeserializer,
        lambda: {"id": "a-1", "amount_cents": 1250, "coupon": "WELCOME"},
        dict,
    ),
    Format(
        "json-schema",
        lambda client: JSONSerializer(ORDER_JSON_SCHEMA, client),
        # No schema given: the deserializer validates against the one the ID names.
        lambda client: JSONDeserializer(None, schema_registry_client=client),
        lambda: {"id": "j-1", "amount_cents": 1250, "customer": {"email": "a@example.org"}},
        dict,
    ),
    Format(
        "protobuf",
        lambda client: ProtobufSerializer(_protobuf_order_class(), client),
        lambda client: ProtobufDeserializer(_protobuf_order_class()),
        _protobuf_record,
        _protobuf_as_dict,
    ),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_record_round_trips_through_kafka_and_the_registry(
    fmt: Format,
    schema_registry: LocalSchemaRegistry,
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
) -> None:
    client = SchemaRegistryClient({"url": schema_registry.url})
    topic = kafka_topic()
    record = fmt.record()

    producer = SerializingProducer(
        {"bootstrap.servers": kafka_bootstrap, "value.serializer": fmt.serializer(client)}
    )
    producer.produce(topic, key=b"k", value=record)
    assert producer.flush(30) == 0

    consumer = DeserializingConsumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"sr-{topic}",
            "enable.auto.commit": False,
            "value.deserializer": fmt.deserializer(client),
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + 30
        message = None
        while message is None and time.monotonic() < deadline:
            message = consumer.poll(0.5)
        assert message is not None, "the record did not come back"
        assert message.error() is None, message.error()
        raw_consumer_value = message.value()
    finally:
        consumer.close()
    assert fmt.as_dict(raw_consumer_value) == fmt.as_dict(record)

    # The server, not a client cache, holds it: a fresh client finds the subject the
    # serializer registered (TopicNameStrategy) and its ID is the one on the wire.
    fresh = SchemaRegistryClient({"url": schema_registry.url})
    registered = fresh.get_latest_version(f"{topic}-value")
    wire = fmt.serializer(fresh)(record, SerializationContext(topic, MessageField.VALUE))
    assert wire[0] == 0 and struct.unpack(">I", wire[1:5])[0] == registered.schema_id
    if fmt.name == "protobuf":
        references = registered.schema.references or []
        assert [(r.name, r.subject) for r in references] == [
            ("dedupe/test/money.proto", "dedupe/test/money.proto")
        ], references
        assert fresh.get_latest_version("dedupe/test/money.proto").schema.schema_type == "PROTOBUF"


def test_unknown_schema_id_is_the_clients_not_found_error(
    schema_registry: LocalSchemaRegistry,
) -> None:
    client = SchemaRegistryClient({"url": schema_registry.url})
    unknown_id = 2**31 - 1
    with pytest.raises(SchemaRegistryError) as by_client:
        client.get_schema(unknown_id)
    assert by_client.value.http_status_code == 404
    assert by_client.value.error_code == SCHEMA_NOT_FOUND

    # What a consumer meets: a record whose header names an ID the registry never gave.
    payload = b"\x00" + struct.pack(">I", unknown_id) + b"\x06a-1"
    context = SerializationContext("orders", MessageField.VALUE)
    with pytest.raises(SchemaRegistryError) as by_deserializer:
        AvroDeserializer(client)(payload, context)
    assert by_deserializer.value.error_code == SCHEMA_NOT_FOUND

    with pytest.raises(SchemaRegistryError) as no_subject:
        client.get_latest_version("no-such-subject-value")
    assert no_subject.value.error_code == SUBJECT_NOT_FOUND


def test_backward_compatibility_is_enforced_as_confluents_default(
    schema_registry: LocalSchemaRegistry, request: pytest.FixtureRequest
) -> None:
    """Apicurio's own default is no rule at all; the fixture sets Confluent's, BACKWARD."""
    client = SchemaRegistryClient({"url": schema_registry.url})
    subject = f"{request.node.name}-value"
    added_optional = ORDER_AVRO.replace(
        '"default": null}', '"default": null}, {"name": "note", "type": "string", "default": ""}'
    )
    changed_type = ORDER_AVRO.replace(
        '"amount_cents", "type": "long"', '"amount_cents", "type": "string"'
    )
    assert client.get_compatibility() == "BACKWARD"
    first = client.register_schema(subject, Schema(ORDER_AVRO, "AVRO"))
    second = client.register_schema(subject, Schema(added_optional, "AVRO"))
    assert second != first
    assert client.test_compatibility(subject, Schema(changed_type, "AVRO")) is False
    with pytest.raises(SchemaRegistryError) as rejected:
        client.register_schema(subject, Schema(changed_type, "AVRO"))
    assert rejected.value.http_status_code == 409
    assert client.get_versions(subject) == [1, 2]


def test_a_schema_in_another_formatting_keeps_its_id_as_with_confluent(
    schema_registry: LocalSchemaRegistry, request: pytest.FixtureRequest
) -> None:
    """Producers built apart format one schema differently; Confluent compares parsed
    schemas, Apicurio (without the canonical-hash setting the fixture turns on) text."""
    client = SchemaRegistryClient({"url": schema_registry.url})
    subject = f"{request.node.name}-value"
    reformatted = json.dumps(json.loads(ORDER_AVRO), indent=4, sort_keys=True)
    assert reformatted != ORDER_AVRO
    first = client.register_schema(subject, Schema(ORDER_AVRO, "AVRO"))
    fresh = SchemaRegistryClient({"url": schema_registry.url})  # no cached answer
    assert fresh.register_schema(subject, Schema(reformatted, "AVRO")) == first
    assert fresh.get_versions(subject) == [1]
    assert fresh.lookup_schema(subject, Schema(reformatted, "AVRO")).schema_id == first


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except OSError:
        return True


def test_stop_kills_the_registry_and_removes_its_directory() -> None:
    registry = LocalSchemaRegistry()
    with registry:
        pid, workdir = registry.pid, registry.workdir
        assert pid is not None and workdir is not None
        assert registry.log_file is not None and registry.log_file.stat().st_size > 0
        assert SchemaRegistryClient({"url": registry.url}).get_subjects() == []
        port = int(registry.base_url.rsplit(":", 1)[1])
    assert registry.pid is None and registry.workdir is None
    assert not Path(f"/proc/{pid}").exists(), "the JVM outlived stop()"
    assert not workdir.exists()
    assert _refused(port)


def test_fixture_fails_instead_of_skipping_when_the_registry_cannot_be_had(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Under DEDUPE_REQUIRE_REAL_KAFKA=1 a registry that cannot be had is a failure that
    says why, never a skip. (A version Maven does not know fails the same way, after a
    few seconds of Maven; the lock-stage-rename cache is the broker's, which
    test_broker.py checks with a broken artifact.)"""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DEDUPE_REQUIRE_REAL_KAFKA", "1")
    monkeypatch.setenv("DEDUPE_APICURIO_REGISTRY_VERSION", "no/such version")
    monkeypatch.setenv("DEDUPE_SCHEMA_REGISTRY_CACHE", str(cache))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (tmp_path / "test_inner.py").write_text(
        "def test_needs_registry(schema_registry):\n    assert schema_registry.url\n",
        encoding="utf-8",
    )
    # "-p no:dedupe_consumer" keeps the installed entry point from registering the
    # same module a second time next to the explicit -p.
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:dedupe_consumer"),
            *("-p", "dedupe_consumer.testing.pytest_plugin", "-p", "no:cacheprovider", "-rA"),
            str(tmp_path / "test_inner.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "1 error" in output and "skipped" not in output, output
    assert "DEDUPE_REQUIRE_REAL_KAFKA=1 but the schema registry did not start" in output, output
    assert "Apicurio Registry version 'no/such version'" in output, output
    assert not cache.exists(), "nothing may be fetched for a version that is not one"
