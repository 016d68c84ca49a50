"""Tracing: the real engine on a real store, spans caught by the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from typer.testing import CliRunner

from dedupe_consumer import ConfigError, Event, Handler, PermanentError, RetryableError
from dedupe_consumer.cli import app
from dedupe_consumer.dead_letters import MemoryDeadLetters, dead_letter_headers
from dedupe_consumer.engine import Engine, payload_digest
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.observability import configure_logging
from dedupe_consumer.observability import tracing as tracing_module
from dedupe_consumer.observability.tracing import EventTracing, for_provider, start_tracing
from dedupe_consumer.replay import Record
from dedupe_consumer.sidecar.handler import HttpForwardHandler
from dedupe_consumer.sidecar.settings import SidecarSettings
from dedupe_consumer.store import IdRecord, RecordStatus, RocksStore, WriteSet

from .conftest import TOPIC, Recorder, make_settings, rec
from .test_settings import GOOD

TP0 = TopicPartition(TOPIC, 0)
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_SPAN = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_SPAN:016x}-01"


def traced(offset: int, event_id: str | None, *, body: dict[str, Any] | None = None) -> Record:
    """A record with an event ID and the producer's ``traceparent``."""
    plain = rec(offset, event_id, body=body)
    headers = [*plain.headers(), ("traceparent", TRACEPARENT.encode())]
    return Record(TOPIC, 0, offset, plain.key(), plain.value(), headers, 1_700_000_000_000)


class Traced:
    """An engine with tracing on, its spans in memory."""

    def __init__(self, tmp_path: Path, handler: Handler, **sections: dict[str, Any]) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracing: EventTracing = for_provider(self.provider, group_id="g")
        settings = make_settings(tmp_path / "state", **sections)
        self.store = RocksStore(settings.store.path, retention_ms=10**9)
        self.dead = MemoryDeadLetters()
        self.handler = handler
        self.engine = Engine(
            handler,
            settings.dedupe,
            settings.processing,
            self.store,
            self.dead,
            sweep_keys=settings.store.sweep_keys,
            revoked_state_grace=settings.store.revoked_state_grace,
            tracing=self.tracing,
        )
        self.engine.assign([TP0])
        self.engine.setup_handler()

    def spans(self) -> list[ReadableSpan]:
        return sorted(
            (s for s in self.exporter.get_finished_spans() if s.name.startswith("process ")),
            key=lambda s: (s.attributes or {}).get("messaging.kafka.offset", -1),  # type: ignore[arg-type, return-value]
        )

    def close(self) -> None:
        self.engine.teardown_handler()
        self.engine.close()
        self.store.close()
        self.tracing.close()


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Any]:
    made: list[Traced] = []

    def factory(handler: Handler | None = None, **sections: dict[str, Any]) -> Traced:
        t = Traced(tmp_path / f"t{len(made)}", handler or Recorder(), **sections)
        made.append(t)
        return t

    yield factory
    for t in made:
        t.close()
    assert not tracing_module.tracing_on()  # every tracer counted out


def traceparent_of(span: ReadableSpan) -> str:
    ctx = span.context
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_one_span_per_decided_event_with_messaging_attributes_and_the_producer_as_parent(
    make: Any,
) -> None:
    t = make(dedupe={"on_conflict": "skip"})
    t.engine.process([traced(0, "a"), traced(1, "a"), traced(2, "a", body={"x": 1}), rec(3, "b")])
    t.engine.process([traced(1, "a")])  # redelivered below the watermark: a replay
    spans = t.spans()
    assert [attrs(s)["dedupe.decision"] for s in spans] == [
        "handled",
        "duplicate",
        "replay",
        "conflict",
        "handled",
    ]
    first = attrs(spans[0])
    assert first == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": TOPIC,
        "messaging.destination.partition.id": "0",
        "messaging.kafka.offset": 0,
        "messaging.message.id": "a",
        "messaging.consumer.group.name": "g",
        "dedupe.decision": "handled",
        "dedupe.retries": 0,
    }
    assert spans[0].name == f"process {TOPIC}"
    assert spans[0].kind is trace.SpanKind.CONSUMER
    assert attrs(spans[1])["dedupe.first_offset"] == 0
    for span in spans[:4]:  # the producer's trace, its span the parent
        assert span.context is not None and span.context.trace_id == TRACE_ID
        assert span.parent is not None and span.parent.span_id == PARENT_SPAN
    b = spans[4]  # no traceparent: a trace of its own, never the current span's child
    assert b.parent is None and b.context is not None and b.context.trace_id != TRACE_ID


