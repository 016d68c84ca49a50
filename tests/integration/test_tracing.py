"""Tracing against a real broker: spans exported over OTLP/HTTP to a receiver started here."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from dedupe_consumer import DedupeConsumer, Event, Handler, PermanentError
from dedupe_consumer.observability import tracing
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import headers_of, produce_raw, read_all, settings_for

pytestmark = pytest.mark.kafka

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class _Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP traces endpoint: decodes each ExportTraceServiceRequest."""

    spans: ClassVar[list[dict[str, Any]]] = []
    paths: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        _Receiver.paths.append(self.path)
        for resource in request.resource_spans:
            service = {a.key: _value(a.value) for a in resource.resource.attributes}
            for scope in resource.scope_spans:
                for span in scope.spans:
                    _Receiver.spans.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "status": span.status.code,
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                            "service": service.get("service.name"),
                        }
                    )
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _value(value: AnyValue) -> object:
    return getattr(value, value.WhichOneof("value") or "string_value")


@pytest.fixture
def receiver() -> Iterator[str]:
    _Receiver.spans, _Receiver.paths = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    server.shutdown()
    server.server_close()


class Poisoned(Handler):
    def handle(self, event: Event) -> None:
        if event.id == "poison":
            raise PermanentError("cannot")


def test_spans_reach_an_otlp_receiver_with_parents_decisions_and_a_traced_dead_letter(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path, receiver: str
) -> None:
    topic = kafka_topic(partitions=1)
    traceparent = f"00-{TRACE_ID}-{PARENT}-01".encode()

    def message(event_id: str, *, traced: bool = True) -> dict[str, Any]:
        headers = [("event-id", event_id.encode())]
        if traced:
            headers.append(("traceparent", traceparent))
        return {"key": event_id.encode(), "value": b"{}", "headers": headers}

    produce_raw(
        kafka_bootstrap,
        topic,
        [message("a"), message("b"), message("a"), message("poison"), message("c", traced=False)],
    )
    settings = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "state",
        tracing={"enabled": True, "endpoint": receiver, "service_name": "traced-test"},
    )
    consumer = DedupeConsumer(Poisoned(), settings)
    consumer.run(until=lambda t: t.consumed >= 5, install_signal_handlers=False)
    assert not tracing.tracing_on()  # closed with the run: its spans flushed

    spans = sorted(
        (s for s in _Receiver.spans if s["name"] == f"process {topic}"),
        key=lambda s: s["attributes"]["messaging.kafka.offset"],
    )
    assert set(_Receiver.paths) == {"/v1/traces"}
    assert [
        (s["attributes"].get("messaging.message.id"), s["attributes"]["dedupe.decision"])
        for s in spans
    ] == [
        ("a", "handled"),
        ("b", "handled"),
        ("a", "duplicate"),
        ("poison", "dead-lettered"),
        ("c", "handled"),
    ]
    for span in spans[:4]:
        assert (span["trace_id"], span["parent"]) == (TRACE_ID, PARENT)
    assert spans[4]["trace_id"] != TRACE_ID and spans[4]["parent"] == ""
    first = spans[0]
    assert first["service"] == "traced-test"
    assert first["attributes"]["messaging.system"] == "kafka"
    assert first["attributes"]["messaging.destination.name"] == topic
    assert first["attributes"]["messaging.destination.partition.id"] == "0"
    assert first["attributes"]["messaging.consumer.group.name"] == settings.kafka.group_id
    assert first["attributes"]["dedupe.retries"] == 0
    poison = spans[3]
    assert poison["status"] == 2  # STATUS_CODE_ERROR
    assert poison["attributes"]["dedupe.dead_letter.reason"] == "permanent-error"

    [letter] = read_all(kafka_bootstrap, settings.processing.dead_letter_topic, 1)
    headers = headers_of(letter)
    assert headers["traceparent"].decode().split("-")[1:3] == [TRACE_ID, poison["span_id"]]
    assert headers["dlq.original.traceparent"] == traceparent
