"""Payloads (issue 18): CloudEvents identity and Schema Registry decoding, unit level.

The registry here is confluent-kafka's in-memory ``MockSchemaRegistryClient``; the
integration tests run the same paths against a real registry server.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from pydantic import BaseModel, ValidationError

from dedupe_consumer import Event, Handler, Settings
from dedupe_consumer.ids import InvalidPayload, MissingId, parse_id_source
from dedupe_consumer.kafka.schema_registry import RegistryDecoder
from dedupe_consumer.payloads import (
    PayloadDecoder,
    SchemaRegistryUnavailableError,
    UnknownSchema,
)
from dedupe_consumer.replay import Record
from tests.protos.orders_pb2 import Order as OrderProto

from .conftest import TOPIC, Rig, make_settings

ORDER_AVRO = json.dumps(
    {
        "type": "record",
        "name": "Order",
        "fields": [
            {"name": "order_id", "type": "string"},
            {"name": "amount", "type": "long"},
            {
                "name": "customer",
                "type": [
                    "null",
                    {
                        "type": "record",
                        "name": "Customer",
                        "fields": [{"name": "id", "type": "string"}],
                    },
                ],
                "default": None,
            },
        ],
    }
)
ORDER_JSON_SCHEMA = json.dumps(
    {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Order",
        "type": "object",
        "properties": {"order_id": {"type": "string"}, "amount": {"type": "integer"}},
        "required": ["order_id", "amount"],
    }
)


def message(
    value: bytes | None,
    headers: list[tuple[str, str | bytes | None]] | None = None,
    offset: int = 0,
    key: bytes | None = None,
) -> Record:
    return Record(TOPIC, 0, offset, key, value, headers or [], 1_700_000_000_000 + offset)


def ce_headers(**attrs: str) -> list[tuple[str, str | bytes | None]]:
    base = {"specversion": "1.0", "type": "com.example.order.created"}
    base.update(attrs)
    return [(f"ce_{k}", v.encode()) for k, v in base.items()]


# -- CloudEvents -------------------------------------------------------------------------


def opened(msg: Record) -> Any:
    return PayloadDecoder(cloudevents=True).open(msg)


def test_binary_mode_identity_is_source_and_id() -> None:
    msg = message(b'{"amount": 5}', ce_headers(id="A-1", source="/orders", subject="o/1"))
    decoded = opened(msg)
    assert parse_id_source("cloudevents")(msg, decoded) == '["/orders","A-1"]'
    assert decoded.cloudevent.type == "com.example.order.created"
    assert decoded.cloudevent.subject == "o/1"
    assert decoded.raw and decoded.record() == b'{"amount": 5}'  # data is the value


def test_the_pair_is_unambiguous() -> None:
    extract = parse_id_source("cloudevents")
    one = message(b"", ce_headers(id="b c", source="a"))
    two = message(b"", ce_headers(id="c", source="a b"))
    assert extract(one, opened(one)) != extract(two, opened(two))


@pytest.mark.parametrize(
    ("source", "event_id"),
    [("a", 'b"c'), ("ü/ß", "日本"), ("back\\slash", "x,y"), ('["a"', '"b"]')],
)
def test_the_pair_is_the_json_array_of_source_and_id(source: str, event_id: str) -> None:
    msg = message(b"", ce_headers(id=event_id, source=source))
    got = parse_id_source("cloudevents")(msg, opened(msg))
    assert json.loads(got) == [source, event_id]
    assert got == json.dumps([source, event_id], ensure_ascii=False, separators=(",", ":"))


def test_same_id_other_source_is_another_event() -> None:
    extract = parse_id_source("cloudevents")
    one = message(b"", ce_headers(id="1", source="/billing"))
    two = message(b"", ce_headers(id="1", source="/shipping"))
    assert extract(one, opened(one)) != extract(two, opened(two))


@pytest.mark.parametrize("missing", ["id", "source"])
def test_binary_mode_without_id_or_source_is_a_missing_id(missing: str) -> None:
    attrs = {"id": "A-1", "source": "/orders"}
    attrs[missing] = ""
    with pytest.raises(MissingId, match=f"'{missing}'") as info:
        opened(message(b"{}", ce_headers(**attrs)))
    assert info.value.reason == "missing-id"


def test_binary_mode_without_type_is_an_invalid_payload() -> None:
    headers: list[tuple[str, str | bytes | None]] = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"1"),
        ("ce_source", b"/s"),
    ]
    with pytest.raises(InvalidPayload) as info:
        opened(message(b"{}", headers))
    assert info.value.reason == "invalid-payload"


def test_binary_mode_time_is_parsed() -> None:
    msg = message(b"", ce_headers(id="1", source="/s", time="2026-11-29T06:00:00Z"))
    assert opened(msg).cloudevent.time == datetime(2026, 11, 29, 6, 0, tzinfo=UTC)


def test_no_attribute_is_invented() -> None:
    """The SDK fills a missing id with a uuid4 and a missing time with now: an invented
    id would make every copy of an event a new event."""
    binary = message(b"", ce_headers(id="1", source="/s"))
    assert opened(binary).cloudevent.time is None
    envelope = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    assert opened(structured(envelope)).cloudevent.time is None
    for no_id in (message(b"", ce_headers(source="/s")), structured({**envelope, "id": None})):
        with pytest.raises(MissingId):
            opened(no_id)


def structured(envelope: dict[str, Any] | bytes) -> Record:
    value = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
    return message(value, [("content-type", b"application/cloudevents+json; charset=utf-8")])


def test_structured_mode_reads_the_envelope() -> None:
    msg = structured(
        {
            "specversion": "1.0",
            "id": "A-1",
            "source": "/orders",
            "type": "order.created",
            "datacontenttype": "application/json",
            "data": {"order": {"id": "o-1"}},
            "tenant": "eu",
        }
    )
    decoded = opened(msg)
    assert parse_id_source("cloudevents")(msg, decoded) == '["/orders","A-1"]'
    assert decoded.cloudevent.structured
    assert decoded.cloudevent.extensions == {"tenant": "eu"}
    assert not decoded.raw and decoded.record() == {"order": {"id": "o-1"}}


@pytest.mark.parametrize(
    ("envelope", "error"),
    [
        (b"not json", InvalidPayload),
        (b"[1, 2]", InvalidPayload),
        ({"specversion": "1.0", "source": "/s", "type": "t"}, MissingId),
        ({"specversion": "1.0", "id": "1", "type": "t"}, MissingId),
        ({"specversion": "1.0", "id": "1", "source": "/s"}, InvalidPayload),
    ],
)
def test_structured_mode_bad_envelopes(envelope: dict[str, Any] | bytes, error: type) -> None:
    with pytest.raises(error):
        opened(structured(envelope))


def test_a_structured_resend_with_a_new_time_is_a_duplicate_not_a_conflict(
    rig: Callable[..., Rig],
) -> None:
    r = rig(dedupe={"id_source": "cloudevents"})
    base = {"specversion": "1.0", "id": "A-1", "source": "/o", "type": "t", "data": {"n": 1}}
    stats = r.engine.process(
        [
            replace(structured({**base, "time": "2026-11-29T06:00:00Z"}), offset_=0),
            replace(structured({**base, "time": "2026-11-29T06:05:00Z"}), offset_=1),
            replace(structured({**base, "data": {"n": 2}}), offset_=2),  # other data
        ]
    ).stats
    assert stats.duplicates == 1
    assert [d.letter.reason for d in r.dead.letters] == ["conflicting-duplicate"]


def test_a_tombstone_has_no_record_and_no_field_id() -> None:
    decoded = decoder("avro", registry()).open(message(None))
    assert decoded.record() is None
    with pytest.raises(MissingId, match="absent"):
        parse_id_source("field:/order_id")(message(None), decoded)
    with pytest.raises(ValidationError):  # a payload_model refuses it: invalid-payload
        OrderHandler().validate(decoded.record())


def test_a_message_that_is_no_cloudevent_is_a_missing_id() -> None:
    with pytest.raises(MissingId, match="not a CloudEvent"):
        opened(message(b'{"id": 1}', [("event-id", b"1")]))


def test_engine_gives_the_handler_the_cloudevent(rig: Callable[..., Rig]) -> None:
    r = rig(dedupe={"id_source": "cloudevents"})
    batch = [
        message(b"{}", ce_headers(id="A-1", source="/orders", subject="s"), 0),
        message(b"{}", ce_headers(id="A-1", source="/orders", subject="s"), 1),  # duplicate
        message(b"{}", ce_headers(id="A-1", source="/refunds"), 2),  # another event
        message(b"{}", [("ce_id", b"x")], 3),  # no source: dead-lettered
    ]
    stats = r.engine.process(batch).stats
    calls = r.handler.calls  # type: ignore[attr-defined]
    assert [e.id for e in calls] == ['["/orders","A-1"]', '["/refunds","A-1"]']
    assert calls[0].cloudevent is not None and calls[0].cloudevent.subject == "s"
    assert stats.duplicates == 1
    assert [d.letter.reason for d in r.dead.letters] == ["missing-id"]


# -- Schema Registry ---------------------------------------------------------------------


def registry() -> Any:
    """confluent-kafka's in-memory registry: one per test, shared with its serializers."""
    return SchemaRegistryClient.new_client({"url": "mock://payloads-test"})


