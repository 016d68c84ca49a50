"""Sidecar mode against a real broker and a real HTTP endpoint.

The endpoint is a stdlib ``ThreadingHTTPServer`` on a free loopback port in
this process, answering from a script so each test decides what the target
says to which attempt. The sidecar runs in-process (``Sidecar.run`` on a
thread) except for the SIGTERM test, which runs the real command in a
subprocess, as the fault tests do.

The sidecar's default is 32 POSTs in flight, ordered per key. A test that
asserts the order of deliveries across keys runs with ``ordering = "partition"``
(:data:`IN_ORDER`), which keeps each partition strictly in offset order with the
same async handler and concurrency.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dedupe_consumer import ConfigError
from dedupe_consumer.sidecar.runner import Sidecar, sidecar_settings
from dedupe_consumer.sidecar.settings import SidecarAppSettings
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import (
    admin,
    committed_offsets,
    end_offsets,
    headers_of,
    produce_events,
    produce_raw,
    read_all,
    wait_for,
)
from .test_cli_run import check_log_format

pytestmark = pytest.mark.kafka
REPO = Path(__file__).resolve().parents[2]
IN_ORDER: dict[str, Any] = {"ordering": "partition"}
"""``[processing]`` for a test that asserts the order of deliveries across keys."""

# -- a scriptable HTTP target ----------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    headers: list[tuple[str, bytes]]
    body: bytes
    at: float
    status: int
    """What the target answered."""

    def header(self, name: str) -> bytes | None:
        found = [v for k, v in self.headers if k.lower() == name.lower()]
        return found[-1] if found else None

    @property
    def key(self) -> str:
        return (self.header("Idempotency-Key") or b"").decode()

    @property
    def partition(self) -> int:
        return int(self.header("Kafka-Partition") or b"-1")

    @property
    def offset(self) -> int:
        return int(self.header("Kafka-Offset") or b"-1")


Reply = tuple[int, dict[str, str], bytes]
Script = Callable[[bytes | None, int], Reply]
"""(Idempotency-Key, how many times this key was seen before) -> status, headers, body."""
OK: Reply = (200, {}, b"")


def replies(per_key: dict[bytes, list[Reply]], then: Reply = OK) -> Script:
    """Answer each key's attempts from its list in turn, then ``then`` for ever."""

    def script(key: bytes | None, seen: int) -> Reply:
        answers = per_key.get(key or b"", [])
        return answers[seen] if seen < len(answers) else then

    return script


class Target:
    """A local HTTP endpoint that records every request (thread-safe) and answers by script.

    ``delay_s`` is how long each answer takes (outside the lock: requests overlap);
    :attr:`peak` is the most requests it was serving at once.
    """

    def __init__(self, script: Script | None = None, port: int = 0, delay_s: float = 0.0) -> None:
        self.script = script or (lambda key, seen: OK)
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        target = self

        class Endpoint(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the sidecar's pool expects

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                # http.server decodes header bytes as latin-1: encoding back gives the bytes.
                headers = [(k, v.encode("latin-1")) for k, v in self.headers.items()]
                key = self.headers.get("Idempotency-Key")
                raw_key = key.encode("latin-1") if key is not None else None
                if delay_s:
                    with target.lock:
                        target.in_flight += 1
                        target.peak = max(target.peak, target.in_flight)
                    time.sleep(delay_s)
                    with target.lock:
                        target.in_flight -= 1
                with target.lock:
                    seen = sum(1 for r in target.received if r.header("Idempotency-Key") == raw_key)
                    status, extra, answer = target.script(raw_key, seen)
                    target.received.append(Received(headers, body, time.monotonic(), status))
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the sidecar opens up to `concurrency` connections at once
            daemon_threads = True

        self.server = Server(("127.0.0.1", port), Endpoint)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def accepted(self) -> list[Received]:
        """Requests answered 2xx: the deliveries that took effect, in arrival order."""
        return [r for r in self.snapshot() if 200 <= r.status < 300]


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target()
    yield server
    server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- running the sidecar in-process ----------------------------------------------------------


def sidecar_for(
    bootstrap: str,
    topic: str,
    tmp_path: Path,
    target_url: str,
    *,
    changelog: bool = True,
    processing: dict[str, Any] | None = None,
    dedupe: dict[str, Any] | None = None,
    **sidecar: Any,
) -> Sidecar:
    settings = SidecarAppSettings.load(
        kafka={
            "bootstrap_servers": bootstrap,
            "group_id": f"g-{topic}",
            "topics": [topic],
            "consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
        },
        store={"path": str(tmp_path / "state"), "changelog": changelog},
        dedupe=dedupe or {},
        processing={
            "dead_letter_topic": f"{topic}.dlq",
            "poll_timeout": "200ms",
            **(processing or {}),
        },
        sidecar={
            "target_url": target_url,
            "timeout": "5s",
            "retry_backoff": "10ms",
            "retry_backoff_max": "100ms",
            "listen_port": 0,
            **sidecar,
        },
    )
    return Sidecar(settings)


@contextmanager
def running(sidecar: Sidecar) -> Iterator[Sidecar]:
    """Run ``sidecar`` on a thread; on exit stop it and require a clean return."""
    failures: list[BaseException] = []

    def main() -> None:
        try:
            sidecar.run(install_signal_handlers=False)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=main, name="sidecar-under-test", daemon=True)
    thread.start()
    try:
        yield sidecar
    finally:
        sidecar.stop()
        thread.join(60)
    assert not thread.is_alive(), "the sidecar did not stop within 60 s"
    assert not failures, f"the sidecar failed: {failures[0]!r}"


