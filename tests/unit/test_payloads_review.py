"""Review of issue 18 (payloads): inputs from producers and registries that are not ours.

The registry failures are served by a real HTTP server on 127.0.0.1 (a thread of this
test) that answers as a broken registry or proxy would; the records by confluent-kafka's
in-memory registry and its serializers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from confluent_kafka.schema_registry.avro import AvroSerializer

from dedupe_consumer import Settings
from dedupe_consumer.ids import InvalidPayload, MissingId, parse_id_source
from dedupe_consumer.kafka.schema_registry import RegistryDecoder
from dedupe_consumer.payloads import (
    PayloadDecoder,
    SchemaRegistryUnavailableError,
    UnknownSchema,
    record_json,
)
from tests.protos.orders_pb2 import Order as OrderProto

from .test_payloads import OrderHandler, encode, message, registry

# -- a registry that is not a registry -----------------------------------------------------


class _Answers(BaseHTTPRequestHandler):
    answer: tuple[int, str, bytes] | None = None
    """(status, content type, body); None: never answer (a registry that hangs)."""
    released = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.answer is None:
            self.released.wait(30)
            return
        status, content_type, body = self.answer
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def fake_registry() -> Iterator[tuple[str, type[_Answers]]]:
    answers: type[_Answers] = type("Answers", (_Answers,), {"released": threading.Event()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), answers)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", answers
    finally:
        answers.released.set()
        server.shutdown()
        server.server_close()


WIRE = b"\x00\x00\x00\x00\x01\x02\x06abc"  # schema ID 1, then an Avro body


def decode_within(decoder: RegistryDecoder, seconds: float) -> Exception | None:
    """What ``decode`` raises, or None; fails the test if it has not returned in time."""
    outcome: list[Exception | None] = []

    def run() -> None:
        try:
            decoder.decode(WIRE, message(WIRE))
            outcome.append(None)
        except Exception as raised:
            outcome.append(raised)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"decode still waits on the registry after {seconds}s (registry_retry_for=1s)"
    return outcome[0]


def test_a_registry_that_never_answers_stops_the_consumer_after_retry_for(
    fake_registry: tuple[str, type[_Answers]],
) -> None:
    url, answers = fake_registry
    answers.answer = None
    raised = decode_within(RegistryDecoder("avro", url, retry_for_s=1.0), 20.0)
    assert isinstance(raised, SchemaRegistryUnavailableError), raised


def test_a_registry_that_is_down_gives_up_after_about_retry_for(
    fake_registry: tuple[str, type[_Answers]],
) -> None:
    """The docs promise backoff for registry_retry_for, then a stop; the client's own
    retries (3, with jitter up to 20 s) must not stretch it several times over."""
    url, answers = fake_registry
    answers.answer = (503, "text/html", b"<html>down for maintenance</html>")
    started = time.monotonic()
    raised = decode_within(RegistryDecoder("avro", url, retry_for_s=1.0), 30.0)
    assert isinstance(raised, SchemaRegistryUnavailableError), raised
    assert time.monotonic() - started < 4.0


def test_a_404_that_is_not_a_registry_answer_is_no_unknown_schema(
    fake_registry: tuple[str, type[_Answers]],
) -> None:
    """A wrong schema_registry_url (a path missing, another service) answers 404 to
    every schema: dead-lettering each record as unknown-schema would empty the topic."""
    url, answers = fake_registry
    answers.answer = (404, "text/html", b"<html>Not Found</html>")
    raised = decode_within(RegistryDecoder("avro", url, retry_for_s=0.5), 20.0)
    assert not isinstance(raised, UnknownSchema), raised
    assert isinstance(raised, SchemaRegistryUnavailableError), raised
    assert "schema_registry_url" in str(raised)


def test_the_registrys_own_404_is_still_an_unknown_schema(
    fake_registry: tuple[str, type[_Answers]],
) -> None:
    url, answers = fake_registry
    answers.answer = (404, "application/json", b'{"error_code":40403,"message":"not found"}')
    raised = decode_within(RegistryDecoder("avro", url, retry_for_s=0.5), 20.0)
    assert isinstance(raised, UnknownSchema), raised


def test_a_registry_answering_garbage_never_dead_letters_the_record(
    fake_registry: tuple[str, type[_Answers]],
) -> None:
    """A proxy's 200 HTML page is the registry's fault, not the record's."""
    url, answers = fake_registry
    answers.answer = (200, "text/html", b"<html>maintenance</html>")
    raised = decode_within(RegistryDecoder("avro", url, retry_for_s=0.5), 20.0)
    assert isinstance(raised, SchemaRegistryUnavailableError), raised


# -- records ------------------------------------------------------------------------------


def test_protobuf_zero_values_reach_the_model_and_the_sidecar() -> None:
    """proto3 omits scalars at their default (0, ""): a model requiring ``amount``
    must still get ``amount=0``, not dead-letter the order."""
    zero = OrderProto(order_id="p-1", amount=0)
    assert OrderHandler().validate(zero).amount == 0
    # int64 is a string in protobuf's JSON mapping (JavaScript numbers stop at 2**53)
    assert json.loads(record_json(zero))["amount"] == "0"


def _strict(text: bytes) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_the_sidecars_json_body_is_json_even_with_nan_floats() -> None:
    body = record_json({"f": float("nan"), "g": float("inf"), "h": [float("-inf")], "i": 1.5})
    assert _strict(body) == {"f": "NaN", "g": "Infinity", "h": ["-Infinity"], "i": 1.5}


def test_avro_nan_through_record_json() -> None:
    schema = json.dumps(
        {"type": "record", "name": "M", "fields": [{"name": "f", "type": "double"}]}
    )
    client = registry()
    value = encode(AvroSerializer(client, schema), {"f": float("nan")})
    decoded = PayloadDecoder(
        RegistryDecoder("avro", "http://registry.invalid:8081", client=client)
    ).open(message(value))
    assert _strict(record_json(decoded.record())) == {"f": "NaN"}


def test_structured_data_base64_that_is_not_base64_is_an_invalid_payload() -> None:
    envelope = {"specversion": "1.0", "type": "t", "id": "1", "source": "/s"}
    msg = message(
        json.dumps(envelope | {"data_base64": "!!!!"}).encode(),
        [("content-type", b"application/cloudevents+json")],
    )
    with pytest.raises(InvalidPayload, match="base64"):
        PayloadDecoder(cloudevents=True).open(msg)


def test_a_non_ascii_digit_in_a_field_path_is_absent_not_a_crash() -> None:
    client = registry()
    schema = json.dumps(
        {
            "type": "record",
            "name": "L",
            "fields": [{"name": "arr", "type": {"type": "array", "items": "string"}}],
        }
    )
    value = encode(AvroSerializer(client, schema), {"arr": ["a", "b"]})
    msg = message(value)
    decoded = PayloadDecoder(
        RegistryDecoder("avro", "http://registry.invalid:8081", client=client)
    ).open(msg)
    with pytest.raises(MissingId, match="absent"):
        parse_id_source("field:/arr/²")(msg, decoded)


# -- secrets ------------------------------------------------------------------------------


def test_a_registry_password_of_the_wrong_type_is_not_printed() -> None:
    with pytest.raises(Exception) as info:
        Settings.load(
            kafka={"bootstrap_servers": "x:1", "group_id": "g", "topics": ["t"]},
            processing={"dead_letter_topic": "d"},
            payload={
                "format": "avro",
                "schema_registry_url": "http://r:8081",
                "schema_registry_basic_auth": 73519468,
            },
        )
    assert "schema_registry_basic_auth" in str(info.value)
    assert "73519468" not in str(info.value)