def encode(serializer: Any, record: Any, topic: str = TOPIC) -> bytes:
    return bytes(serializer(record, SerializationContext(topic, MessageField.VALUE)))


def decoder(fmt: str, client: Any, **kwargs: Any) -> PayloadDecoder:
    return PayloadDecoder(
        RegistryDecoder(fmt, "http://registry.invalid:8081", client=client, **kwargs)
    )


def test_avro_field_ids_nested_and_unions() -> None:
    client = registry()
    value = encode(
        AvroSerializer(client, ORDER_AVRO),
        {"order_id": "o-1", "amount": 5, "customer": {"id": "c-9"}},
    )
    no_customer = encode(
        AvroSerializer(client, ORDER_AVRO), {"order_id": "o-2", "amount": 1, "customer": None}
    )
    payloads = decoder("avro", client)
    msg = message(value)
    decoded = payloads.open(msg)
    assert parse_id_source("field:/order_id")(msg, decoded) == "o-1"
    assert parse_id_source("field:/customer/id")(msg, decoded) == "c-9"
    assert decoded.record() is decoded.record()  # decoded once
    other = message(no_customer)
    with pytest.raises(MissingId, match=r"absent|null"):
        parse_id_source("field:/customer/id")(other, payloads.open(other))


def test_json_schema_and_protobuf_fields() -> None:
    client = registry()
    json_value = encode(JSONSerializer(ORDER_JSON_SCHEMA, client), {"order_id": "o-7", "amount": 3})
    msg = message(json_value)
    assert (
        parse_id_source("field:/order_id")(msg, decoder("json-schema", client).open(msg)) == "o-7"
    )
    proto_value = encode(
        ProtobufSerializer(OrderProto, client, {"use.deprecated.format": False}),
        OrderProto(order_id="p-1", amount=2),
    )
    proto = decoder("protobuf", client, protobuf_message="tests.protos.orders_pb2:Order")
    msg = message(proto_value)
    decoded = proto.open(msg)
    assert parse_id_source("field:/order_id")(msg, decoded) == "p-1"
    with pytest.raises(MissingId, match="absent"):  # an unset message field
        parse_id_source("field:/customer/id")(msg, decoded)
    assert OrderHandler().validate(decoded.record()) == Order(order_id="p-1", amount=2)