def metric(sidecar: Sidecar, name: str, **labels: str) -> float:
    value = sidecar.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def get(port: int, path: str) -> tuple[int, str, bytes]:
    """GET ``path`` on the probe port: status, content type, body (error statuses too)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.headers.get("Content-Type", ""), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def event(
    event_id: str,
    value: bytes,
    key: bytes | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> dict[str, Any]:
    """``produce_raw`` arguments for one message with an ``event-id`` header."""
    return {
        "key": key,
        "value": value,
        "headers": [("event-id", event_id.encode()), *(headers or [])],
    }


# -- settings --------------------------------------------------------------------------------


def test_sidecar_settings_env_token_statuses_and_retry_mapping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEDUPE_SIDECAR__BEARER_TOKEN", "from-env")
    base: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "127.0.0.1:1", "group_id": "g", "topics": ["t"]},
        "processing": {"dead_letter_topic": "t.dlq"},
    }
    settings = SidecarAppSettings.load(**base, sidecar={"target_url": "http://127.0.0.1:8080/e"})
    sidecar = settings.sidecar
    assert sidecar is not None
    assert sidecar.bearer_token is not None
    assert sidecar.bearer_token.get_secret_value() == "from-env"
    assert "from-env" not in repr(settings)  # a secret never reaches a log line
    assert [s for s in (400, 404, 408, 409, 422, 429, 500, 503) if sidecar.is_permanent(s)] == [
        400,
        404,
        409,
        422,
    ]

    effective, _ = sidecar_settings(
        SidecarAppSettings.load(**base, sidecar={"target_url": "http://h/e", "max_retries": 7})
    )
    assert effective.processing.max_retries == 7  # the engine retries with the sidecar's budget

    with pytest.raises(ConfigError, match=r"processing.max_retries = 3 but sidecar.max_retries"):
        sidecar_settings(
            SidecarAppSettings.load(
                kafka=base["kafka"],
                processing={"dead_letter_topic": "t.dlq", "max_retries": 3},
                sidecar={"target_url": "http://h/e", "max_retries": 7},
            )
        )
    monkeypatch.delenv("DEDUPE_SIDECAR__BEARER_TOKEN")  # or it alone would make a section
    with pytest.raises(ConfigError, match="needs a \\[sidecar\\] section"):
        sidecar_settings(SidecarAppSettings.load(**base))
    with pytest.raises(ConfigError) as bad:
        SidecarAppSettings.load(
            **base,
            sidecar={"target_url": "ftp://h/e", "permanent_statuses": ["2xx"], "timeout": "0s"},
        )
    message = str(bad.value)
    assert "sidecar.target_url" in message and "http:// or https://" in message
    assert "sidecar.permanent_statuses.0" in message and "is a success" in message
    assert "sidecar.timeout" in message and "longer than zero" in message


# -- delivery --------------------------------------------------------------------------------


def test_500_twice_then_200_is_one_accepted_delivery_with_exact_headers_and_body(
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = kafka_topic(partitions=1)
    first_value = b'{"amount_cents": 5}\x00\xff raw bytes'
    produce_raw(
        kafka_bootstrap,
        topic,
        [
            event(
                "e-1",
                first_value,
                key=b"order-1",
                headers=[
                    ("content-type", b"application/json"),
                    ("trace id", b"t-1"),
                    ("bin", b"\x00\x01"),
                ],
            ),
            event("e-2", b"second", key=b"\xff\xfe"),
        ],
    )
    server = Target(replies({b"e-1": [(500, {}, b"boom"), (500, {}, b"boom")]}))
    monkeypatch.setenv("DEDUPE_SIDECAR__BEARER_TOKEN", "s3cret")
    try:
        sidecar = sidecar_for(kafka_bootstrap, topic, tmp_path, server.url, processing=IN_ORDER)
        with running(sidecar):
            wait_for(lambda: len(server.accepted()) >= 2, 90, "both events delivered")
            wait_for(
                lambda: committed_offsets(kafka_bootstrap, f"g-{topic}", topic, 1) == {0: 2},
                30,
                "offsets committed after the deliveries",
            )
    finally:
        server.close()

    attempts = server.snapshot()
    assert [(r.key, r.status) for r in attempts] == [
        ("e-1", 500),
        ("e-1", 500),
        ("e-1", 200),
        ("e-2", 200),
    ]
    assert metric(sidecar, "dedupe_handler_retries_total", topic=topic) == 2
    assert metric(sidecar, "dedupe_sidecar_requests_total", status="500") == 2
    totals = sidecar.consumer.totals
    assert (totals.handled, totals.dead_lettered) == (2, 0)

    one, two = server.accepted()
    assert one.body == first_value  # byte for byte
    assert one.header("Kafka-Topic") == topic.encode()
    assert (one.partition, one.offset) == (0, 0)
    assert one.header("Kafka-Key") == b"order-1"
    assert one.header("Kafka-Key-Encoding") is None
    assert one.header("Content-Type") == b"application/json"  # from the Kafka header
    assert one.header("Authorization") == b"Bearer s3cret"  # from DEDUPE_SIDECAR__BEARER_TOKEN
    assert one.header("Kafka-Header-event-id") == b"e-1"
    assert one.header("Kafka-Header-content-type") == b"application/json"
    assert one.header("Kafka-Header-trace%20id") == b"t-1"  # percent-encoded name
    assert base64.b64decode(one.header("Kafka-Header-bin") or b"") == b"\x00\x01"
    assert one.header("Kafka-Headers-Base64") == b"Kafka-Header-bin"

    assert two.body == b"second"
    assert two.offset == 1
    assert two.header("Kafka-Key-Encoding") == b"base64"
    assert base64.b64decode(two.header("Kafka-Key") or b"") == b"\xff\xfe"
    assert two.header("Content-Type") == b"application/octet-stream"  # the configured default


def test_retry_after_is_honoured_up_to_retry_backoff_max_and_408_is_retried(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    produce_raw(kafka_bootstrap, topic, [event("e-1", b"v")])
    server = Target(
        replies({b"e-1": [(408, {}, b""), (429, {"Retry-After": "3600"}, b"slow down")]})
    )
    try:
        sidecar = sidecar_for(kafka_bootstrap, topic, tmp_path, server.url, retry_backoff_max="1s")
        with running(sidecar):
            wait_for(lambda: len(server.accepted()) == 1, 90, "the event delivered")
    finally:
        server.close()
    first, second, third = server.snapshot()
    assert [r.status for r in (first, second, third)] == [408, 429, 200]
    assert second.at - first.at < 0.9  # 408: only the engine's 10-20 ms backoff
    # 429 with Retry-After: 3600 waits retry_backoff_max (1 s), not 10 ms and not an hour.
    assert 0.9 <= third.at - second.at < 10


def test_permanent_status_goes_to_dead_letter_topic_with_status_and_snippet(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    produce_raw(kafka_bootstrap, topic, [event("e-1", b"bad"), event("e-2", b"good")])
    body = b"invalid amount: " + b"x" * 3000
    server = Target(replies({b"e-1": [(400, {}, body)]}))
    try:
        sidecar = sidecar_for(kafka_bootstrap, topic, tmp_path, server.url, processing=IN_ORDER)
        with running(sidecar):
            wait_for(lambda: len(server.accepted()) == 1, 90, "the good event delivered")
            letters = read_all(kafka_bootstrap, f"{topic}.dlq", 1, timeout_s=60)
    finally:
        server.close()

    assert [(r.key, r.status) for r in server.snapshot()] == [("e-1", 400), ("e-2", 200)]
    assert len(letters) == 1
    headers = headers_of(letters[0])
    assert letters[0].value() == b"bad"
    assert headers["dlq.reason"] == b"permanent-error"
    assert headers["dlq.error.class"] == b"PermanentError"
    assert headers["dlq.event.id"] == b"e-1"
    assert headers["dlq.attempts"] == b"1"
    message = headers["dlq.error.message"].decode()
    prefix = "HTTP 400 Bad Request: "
    assert message.startswith(prefix + "invalid amount: xxx")
    assert len(message) == len(prefix) + 500  # the snippet is cut at 500 characters
    assert sidecar.consumer.totals.dead_lettered == 1


def test_target_down_for_a_while_then_everything_delivered_in_partition_order(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=2)
    sent = produce_events(kafka_bootstrap, topic, 40, duplicates=0.0, seed=61)
    port = free_port()  # nothing listens here yet: connection refused
    sidecar = sidecar_for(
        kafka_bootstrap,
        topic,
        tmp_path,
        f"http://127.0.0.1:{port}/events",
        processing=IN_ORDER,
        max_retries=100,
        retry_backoff="50ms",
        retry_backoff_max="200ms",
    )
    server: Target | None = None
    try:
        with running(sidecar):
            wait_for(
                lambda: metric(sidecar, "dedupe_sidecar_requests_total", status="error") >= 3,
                90,
                "a few refused connections",
            )
            assert metric(sidecar, "dedupe_events_total", topic=topic, decision="handled") == 0
            server = Target(port=port)  # the target comes up on the same port
            wait_for(lambda: len(server.accepted()) >= len(sent), 90, "every event delivered")
            wait_for(
                lambda: (
                    committed_offsets(kafka_bootstrap, f"g-{topic}", topic, 2)
                    == end_offsets(kafka_bootstrap, topic, 2)
                ),
                30,
                "offsets committed to the end",
            )
    finally:
        if server is not None:
            server.close()

    assert server is not None
    delivered = server.accepted()
    assert sorted(r.key for r in delivered) == sorted(sent)  # each once, none lost
    ends = end_offsets(kafka_bootstrap, topic, 2)
    for partition in (0, 1):
        offsets = [r.offset for r in delivered if r.partition == partition]
        assert offsets == list(range(ends[partition])), f"partition {partition} out of order"
    assert sidecar.consumer.totals.dead_lettered == 0


def test_duplicate_events_on_the_topic_are_posted_once_each(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path, target: Target
) -> None:
    topic = kafka_topic(partitions=3)
    sent = produce_events(kafka_bootstrap, topic, 300, duplicates=0.3, seed=62)
    unique = set(sent)
    assert len(unique) < len(sent)
    sidecar = sidecar_for(kafka_bootstrap, topic, tmp_path, target.url)
    with running(sidecar):
        wait_for(lambda: sidecar.consumer.totals.consumed >= len(sent), 90, "every offset decided")
    posts = Counter(r.key for r in target.snapshot())
    assert set(posts) == unique
    assert [k for k, n in posts.items() if n > 1] == []
    assert sidecar.consumer.totals.duplicates == len(sent) - len(unique)


# -- probes ----------------------------------------------------------------------------------


def test_healthz_readyz_and_metrics_answer(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path, target: Target
) -> None:
    # No broker: alive but not ready, and /readyz says why.
    # (No changelog: its transactional producer would give up on the missing broker.)
    nowhere = f"127.0.0.1:{free_port()}"
    dead = sidecar_for(nowhere, "t-none", tmp_path / "dead", target.url, changelog=False)
    dead.broker.cache_s = 0.0
    with running(dead):
        port = dead.health.port
        wait_for(lambda: get(port, "/healthz")[0] == 200, 30, "/healthz to answer")
        assert get(port, "/healthz")[2] == b"ok\n"
        status, content_type, body = get(port, "/readyz")
        assert (status, content_type) == (503, "application/json")
        answer = json.loads(body)
        assert answer["ready"] is False
        assert "no partitions assigned" in answer["reasons"]
        assert any(r.startswith("broker unreachable") for r in answer["reasons"])

    # A real broker: ready once partitions are assigned; metrics count the deliveries.
    topic = kafka_topic(partitions=2)
    sent = produce_events(kafka_bootstrap, topic, 10, duplicates=0.0, seed=63)
    sidecar = sidecar_for(kafka_bootstrap, topic, tmp_path / "live", target.url)
    with running(sidecar):
        port = sidecar.health.port
        wait_for(lambda: get(port, "/readyz")[0] == 200, 90, "/readyz to turn ready")
        # Ready once a partition is deciding; each joins the list once its state is
        # restored (the restores run beside the poll loop).
        wait_for(
            lambda: len(json.loads(get(port, "/readyz")[2])["partitions"]) == 2,
            30,
            "both partitions restored",
        )
        ready = json.loads(get(port, "/readyz")[2])
        assert ready == {
            "ready": True,
            "partitions": [f"{topic}[0]", f"{topic}[1]"],
            "broker": "reachable",
            "reasons": [],
        }
        wait_for(lambda: len(target.accepted()) >= len(sent), 90, "every event delivered")
        wait_for(lambda: sidecar.consumer.totals.handled >= len(sent), 30, "totals updated")
        status, content_type, body = get(port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }
        handled = ("dedupe_events_total", (("decision", "handled"), ("topic", topic)))
        assert samples[handled] == len(sent)
        assert samples[("dedupe_sidecar_requests_total", (("status", "200"),))] == len(sent)
        assert get(port, "/nope")[0] == 404
    with pytest.raises(urllib.error.URLError):  # the probe server is closed with the sidecar
        get(port, "/healthz")


# -- the example target ----------------------------------------------------------------------


def test_example_target_app_records_each_event_once_with_headers_decoded(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    produce_raw(
        kafka_bootstrap,
        topic,
        [
            event("a-1", b'{"n": 1}', key=b"k-1", headers=[("trace", b"t-1")]),
            event("a-2", b"\xff\x00", key=b"\xfe", headers=[("bin", b"\xff\x01")]),
            event("a-1", b'{"n": 1}', key=b"k-1"),  # a duplicate: never reaches the app
        ],
    )
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
            wait_for(lambda: sidecar.consumer.totals.consumed >= 3, 90, "all three decided")
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [(e["event_id"], e["offset"]) for e in lines] == [("a-1", 0), ("a-2", 1)]
        first, second = lines
        assert (first["topic"], first["key"], first["body"]) == (topic, "k-1", '{"n": 1}')
        assert first["headers"] == [["event-id", "a-1"], ["trace", "t-1"]]
        assert second["key"] == {"base64": base64.b64encode(b"\xfe").decode()}
        assert second["body"] == {"base64": base64.b64encode(b"\xff\x00").decode()}
        assert second["headers"][1] == ["bin", {"base64": base64.b64encode(b"\xff\x01").decode()}]

        # A repeated Idempotency-Key (a POST whose answer was lost) is acknowledged only.
        repeat = urllib.request.Request(
            f"http://127.0.0.1:{port}/events",
            data=b"again",
            headers={"Idempotency-Key": "a-1"},
            method="POST",
        )
        with urllib.request.urlopen(repeat, timeout=10) as answer:
            assert json.loads(answer.read()) == {"recorded": False, "duplicate": True}
        assert len(out.read_text().splitlines()) == 2
    finally:
        app.send_signal(signal.SIGTERM)
        _, stderr = app.communicate(timeout=30)
    assert app.returncode == 0, stderr.decode()[-2000:]


def _answers(port: int, path: str) -> bool:
    try:
        return get(port, path)[0] == 200
    except OSError:
        return False


# -- SIGTERM ---------------------------------------------------------------------------------


def write_config(
    tmp_path: Path, bootstrap: str, topic: str, target_url: str, port: int, fmt: str = "console"
) -> Path:
    path = tmp_path / "sidecar.toml"
    path.write_text(
        f"""
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{topic}-group"
topics = ["{topic}"]
[kafka.consumer]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500
[store]
path = "{tmp_path / "state"}"
[processing]
poll_timeout = "200ms"
dead_letter_topic = "{topic}.dlq"
ordering = "partition"
[sidecar]
target_url = "{target_url}"
max_retries = 5
retry_backoff = "50ms"
retry_backoff_max = "30s"
listen_port = {port}
[observability]
log_level = "info"
log_format = "{fmt}"
"""
    )
    return path


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_sigterm_mid_retry_exits_0_and_commits_only_what_was_delivered(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path, fmt: str
) -> None:
    topic = kafka_topic(partitions=1)
    produce_raw(kafka_bootstrap, topic, [event(f"e-{i}", f"v{i}".encode()) for i in range(3)])
    # e-1 fails with a 30 s Retry-After: SIGTERM lands in that wait.
    server = Target(replies({b"e-1": [(503, {"Retry-After": "30"}, b"busy")] * 10}))
    port = free_port()
    config = write_config(tmp_path, kafka_bootstrap, topic, server.url, port, fmt)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dedupe_consumer", "sidecar", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        try:
            wait_for(
                lambda: any(r.key == "e-1" for r in server.snapshot()), 90, "e-1's first attempt"
            )
            assert get(port, "/readyz")[0] == 200  # the real process serves its probes
            time.sleep(0.5)  # now inside the Retry-After wait
        finally:
            stopped_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - stopped_at
        log = stderr.decode(errors="replace")
        assert proc.returncode == 0, log[-3000:]
        assert took < 15, f"stopping took {took:.1f}s: the 30 s wait was not interrupted"
        events = check_log_format(log, fmt)  # every line of ours, in the chosen format
        assert "partitions_assigned" in events
        assert "stop_requested" in events
        assert [(r.key, r.status) for r in server.snapshot()] == [("e-0", 200), ("e-1", 503)]
        # e-0 delivered and committed; e-1 neither delivered nor committed nor dead-lettered.
        assert committed_offsets(kafka_bootstrap, f"{topic}-group", topic, 1) == {0: 1}
        metadata = admin(kafka_bootstrap).list_topics(timeout=10)
        dlq = metadata.topics.get(f"{topic}.dlq")
        assert (
            dlq is None
            or dlq.error is not None
            or end_offsets(kafka_bootstrap, f"{topic}.dlq", 1) == {0: 0}
        )

        # The target recovers: the restarted sidecar delivers e-1 then e-2, never e-0 again.
        server.script = lambda key, seen: OK
        with running(Sidecar(SidecarAppSettings.from_toml(config))):  # the same config and port
            wait_for(lambda: len(server.accepted()) == 3, 90, "e-1 and e-2 delivered")
            wait_for(
                lambda: committed_offsets(kafka_bootstrap, f"{topic}-group", topic, 1) == {0: 3},
                30,
                "offsets committed to the end",
            )
        assert [r.key for r in server.accepted()] == ["e-0", "e-1", "e-2"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        server.close()
