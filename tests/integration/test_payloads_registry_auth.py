"""A Schema Registry behind HTTP basic auth (``payload.schema_registry_basic_auth``).

Apicurio 2.x offers no basic auth of its own, so the real registry (the
``schema_registry`` fixture) is put behind a small reverse proxy that demands it,
as a gateway in front of Confluent's registry or Confluent Cloud's does: the
consumer's credentials must reach the registry, and a wrong password must stop the
consumer at once, with an error that names the setting and never shows the secret.
"""

from __future__ import annotations

import base64
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dedupe_consumer import DedupeConsumer, Settings
from dedupe_consumer.errors import SchemaRegistryUnavailableError
from dedupe_consumer.testing import LocalSchemaRegistry
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import committed_offsets, settings_for
from .test_payloads_registry import RecordingHandler, avro_record, produce_avro_orders

pytestmark = pytest.mark.kafka

USER, PASSWORD = "orders-consumer", "s3cret-Reg1stry-pass"


@contextmanager
def basic_auth_proxy(upstream: str, user: str, password: str) -> Iterator[tuple[str, list[str]]]:
    """``(url, seen)``: the registry at ``upstream`` behind basic auth on a loopback port;
    ``seen`` gets each request's Authorization header ('' when absent)."""
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    seen: list[str] = []
    base = upstream.split("/apis/", 1)[0]

    class Proxy(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            given = self.headers.get("Authorization", "")
            seen.append(given)
            if given != expected:
                body = b'{"error_code": 40101, "message": "Unauthorized"}'
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length else None
            request = urllib.request.Request(base + self.path, data=data, method=self.command)
            for name in ("Content-Type", "Accept"):
                if self.headers.get(name):
                    request.add_header(name, self.headers[name])
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    status, payload = answer.status, answer.read()
                    content_type = answer.headers.get("Content-Type", "application/json")
            except urllib.error.HTTPError as refused:
                status, payload = refused.code, refused.read()
                content_type = refused.headers.get("Content-Type", "application/json")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = _forward  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        yield f"http://127.0.0.1:{port}/apis/ccompat/v7", seen
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_reach_the_registry_and_a_wrong_password_stops_at_once(
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
    schema_registry: LocalSchemaRegistry,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Measured ~6 s."""
    topic = kafka_topic(partitions=1)
    sent = produce_avro_orders(kafka_bootstrap, schema_registry.url, topic, 6)
    group = f"{topic}-group"
    with basic_auth_proxy(schema_registry.url, USER, PASSWORD) as (url, seen):

        def settings(password: str) -> Settings:
            return settings_for(
                kafka_bootstrap,
                topic,
                tmp_path / "state",
                group=group,
                payload={
                    "format": "avro",
                    "schema_registry_url": url,
                    "schema_registry_basic_auth": f"{USER}:{password}",
                    "registry_retry_for": "30s",
                },
                dedupe={"id_source": "field:/order_id"},
            )

        wrong = "not-the-" + PASSWORD
        refused = DedupeConsumer(RecordingHandler(), settings(wrong))
        started = time.monotonic()
        with pytest.raises(SchemaRegistryUnavailableError, match="basic_auth") as info:
            refused.run(
                until=lambda t: time.monotonic() > started + 60, install_signal_handlers=False
            )
        assert time.monotonic() - started < 20, "a refused password is not retried for 30 s"
        assert seen and all(header.startswith("Basic ") for header in seen)
        assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: -1001}
        output = capfd.readouterr()
        for text in (str(info.value), output.out, output.err):
            assert wrong not in text and PASSWORD not in text

        handler = RecordingHandler()
        consumer = DedupeConsumer(handler, settings(PASSWORD))
        deadline = time.monotonic() + 60
        consumer.run(
            until=lambda t: t.consumed >= len(sent) or time.monotonic() > deadline,
            install_signal_handlers=False,
        )
    unique = list(dict.fromkeys(sent))
    assert dict(handler.seen) == {order_id: avro_record(order_id) for order_id in unique}
    assert committed_offsets(kafka_bootstrap, group, topic, 1) == {0: len(sent)}
    assert PASSWORD not in capfd.readouterr().err
