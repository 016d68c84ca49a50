"""The benchmark's own logic, without a broker: row selection, verdicts, settings it writes.

``bench.compare`` runs for minutes on a real broker, so a wrong verdict or a
settings file the sidecar rejects would only show up there; these check the
pieces that decide what the table says.
"""

from __future__ import annotations

import argparse
import tomllib
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bench.child import Report
from bench.compare import CONTENDERS, TARGETS, Outcome, _correctness, _select, _targets
from bench.contenders.sidecar import config_sections, settings_toml
from bench.data import DataSet
from bench.engine_options import NO_CONCURRENCY, concurrency_settings, processing_fields
from bench.http_target import HttpTarget
from dedupe_consumer.sidecar.settings import SidecarAppSettings

DATA = DataSet("t", events=100, unique=90, duplicates=0.1)
BY_KEY = {c.key: c for c in CONTENDERS}


def report(consumed: int, handled: int, seconds: float, **extra: object) -> Report:
    r: Report = {"consumed": consumed, "handled": handled, "seconds": seconds, "peak_rss_mb": 1.0}
    r.update(extra)  # type: ignore[typeddict-item]
    return r


def test_concurrency_is_passed_only_to_an_engine_that_has_it() -> None:
    assert concurrency_settings({"batch_size"}, 16, "key") == ({}, NO_CONCURRENCY)
    with_it = {"batch_size", "concurrency", "ordering"}
    assert concurrency_settings(with_it, 16, "key") == (
        {"concurrency": 16, "ordering": "key"},
        "concurrency 16, ordering key",
    )
    assert concurrency_settings(with_it, None, None) == ({}, "engine defaults")


def test_processing_fields_are_the_installed_settings() -> None:
    fields = processing_fields()
    assert {"batch_size", "mode", "dead_letter_topic"} <= fields
    knobs, engine = concurrency_settings(fields, 64, "partition")
    # Whatever the engine is today, the row never claims a setting it did not pass.
    assert (engine == NO_CONCURRENCY) == (knobs == {})


def test_select_takes_patterns_and_rejects_unknown_names() -> None:
    keys = [c.key for c in _select("io-c*", None)]
    assert keys == [
        "io-c1-key",
        "io-c16-key",
        "io-c64-key",
        "io-c1-partition",
        "io-c16-partition",
        "io-c64-partition",
    ]
    assert [c.key for c in _select("raw*", "raw-io")] == ["raw", "raw-async"]
    with pytest.raises(SystemExit, match="no contender matches 'nope'"):
        _select("raw,nope", None)


def test_io_rows_pass_concurrency_and_ordering_to_the_dedupe_contender() -> None:
    row = BY_KEY["io-async-c16-partition"]
    assert row.workload == "io" and row.sleeps
    args = list(row.args)
    assert args[args.index("--handler") + 1] == "async-sleep"
    assert args[args.index("--concurrency") + 1] == "16"
    assert args[args.index("--ordering") + 1] == "partition"


def test_correctness_of_refused_redelivered_and_exact_rows() -> None:
    refused = Outcome(BY_KEY["io-async-c1-key"], refused="X.handle is `async def`: no. More.")
    assert _correctness(refused, DATA) == "refused at start-up: X.handle is `async def`: no"
    sidecar = BY_KEY["sidecar"]
    exact = Outcome(sidecar, report(100, 90, 1.0, redelivered=0))
    assert _correctness(exact, DATA) == "yes, each exactly once"
    twice = Outcome(sidecar, report(100, 90, 1.0, redelivered=3))
    assert _correctness(twice, DATA).startswith("NO: 3 deliveries beyond")
    short = Outcome(sidecar, report(100, 89, 1.0, redelivered=0))
    assert _correctness(short, DATA) == "NO: handled 89, unique 90"


def test_emit_rows_emit_and_are_compared() -> None:
    dedupe, quix = BY_KEY["plain-emit"], BY_KEY["quix-eos-emit"]
    assert dedupe.args[dedupe.args.index("--handler") + 1] == "emit"
    assert quix.quix and quix.args[quix.args.index("--emit") + 1] == "true"
    assert quix.args[quix.args.index("--guarantee") + 1] == "exactly-once"
    assert ("plain-emit", "quix-eos-emit", 1.0) in TARGETS


def test_correctness_of_emit_rows_checks_the_outputs_read_back() -> None:
    row = BY_KEY["plain-emit"]

    def verdict(outputs: int, ids: int, mismatched: int = 0, handled: int = 90) -> str:
        r = report(100, handled, 1.0, outputs=outputs, output_ids=ids)
        r["output_mismatched"] = mismatched
        return _correctness(Outcome(row, r), DATA)

    assert verdict(90, 90) == "yes, and 1 committed output per ID"
    assert verdict(91, 90) == "NO: 91 committed outputs for 90 IDs, 90 unique IDs in the input"
    assert verdict(89, 89).startswith("NO: 89 committed outputs")
    assert verdict(90, 90, mismatched=2) == "NO: 2 outputs are not the event their key names"
    assert verdict(90, 90, handled=89) == "NO: handled 89, unique 90"


def test_targets_name_the_missing_engine_and_check_deliveries() -> None:
    sequential = {"engine": NO_CONCURRENCY}
    outcomes = [
        Outcome(BY_KEY["io-c1-key"], report(100, 90, 0.25, **sequential)),
        Outcome(BY_KEY["io-c64-key"], report(100, 90, 0.25, **sequential)),
        Outcome(BY_KEY["io-async-c1-key"], refused="async handlers are not supported yet"),
        Outcome(BY_KEY["sidecar"], report(3000, 2700, 1.0, redelivered=0)),
    ]
    lines = _targets(outcomes)
    assert len(lines) == 2  # the refused async pair has no rate: no line
    assert lines[0].endswith("1.00x (goal >= 25x): MISSED (engine has no concurrency yet)")
    assert lines[1].endswith("2,700 unique deliveries/s (goal >= 2,000): met")


def test_sidecar_settings_file_loads_as_the_sidecar_reads_it(tmp_path: Path) -> None:
    args = argparse.Namespace(bootstrap="127.0.0.1:1", group="g", topic='we"ird', batch=50)
    knobs, _ = concurrency_settings(processing_fields(), 64, "key")
    sections = config_sections(
        args, store=tmp_path / "store", target_url="http://127.0.0.1:9/events", knobs=knobs
    )
    settings = SidecarAppSettings.load(**tomllib.loads(settings_toml(sections)))
    assert settings.kafka.topics == ['we"ird']
    assert settings.processing.batch_size == 50
    assert settings.sidecar is not None
    assert settings.sidecar.target_url == "http://127.0.0.1:9/events"
    assert settings.sidecar.listen_port == 0


def test_http_target_counts_posts_per_idempotency_key() -> None:
    with HttpTarget(0.001) as target:
        url = urlsplit(target.url)
        client = HTTPConnection(url.hostname or "", url.port)  # one keep-alive connection
        try:
            for key, body in (("a", b"{}"), ("b", b"{}"), ("a", b"{}"), (None, b"")):
                headers = {} if key is None else {"Idempotency-Key": key}
                client.request("POST", url.path or "/", body=body, headers=headers)
                answer = client.getresponse()
                answer.read()
                assert answer.status == 200
        finally:
            client.close()
    assert target.deliveries == {"a": 2, "b": 1}
    assert target.unkeyed == 1
    assert target.first_at is not None
