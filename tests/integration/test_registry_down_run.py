"""Review of issue 18: ``dedupe-consumer run`` when the Schema Registry fails mid-topic.

A real broker and a real consumer process; the registry is an HTTP server in this test
that serves schema 1 and answers 503 for schema 2. The consumer
must decide what it can, stop with a clear error and a non-zero exit, and commit
nothing past the last decided event; a SIGTERM while it waits for the registry must
stop it promptly.
"""

from __future__ import annotations

import io
import json
import signal
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fastavro
import pytest
from confluent_kafka import Producer

from dedupe_consumer.testing.pytest_plugin import TopicFactory
from tests.faults.consumer_process import effects_of, log_tail, start_consumer, stop_consumer
from tests.kafka_helpers import committed_offsets

ORDERS = {"o-1", "o-2", "o-3", "o-4"}
SCHEMA = {
    "type": "record",
    "name": "Order",
    "fields": [{"name": "order_id", "type": "string"}],
}


class _Registry(BaseHTTPRequestHandler):
    """Schema 1 is served; schema 2 answers 503 until ``down`` is False."""

    down = True

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/associations/"):  # confluent-kafka asks first: none here
            status, body = 404, b'{"error_code":40401,"message":"no associations"}'
        elif self.path.startswith("/schemas/ids/1") or not self.down:
            status, body = 200, json.dumps({"schema": json.dumps(SCHEMA)}).encode()
        else:
            status, body = 503, b"<html>503 Service Unavailable</html>"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def registry_stub() -> Iterator[tuple[str, type[_Registry]]]:
    answers: type[_Registry] = type("Registry", (_Registry,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), answers)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", answers
    finally:
        server.shutdown()
        server.server_close()


def wire(schema_id: int, order_id: str) -> bytes:
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(SCHEMA), {"order_id": order_id})
    return b"\x00" + struct.pack(">I", schema_id) + body.getvalue()


def produce(bootstrap: str, topic: str) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for schema_id, order_id in [(1, "o-1"), (1, "o-2"), (2, "o-3"), (1, "o-4")]:
        producer.produce(
            topic, value=wire(schema_id, order_id), headers=[("event-id", order_id.encode())]
        )
    assert producer.flush(30) == 0


def config(
    tmp_path: Path, bootstrap: str, topic: str, url: str, id_source: str, retry: str
) -> Path:
    path = tmp_path / "consumer.toml"
    path.write_text(f"""
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{topic}-group"
topics = ["{topic}"]
[kafka.consumer]
"session.timeout.ms" = 6000
[dedupe]
id_source = "{id_source}"
[payload]
format = "avro"
schema_registry_url = "{url}"
registry_retry_for = "{retry}"
[store]
path = "{tmp_path / "state"}"
[processing]
batch_size = 10
poll_timeout = "100ms"
dead_letter_topic = "{topic}.dlq"
[observability]
log_format = "json"
""")
    return path


@pytest.mark.kafka
# header: IDs are checked in process by test_payloads_registry; here the phase-1 path
@pytest.mark.parametrize("id_source", ["field:/order_id"])
def test_a_registry_down_mid_topic_stops_run_after_the_decided_prefix(
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
    registry_stub: tuple[str, type[_Registry]],
    tmp_path: Path,
    id_source: str,
) -> None:
    """field: fails in phase 1 (the ID), header: in the walk (the payload)."""
    url, answers = registry_stub
    topic = kafka_topic(partitions=1)
    produce(kafka_bootstrap, topic)
    path = config(tmp_path, kafka_bootstrap, topic, url, id_source, "1s")
    effects = tmp_path / "effects"
    proc = start_consumer(path, effects)
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    log = log_tail(path, 6000)
    assert code != 0, log
    assert "SchemaRegistryUnavailableError" in log, log
    assert "registry_retry_for" in log, log
    committed = committed_offsets(kafka_bootstrap, f"{topic}-group", topic, 1)
    print(f"{id_source}: exit {code}, effects {effects_of(effects)}, committed {committed}")
    assert "o-3" not in effects_of(effects)
    assert committed.get(0, -1) <= 2, committed  # never past the undecodable record
    answers.down = False  # the registry is back: a restart reads on, each order once
    restart_until_all_done(path, effects)


def restart_until_all_done(path: Path, effects: Path) -> None:
    proc = start_consumer(path, effects)
    try:
        deadline = time.monotonic() + 60
        while set(effects_of(effects)) != ORDERS and time.monotonic() < deadline:
            assert proc.poll() is None, log_tail(path)
            time.sleep(0.2)
        time.sleep(1.0)  # a repeat would show now
    finally:
        stop_consumer(proc)
    assert effects_of(effects) == dict.fromkeys(ORDERS, 1), effects_of(effects)


@pytest.mark.kafka
@pytest.mark.parametrize("id_source", ["field:/order_id", "header:event-id"])
def test_sigterm_while_the_registry_is_down_stops_promptly(
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
    registry_stub: tuple[str, type[_Registry]],
    tmp_path: Path,
    id_source: str,
) -> None:
    """header: decides o-1 and o-2 first, then waits on o-3's schema; field: waits in
    phase 1, before anything of the batch is decided."""
    url, answers = registry_stub  # schema 2: 503 until answers.down is False
    topic = kafka_topic(partitions=1)
    produce(kafka_bootstrap, topic)
    path = config(tmp_path, kafka_bootstrap, topic, url, id_source, "60s")
    decided_first = {"o-1", "o-2"} if id_source.startswith("header:") else set()
    effects = tmp_path / "effects"
    proc = start_consumer(path, effects)
    try:
        deadline = time.monotonic() + 60
        time.sleep(3.0)  # polled, and the first schema fetched
        while not decided_first <= set(effects_of(effects)) and time.monotonic() < deadline:
            assert proc.poll() is None, log_tail(path)
            time.sleep(0.2)
        time.sleep(1.0)  # now waiting on schema 2
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = proc.wait(timeout=90)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    committed = committed_offsets(kafka_bootstrap, f"{topic}-group", topic, 1)
    print(f"SIGTERM {id_source}: exit {code} after {took:.1f}s, committed {committed}")
    # registry_retry_for is 60 s: before the fix the stop waited it out, then exited 1
    assert took < 10, f"SIGTERM took {took:.1f}s to stop the consumer (exit {code})"
    assert code == 0, f"a SIGTERM is a stop, not a failure: exit {code}\n{log_tail(path)}"
    assert committed.get(0, -1) <= 2, committed
    answers.down = False
    restart_until_all_done(path, effects)
