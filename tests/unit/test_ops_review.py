"""Review of issue 16's operator side (tracing, metrics, alerts): failing tests for defects.

Each test asserts the behaviour an operator needs; it fails on the code as merged.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dedupe_consumer import ConfigError, Settings
from dedupe_consumer.dead_letters import MemoryDeadLetters
from dedupe_consumer.engine import Engine
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.observability import Metrics
from dedupe_consumer.observability import tracing as tracing_module
from dedupe_consumer.observability.tracing import start_tracing
from dedupe_consumer.store import IdRecord, RecordStatus, RocksStore, WriteSet

from .conftest import TOPIC, Recorder, make_settings

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "config" / "prometheus-alerts.yaml"
SECRET = "hunter2-s3cr3t"


# -- secrets in the tracing endpoint ---------------------------------------------------------


def test_a_tracing_endpoint_with_a_password_is_refused_without_printing_the_password(
    tmp_path: Path,
) -> None:
    """``endpoint = "https://user:PASSWORD@collector/v1/traces"`` is refused (userinfo is not
    accepted), and the error repeats the URL verbatim: the password lands in the terminal,
    the CI log or the crash-looping pod's log. The same file's ``kafka.*`` secrets, and the
    ``tracing.endpoint = ...`` prefix of this very line, are masked (redaction.redact)."""
    config = tmp_path / "c.toml"
    config.write_text(
        "[kafka]\n"
        'bootstrap_servers = "127.0.0.1:9092"\n'
        'group_id = "g"\n'
        f'topics = ["{TOPIC}"]\n'
        "[store]\n"
        f'path = "{tmp_path / "s"}"\n'
        "[processing]\n"
        'dead_letter_topic = "payments.dlq"\n'
        "[tracing]\n"
        "enabled = true\n"
        f'endpoint = "https://tracer:{SECRET}@collector.example:4318/v1/traces"\n'
    )
    with pytest.raises(ConfigError) as raised:
        Settings.from_toml(config)
    assert "tracing.endpoint" in str(raised.value)
    assert SECRET not in str(raised.value), str(raised.value)


def test_a_bad_otel_endpoint_variable_is_reported_without_its_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``OTEL_EXPORTER_OTLP_ENDPOINT`` with credentials in it: the ConfigError (printed by
    ``run``/``sidecar`` as ``configuration error: ...``) quotes the raw value."""
    settings = make_settings(tmp_path, tracing={"enabled": True})
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"https://tracer:{SECRET}@otlp.example")
    with pytest.raises(ConfigError) as raised:
        start_tracing(settings.tracing)
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in str(raised.value)
    assert SECRET not in str(raised.value), str(raised.value)
    assert not tracing_module.tracing_on()


def test_a_token_in_the_tracing_endpoints_query_is_not_logged(tmp_path: Path) -> None:
    """A collector URL with a token in its query (``?token=...``) is accepted, then logged
    verbatim at info (``tracing_started endpoint=...``) and again at warning
    (``tracing_endpoint_unreachable``). The project masks secret-looking query parameters
    elsewhere (redaction.redact, the sidecar's target URL)."""
    settings = make_settings(
        tmp_path,
        tracing={
            "enabled": True,
            "endpoint": f"http://127.0.0.1:9/v1/traces?token={SECRET}",  # nothing listens
        },
    )
    with capture_logs() as logs:
        tracing = start_tracing(settings.tracing)
        tracing.close()
    assert any(entry["event"] == "tracing_started" for entry in logs), logs
    leaked = [entry for entry in logs if SECRET in repr(entry)]
    assert leaked == [], leaked


# -- DedupeRetentionTooShort over several consumers --------------------------------------------