class SeesItsSpan(Handler):
    """Records the current span's IDs and makes a span of its own (nested, we hope)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.tracer = provider.get_tracer("user")
        self.seen: dict[str, tuple[int, int]] = {}
        self.lock = threading.Lock()

    def handle(self, event: Event) -> None:
        ctx = trace.get_current_span().get_span_context()
        with self.lock:
            self.seen[event.id] = (ctx.trace_id, ctx.span_id)
        with self.tracer.start_as_current_span("user-work"):
            pass


class AsyncSeesItsSpan(SeesItsSpan):
    async def handle(self, event: Event) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        SeesItsSpan.handle(self, event)


@pytest.mark.parametrize("kind", [SeesItsSpan, AsyncSeesItsSpan])
def test_the_handler_runs_in_the_events_span_on_workers_and_on_the_loop(
    make: Any, kind: type[SeesItsSpan]
) -> None:
    t = make(processing={"concurrency": 4})
    handler = kind(t.provider)
    t.handler = handler
    t.engine.handler = handler
    records = [traced(i, f"id{i}") if i % 2 else rec(i, f"id{i}") for i in range(8)]
    assert t.engine.process(records).stats.handled == 8
    events = {attrs(s)["messaging.message.id"]: s for s in t.spans()}
    users = [s for s in t.exporter.get_finished_spans() if s.name == "user-work"]
    assert len(users) == 8
    by_parent = {u.parent.span_id for u in users if u.parent is not None}
    for event_id, span in events.items():
        assert span.context is not None
        assert handler.seen[event_id] == (span.context.trace_id, span.context.span_id)
        assert span.context.span_id in by_parent  # the user's span nests under it


def test_retries_are_counted_and_a_dead_letter_is_an_error_carrying_its_traceparent(
    make: Any,
) -> None:
    tries: dict[str, int] = {}

    def fail(event: Event) -> None:
        tries[event.id] = tries.get(event.id, 0) + 1
        if event.id == "flaky" and tries[event.id] <= 2:
            raise RetryableError("not yet")
        if event.id == "bad":
            raise PermanentError("never")

    t = make(Recorder(fail))
    t.engine.process([traced(0, "flaky"), traced(1, "bad"), rec(2, None)])
    flaky, bad, missing = t.spans()
    assert (attrs(flaky)["dedupe.decision"], attrs(flaky)["dedupe.retries"]) == ("handled", 2)
    assert flaky.status.status_code is StatusCode.UNSET
    assert attrs(bad)["dedupe.decision"] == "dead-lettered"
    assert attrs(bad)["dedupe.dead_letter.reason"] == "permanent-error"
    assert attrs(bad)["error.type"] == "PermanentError"
    assert bad.status.status_code is StatusCode.ERROR
    assert attrs(missing)["dedupe.decision"] == "dead-lettered"
    assert attrs(missing)["dedupe.dead_letter.reason"] == "missing-id"
    assert "messaging.message.id" not in attrs(missing)
    letters = {k.letter.event_id: k for k in t.dead.letters}
    for span, kept in ((bad, letters["bad"]), (missing, letters[None])):
        assert span.context is not None
        ours = traceparent_of(span)
        assert kept.letter.traceparent == ours
        headers = dict(dead_letter_headers(kept.message, kept.letter))
        assert headers["traceparent"] == ours.encode()  # the letter's header: the event's span
    bad_headers = dead_letter_headers(letters["bad"].message, letters["bad"].letter)
    assert dict(bad_headers)["dlq.original.traceparent"] == TRACEPARENT.encode()
    assert sum(1 for k, _ in bad_headers if k == "traceparent") == 1


def test_off_no_spans_and_no_tracer(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace_before = trace.get_current_span()
    settings = make_settings(tmp_path / "s")
    store = RocksStore(settings.store.path, retention_ms=10**9)
    handler = SeesItsSpan(provider)
    engine = Engine(
        handler,
        settings.dedupe,
        settings.processing,
        store,
        MemoryDeadLetters(),
        sweep_keys=settings.store.sweep_keys,
        revoked_state_grace=settings.store.revoked_state_grace,
    )
    try:
        engine.assign([TP0])
        assert engine.process([traced(0, "a"), traced(1, "a")]).stats.handled == 1
    finally:
        engine.close()
        store.close()
    assert not tracing_module.tracing_on()
    assert handler.seen["a"] == (0, 0)  # no current span in the handler
    assert [s.name for s in exporter.get_finished_spans()] == ["user-work"]  # none of ours
    assert trace.get_current_span() is trace_before


def test_json_logs_carry_trace_and_span_ids_only_with_tracing_on(
    make: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail_once(event: Event) -> None:
        if len(recorder.calls) == 1:
            raise RetryableError("once")

    recorder = Recorder(fail_once)
    configure_logging("info", "json")
    try:
        t = make(recorder)
        capsys.readouterr()
        t.engine.process([traced(0, "a")])
        structlog.get_logger("test").info("outside_any_span")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        [span] = t.spans()
        assert span.context is not None
        [retry] = [line for line in lines if line["event"] == "handler_retry"]
        assert retry["trace_id"] == f"{TRACE_ID:032x}"
        assert retry["span_id"] == f"{span.context.span_id:016x}"
        [outside] = [line for line in lines if line["event"] == "outside_any_span"]
        assert "trace_id" not in outside
        t.tracing.close()
        with trace.use_span(trace.NonRecordingSpan(span.context)):
            structlog.get_logger("test").info("tracing_off")
        [off] = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        assert off["event"] == "tracing_off" and "trace_id" not in off and "span_id" not in off
    finally:
        structlog.reset_defaults()


class _Target(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _Target.seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_sidecar_request_carries_the_events_span_as_traceparent(make: Any) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Target)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Target.seen = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/events"
        handler = HttpForwardHandler(SidecarSettings.model_validate({"target_url": url}))
        t = make(handler)
        assert t.engine.process([traced(0, "a"), rec(1, "b")]).stats.handled == 2
    finally:
        server.shutdown()
        server.server_close()
    a, b = t.spans()
    by_id = {h["idempotency-key"]: h for h in _Target.seen}
    for event_id, span in (("a", a), ("b", b)):
        assert span.context is not None
        assert by_id[event_id]["traceparent"] == traceparent_of(span)
    assert by_id["a"]["traceparent"].split("-")[1] == f"{TRACE_ID:032x}"  # the producer's


def test_a_malformed_endpoint_is_a_one_line_configuration_error_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(GOOD + '\n[tracing]\nenabled = true\nendpoint = "localhost:4317"\n')
    result = CliRunner().invoke(app, ["run", "-c", str(config), "--handler", "x.y:Z"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("configuration error: invalid configuration in ")
    [line] = [x for x in result.stderr.splitlines() if "tracing.endpoint" in x]
    assert "'localhost:4317' is not an http:// or https:// URL" in line
    assert "http://127.0.0.1:4318/v1/traces" in line  # what to do


def test_a_malformed_endpoint_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, tracing={"enabled": True})
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "collector:4318")
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT = 'collector:4318'"):
        start_tracing(settings.tracing)
    assert not tracing_module.tracing_on()


def test_without_the_otel_extra_tracing_is_a_configuration_error_and_off_still_works(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "dedupe_consumer.observability._otel", raising=False)
    # ``from package import module`` takes the package's attribute first: drop it too
    monkeypatch.delattr("dedupe_consumer.observability._otel", raising=False)
    settings = make_settings(tmp_path, tracing={"enabled": True})
    with pytest.raises(ConfigError) as raised:
        start_tracing(settings.tracing)
    assert "pip install 'dedupe-consumer[otel]'" in str(raised.value)
    assert "\n" not in str(raised.value)
    # off: the package's tracing hooks never import OpenTelemetry
    assert tracing_module.current_trace_headers() == ()
    assert tracing_module.add_trace_ids(None, "info", {"event": "x"}) == {"event": "x"}


def test_an_uncertain_outcome_is_its_own_decision_with_the_policy(make: Any) -> None:
    t = make(processing={"mode": "claim", "on_uncertain": "skip", "claim_lease": "1s"})
    message = traced(0, "a")
    ten_s_ago = int(time.time() * 1000) - 10_000  # past the lease: no wait
    claim = IdRecord(RecordStatus.IN_PROGRESS, 0, ten_s_ago, payload_digest(message.value()))
    t.store.persist(WriteSet(records={TP0: [("a", claim)]}))  # a claim left by a crash
    result = t.engine.process([message, traced(1, "b")])
    assert (result.stats.uncertain, result.stats.handled) == (1, 2)
    a, b = t.spans()
    assert attrs(a)["dedupe.decision"] == "uncertain"
    assert attrs(a)["dedupe.uncertain.policy"] == "skip"
    assert attrs(b)["dedupe.decision"] == "handled" and "dedupe.uncertain.policy" not in attrs(b)


def test_an_applications_global_tracer_provider_is_used_and_left_running() -> None:
    code = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from dedupe_consumer.config import TracingSettings
from dedupe_consumer.observability.tracing import start_tracing
from dedupe_consumer.replay import Record
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
settings = TracingSettings.model_validate({"enabled": True, "endpoint": "http://127.0.0.1:9/x"})
tracing = start_tracing(settings)
tracing.end(tracing.start(Record("t", 0, 5, None, b"{}", [], 1), 5, "a"), "handled")
tracing.close()
with provider.get_tracer("app").start_as_current_span("after"):
    pass
print(sorted(s.name for s in exporter.get_finished_spans()))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    # ours went to the application's provider (no exporter made for the endpoint), and
    # closing ours did not shut it down: the application's later span was exported too
    assert proc.stdout.split("\n")[-2] == "['after', 'process t']"
    assert "tracing_endpoint_unreachable" not in proc.stdout + proc.stderr