def test_bytes_that_are_not_the_wire_format_are_an_invalid_payload() -> None:
    msg = message(b'{"order_id": "o-1"}')
    with pytest.raises(InvalidPayload) as info:
        decoder("avro", registry()).open(msg).record()
    assert info.value.reason == "invalid-payload"


def test_an_unknown_schema_id_is_its_own_reason() -> None:
    msg = message(b"\x00\x00\x00\x30\x39" + b"\x02")  # schema 12345, never registered
    with pytest.raises(UnknownSchema) as info:
        decoder("avro", registry()).open(msg).record()
    assert info.value.reason == "unknown-schema"


class _Flaky:
    """A deserializer that fails ``failures`` times with ``error``, then decodes."""

    def __init__(self, error: Exception, failures: int) -> None:
        self.error, self.failures, self.calls = error, failures, 0

    def __call__(self, value: bytes, ctx: Any) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return {"order_id": "late"}


def flaky(
    error: Exception, failures: int, retry_for_s: float = 10.0
) -> tuple[RegistryDecoder, list[float]]:
    slept: list[float] = []
    made = RegistryDecoder(
        "avro",
        "http://registry.invalid:8081",
        client=registry(),
        retry_for_s=retry_for_s,
        sleep=slept.append,
    )
    made._deserialize = _Flaky(error, failures)
    return made, slept


@pytest.mark.parametrize(
    "error",
    [ConnectionRefusedError(111, "refused"), SchemaRegistryError(503, 50301, "unavailable")],
)
def test_a_registry_that_blinks_is_retried_with_backoff(error: Exception) -> None:
    made, slept = flaky(error, failures=3)
    assert made.decode(b"\x00", message(b"\x00")) == {"order_id": "late"}
    assert len(slept) == 3 and slept == sorted(slept) and slept[0] > 0


def test_a_registry_that_stays_down_stops_the_consumer() -> None:
    made, _ = flaky(ConnectionRefusedError(111, "refused"), failures=10**9, retry_for_s=0.0)
    with pytest.raises(SchemaRegistryUnavailableError, match="registry_retry_for"):
        made.decode(b"\x00", message(b"\x00"))


def test_refused_credentials_stop_at_once() -> None:
    made, slept = flaky(SchemaRegistryError(401, 40101, "unauthorized"), failures=1)
    with pytest.raises(SchemaRegistryUnavailableError, match="basic_auth"):
        made.decode(b"\x00", message(b"\x00"))
    assert slept == []


class Order(BaseModel):
    order_id: str
    amount: int