def test_retention_alert_fires_for_a_consumer_whose_retention_is_shorter_than_anothers(
    tmp_path: Path,
) -> None:
    """Two consumers (jobs) scraped by one Prometheus: ``payments`` keeps IDs 1 day and
    sees duplicates 20-24 h old (past 80% of its retention: some outlive their ID);
    ``audit`` keeps IDs 30 days. The rule compares every topic's p99 with
    ``0.8 * max(dedupe_retention_seconds)`` across *all* jobs, i.e. with 24 days, so the
    one consumer whose retention is too short is never paged about. The threshold must
    be that consumer's own retention (match on job/instance)."""
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool (Debian's prometheus package) is needed"
    shutil.copy(RULES, tmp_path / RULES.name)
    series = []
    for job, topic, retention, bucket in (
        ("payments-svc", "payments", 86400, "86400.0"),  # ages 12-24 h, retention 1 day
        ("audit-svc", "audit", 30 * 86400, "3600.0"),  # ages under an hour, 30 days
    ):
        series.append(
            f'      - series: \'dedupe_retention_seconds{{job="{job}", instance="{job}:9"}}\'\n'
            f"        values: '{retention}x60'\n"
        )
        for le in ("3600.0", "43200.0", "86400.0", "+Inf"):
            filled = float(le) >= float(bucket) if le != "+Inf" else True
            series.append(
                f'      - series: \'dedupe_duplicate_age_seconds_bucket{{job="{job}", '
                f'instance="{job}:9", topic="{topic}", le="{le}"}}\'\n'
                f"        values: '{'0+10x60' if filled else '0x60'}'\n"
            )
    (tmp_path / "t.test.yaml").write_text(
        f"rule_files: [{RULES.name}]\n"
        "evaluation_interval: 1m\n"
        "tests:\n"
        "  - interval: 5m\n"
        "    input_series:\n" + "".join(series) + "    alert_rule_test:\n"
        "      - eval_time: 3h\n"
        "        alertname: DedupeRetentionTooShort\n"
        "        exp_alerts: []\n"  # promtool then prints what fired, whatever its labels
    )
    result = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "t.test.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = result.stdout + result.stderr
    fired = out[out.index("got:") :] if "got:" in out else ""
    assert 'topic="payments"' in fired, f"DedupeRetentionTooShort never fired for payments:\n{out}"
    assert 'topic="audit"' not in fired, out


# -- dedupe_store_size_bytes -----------------------------------------------------------------


def test_store_size_is_reported_before_the_first_write(tmp_path: Path) -> None:
    """``dedupe_store_size_bytes`` is set only after a persisted write. A consumer that
    restarts on a store of many IDs and sees no traffic (a quiet night, a paused producer)
    exports 0 bytes for as long as it stays quiet: the debug dashboard's "Store size"
    says the store is empty, and when traffic returns the jump from 0 to the real size
    makes ``predict_linear(dedupe_store_size_bytes[6h], 86400)`` (DedupeStoreGrowing)
    extrapolate a huge growth. The size should be read when the store is opened or
    partitions are assigned (and when idle), not only after writes."""
    settings = make_settings(tmp_path / "s")
    tp = TopicPartition(TOPIC, 0)
    store = RocksStore(settings.store.path, retention_ms=10**12)
    now_ms = 1_800_000_000_000
    store.persist(
        WriteSet(
            records={
                tp: [
                    (f"id-{n}", IdRecord(RecordStatus.HANDLED, n, now_ms, b"d" * 32))
                    for n in range(5000)
                ]
            },
            watermarks={tp: 4999},
        )
    )
    assert store.approximate_size() > 0
    metrics = Metrics()
    engine = Engine(
        Recorder(),
        settings.dedupe,
        settings.processing,
        store,
        MemoryDeadLetters(),
        metrics=metrics,
        sweep_keys=settings.store.sweep_keys,
        revoked_state_grace=settings.store.revoked_state_grace,
        clock=lambda: now_ms / 1000,
    )
    try:
        engine.assign([tp])
        engine.process([])  # an empty poll
        engine.idle()
        exported = metrics.registry.get_sample_value("dedupe_store_size_bytes")
    finally:
        engine.close()
        store.close()
    assert exported is not None and exported > 0, exported


# -- analyze: repeats the consumer's dedupe scope cannot catch ---------------------------------


def test_analyze_does_not_count_a_repeat_on_another_partition_as_caught(tmp_path: Path) -> None:
    """With ``dedupe.scope = "partition"`` (the default) each partition has its own
    records: a copy of an ID that arrives on another partition than its first copy is
    handled again, whatever the retention. ``analyze`` ignores partitions: it reports such
    a copy as a duplicate the retention covers ("0 of 2 repeats would have come after
    their ID expired"), the one number an operator reads to conclude the dedupe layer
    catches every repeat, and recommends a retention for it. It should count the repeats
    on another partition apart (they are missed under scope 'partition', and need scope
    'topic' or a producer keyed by ID), not as caught."""
    from typer.testing import CliRunner

    from dedupe_consumer.cli import app

    from .test_replay import line, write_recording

    lines = [
        line(0, 0, "id-1"),
        line(0, 1, "id-1"),  # a repeat on the same partition: caught
        line(0, 2, "id-2"),
        line(1, 3, "id-2"),  # a repeat on another partition: handled again
    ]
    lines[3]["value"] = lines[2]["value"]  # the same payload: a plain duplicate
    path = write_recording(tmp_path / "r.jsonl", lines, 2)
    shown = CliRunner().invoke(app, ["analyze", str(path), "--retention", "1h"])
    assert shown.exit_code == 0, shown.output
    assert "0 of 2 repeats would have come after their ID expired" not in shown.output, shown.output
    assert "partition" in shown.output, shown.output
    assert "repeats on another partition than their ID's first copy: 1 (50.00%)" in shown.output
    assert (
        'dedupe.scope "partition": 1 of 2 repeats would be handled again (0 after their ID '
        "expired, 1 more on another partition" in shown.output
    ), shown.output
    topic_scope = CliRunner().invoke(
        app, ["analyze", str(path), "--retention", "1h", "--scope", "topic"]
    )
    assert 'dedupe.scope "topic": 0 of 2 repeats would be handled again' in topic_scope.output


# -- dedupe_restore_seconds: the first restore is invisible to rate() ---------------------------


def test_a_restore_is_visible_to_rate_because_its_series_exists_before_it_ends(
    tmp_path: Path,
) -> None:
    """``dedupe_restore_seconds{topic}`` is created by its first ``observe``, at the end of
    the first restore. Prometheus' ``rate``/``increase`` need a sample before the
    increase: a series whose first scrape already counts the restore shows no increase,
    so a consumer's start-up restore, however slow (the one an operator worries about: a
    new instance, a lost disk), never reaches DedupeSlowRestore nor the on-call
    "Restore duration" panel. ``topic_seen`` zero-initialises the topic's other series at
    assignment, before the restore, but not this one. While a restore runs, its
    topic's histogram must already be exported (at zero)."""
    from .changelog_rig import RecordingChangelog

    metrics = Metrics()
    during: list[float | None] = []

    class SlowRestore(RecordingChangelog):
        def restore(self, tp: TopicPartition, store: object, *, stopping: object = None) -> int:
            # what a scrape during the restore would see
            during.append(
                metrics.registry.get_sample_value("dedupe_restore_seconds_count", {"topic": TOPIC})
            )
            return 0

    settings = make_settings(tmp_path / "s")
    store = RocksStore(settings.store.path, retention_ms=10**9)
    engine = Engine(
        Recorder(),
        settings.dedupe,
        settings.processing,
        store,
        MemoryDeadLetters(),
        metrics=metrics,
        sweep_keys=settings.store.sweep_keys,
        revoked_state_grace=settings.store.revoked_state_grace,
        changelog=SlowRestore(),
    )
    try:
        engine.assign([TopicPartition(TOPIC, 0)])
    finally:
        engine.close()
        store.close()
    assert during == [0.0], during


# -- the store tool on a live store ---------------------------------------------------------


def test_the_store_tool_reads_a_store_that_a_consumer_is_writing(tmp_path: Path) -> None:
    """``dedupe-consumer store stats|lookup|export`` promise to be safe while a consumer
    runs. ``StoreReader`` opens the store in RocksDB's read-only mode, which does not
    support a primary that keeps writing: when the consumer's memtable flushes and L0
    compaction deletes SST files between the reader reading the MANIFEST and opening the
    files, the open (or the scan) fails with ``Corruption: IO error: No such file or
    directory ... The file MANIFEST-... may be corrupted``, which the command prints as
    ``error: Exception: Corruption: ...``, exit 1: the operator is told, at 3 a.m., that the
    store is corrupt. Measured here: about one open in eight fails while the store is
    flushed every other write. The reader should use a secondary instance (which is made
    for this) or retry an open that lost a race with the primary."""
    import os
    import threading
    import time

    from dedupe_consumer.store.reading import StoreReader

    store = RocksStore(tmp_path / "live", retention_ms=10**12)
    tps = [TopicPartition(TOPIC, p) for p in range(4)]
    stop = threading.Event()
    wrote: list[int] = []

    def consumer() -> None:  # what a busy consumer does to its store, sped up
        n = 0
        while not stop.is_set():
            now = int(time.time() * 1000)
            records = {
                tp: [
                    (f"id-{n}-{i}", IdRecord(RecordStatus.HANDLED, n, now, os.urandom(8)))
                    for i in range(200)
                ]
                for tp in tps
            }
            store.persist(WriteSet(records=records, watermarks=dict.fromkeys(tps, n)))
            n += 1
            if n % 2 == 0:  # memtables flushed: L0 files, then compactions delete them
                for tp in tps:
                    store._family(tp).flush(True)
        wrote.append(n)

    writer = threading.Thread(target=consumer)
    writer.start()
    failures: list[str] = []
    reads = 0
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and reads < 80:
            try:
                with StoreReader(tmp_path / "live") as reader:
                    reader.stats(int(time.time() * 1000))
                    reader.lookup("id-0-0")
            except Exception as failed:
                failures.append(f"{type(failed).__name__}: {str(failed)[:160]}")
            reads += 1
    finally:
        stop.set()
        writer.join()
        store.close()
    assert wrote and reads >= 20, (wrote, reads)
    assert failures == [], f"{len(failures)} of {reads} reads failed, e.g. {failures[:2]}"


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]
)
def test_an_otlp_grpc_protocol_variable_is_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str
) -> None:
    """OTLP over gRPC is not exported: asked for by the standard variable, it is a
    configuration error naming the variable, not a run whose every export fails."""
    settings = make_settings(tmp_path, tracing={"enabled": True})
    for name in ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "grpc")
    with pytest.raises(ConfigError) as raised:
        start_tracing(settings.tracing)
    assert variable in str(raised.value) and "http/protobuf" in str(raised.value)
    assert not tracing_module.tracing_on()
    monkeypatch.setenv(variable, "http/protobuf")
    started = start_tracing(settings.tracing)
    assert tracing_module.tracing_on()
    started.close()


def test_an_event_id_with_a_lone_surrogate_is_exported_as_valid_utf8() -> None:
    """A JSON ID may decode to a lone surrogate ("\\ud800"); OTLP's encoder needs UTF-8 and
    would fail on every such span. The attribute holds it escaped instead."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from dedupe_consumer.observability.tracing import for_provider
    from dedupe_consumer.replay import Record

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = for_provider(provider)
    message = Record(TOPIC, 0, 7, None, b"{}", [], 1_700_000_000_000)
    try:
        span = tracing.start(message, 7, "pay-\ud800")
        tracing.end(span, "handled", retries=0)
    finally:
        tracing.close()
    (finished,) = exporter.get_finished_spans()
    assert finished.attributes is not None
    assert finished.attributes["messaging.message.id"] == "pay-\\ud800"
    encode_spans([finished]).SerializeToString()  # raised UnicodeEncodeError before