class OrderHandler(Handler):
    payload_model = Order

    def __init__(self) -> None:
        self.payloads: list[Any] = []

    def handle(self, event: Event) -> None:
        self.payloads.append(event.payload)


def avro_rig(tmp_path: Path, handler: Handler, client: Any, id_source: str) -> Rig:
    payload = {"format": "avro", "schema_registry_url": "http://registry.invalid:8081"}
    r = Rig(tmp_path, handler, dedupe={"id_source": id_source}, payload=payload)
    r.engine.close()
    assert r.store is not None
    r.store.close()
    r.open = lambda: _open_with(r, decoder("avro", client))  # type: ignore[method-assign]
    r.engine = r.open()
    return r


def _open_with(r: Rig, payloads: PayloadDecoder) -> Any:
    from dedupe_consumer.engine import Engine
    from dedupe_consumer.models import TopicPartition
    from dedupe_consumer.store import RocksStore

    r.store = RocksStore(r.settings.store.path, retention_ms=7 * 86_400_000)
    engine = Engine(
        r.handler,
        r.settings.dedupe,
        r.settings.processing,
        r.store,
        r.dead,
        sweep_keys=100,
        revoked_state_grace=r.settings.store.revoked_state_grace,
        clock=r.clock,
        payloads=payloads,
    )
    engine.assign([TopicPartition(TOPIC, p) for p in range(4)])
    return engine


def test_engine_decodes_once_for_id_and_model(tmp_path: Path) -> None:
    client = registry()
    serializer = AvroSerializer(client, ORDER_AVRO)
    good = encode(serializer, {"order_id": "o-1", "amount": 5, "customer": None})
    handler = OrderHandler()
    r = avro_rig(tmp_path, handler, client, "field:/order_id")
    try:
        stats = r.engine.process(
            [message(good, offset=0), message(good, offset=1), message(b"junk", offset=2)]
        ).stats
        assert handler.payloads == [Order(order_id="o-1", amount=5)]
        assert stats.duplicates == 1
        assert [d.letter.reason for d in r.dead.letters] == ["invalid-payload"]
    finally:
        r.close()


def test_engine_header_ids_dead_letter_an_undecodable_payload_with_its_id(tmp_path: Path) -> None:
    client = registry()
    handler = OrderHandler()
    r = avro_rig(tmp_path, handler, client, "header:event-id")
    try:
        r.engine.process([message(b"\x00\x00\x00\x30\x39\x02", [("event-id", b"e-1")], offset=0)])
        [letter] = r.dead.letters
        assert letter.letter.reason == "unknown-schema"
        assert letter.letter.event_id == "e-1"
        assert handler.payloads == []
    finally:
        r.close()


# -- Settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "names"),
    [
        ({"payload": {"format": "avro"}}, "schema_registry_url"),
        (
            {"payload": {"format": "protobuf", "schema_registry_url": "http://r:8081"}},
            "protobuf_message",
        ),
        ({"payload": {"format": "avro", "schema_registry_url": "http://u:p@r:8081"}}, "basic_auth"),
        ({"payload": {"format": "avro", "schema_registry_url": "r:8081"}}, "http"),
        ({"payload": {"schema_registry_url": "http://r:8081"}}, "'raw'"),
        ({"dedupe": {"id_source": "field:/order_id"}}, "json:/order_id"),
        ({"dedupe": {"id_source": "field:order_id"}}, "field:/"),
    ],
)
def test_bad_payload_settings_name_the_key_and_the_fix(
    tmp_path: Path, sections: dict[str, Any], names: str
) -> None:
    with pytest.raises((ValidationError, ValueError, Exception)) as info:
        make_settings(tmp_path, **sections)
    assert names in str(info.value)


def test_the_registry_password_is_never_shown(tmp_path: Path) -> None:
    settings: Settings = make_settings(
        tmp_path,
        payload={
            "format": "avro",
            "schema_registry_url": "http://r:8081",
            "schema_registry_basic_auth": "user:hunter2",
        },
    )
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())


@pytest.mark.parametrize(
    "url",
    ["http://tok3nSECRET@r:8081", "tok3nSECRET@r:8081", "ftp://u:tok3nSECRET@r"],
)
def test_a_registry_url_with_a_token_is_refused_without_showing_it(
    tmp_path: Path, url: str
) -> None:
    with pytest.raises(Exception) as info:
        make_settings(tmp_path, payload={"format": "avro", "schema_registry_url": url})
    assert "schema_registry_url" in str(info.value)
    assert "tok3nSECRET" not in str(info.value)


def test_logs_show_the_registry_url_without_its_query() -> None:
    from dedupe_consumer.kafka.schema_registry import safe_url

    assert safe_url("https://r:8081/apis/ccompat/v7?api_key=tok3nSECRET") == (
        "https://r:8081/apis/ccompat/v7"
    )
