from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from dedupe_consumer import ConfigError, Settings
from dedupe_consumer.cli_support import load_settings
from dedupe_consumer.sidecar.settings import SidecarAppSettings

REPO = Path(__file__).resolve().parents[2]

GOOD = """
[kafka]
bootstrap_servers = "localhost:9092"
group_id = "payments-dedupe"
topics = ["payments"]
[kafka.consumer]
"session.timeout.ms" = 45000
[dedupe]
id_source = "header:event-id"
on_missing_id = "dead-letter"
retention = "7d"
[store]
path = "./state"
[processing]
batch_size = 500
max_retries = 3
dead_letter_topic = "payments.dlq"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "consumer.toml"
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str, kind: type[Settings] = Settings) -> str:
    with pytest.raises(ConfigError) as info:
        kind.from_toml(write(tmp_path, text))
    return str(info.value)


def test_the_documented_shape_loads(tmp_path: Path) -> None:
    s = Settings.from_toml(write(tmp_path, GOOD))
    assert s.kafka.topics == ["payments"]
    assert s.kafka.consumer == {"session.timeout.ms": 45000}
    assert s.dedupe.retention == timedelta(days=7)
    assert s.processing.batch_size == 500
    assert s.store.path == Path("state")


def test_shipped_example_config_loads() -> None:
    s = Settings.from_toml(REPO / "config" / "consumer.toml")
    assert s.processing.dead_letter_topic


def test_env_overrides_file_with_nested_delimiter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEDUPE_KAFKA__BOOTSTRAP_SERVERS", "broker-1:9093")
    monkeypatch.setenv("DEDUPE_PROCESSING__BATCH_SIZE", "42")
    monkeypatch.setenv("DEDUPE_DEDUPE__RETENTION", "36h")
    s = Settings.from_toml(write(tmp_path, GOOD))
    assert s.kafka.bootstrap_servers == "broker-1:9093"
    assert s.kafka.group_id == "payments-dedupe"  # untouched siblings survive the merge
    assert s.processing.batch_size == 42
    assert s.dedupe.retention == timedelta(hours=36)


def test_unknown_key_names_key_and_accepted_keys(tmp_path: Path) -> None:
    msg = load_error(tmp_path, GOOD.replace("batch_size = 500", "batch_sise = 500"))
    assert "processing.batch_sise: unknown key" in msg
    assert "batch_size" in msg and "dead_letter_topic" in msg


def test_wrong_type_names_key_value_and_range(tmp_path: Path) -> None:
    msg = load_error(tmp_path, GOOD.replace("batch_size = 500", 'batch_size = "many"'))
    assert "processing.batch_size = 'many'" in msg
    assert "1..100000" in msg


def test_bad_duration_names_accepted_forms(tmp_path: Path) -> None:
    msg = load_error(tmp_path, GOOD.replace('retention = "7d"', 'retention = "7 days"'))
    assert "dedupe.retention = '7 days'" in msg
    assert "'7d'" in msg and "'1h30m'" in msg


def test_bad_id_source_lists_the_forms(tmp_path: Path) -> None:
    msg = load_error(tmp_path, GOOD.replace("header:event-id", "headr:event-id"))
    assert "dedupe.id_source = 'headr:event-id'" in msg
    assert "'header:<name>'" in msg and "'json:/json/pointer'" in msg and "'hash'" in msg


def test_bad_json_pointer(tmp_path: Path) -> None:
    msg = load_error(tmp_path, GOOD.replace("header:event-id", "json:payment.id"))
    assert "must start with '/'" in msg


def test_missing_topics_is_required(tmp_path: Path) -> None:
    msg = load_error(tmp_path, GOOD.replace('topics = ["payments"]\n', ""))
    assert "kafka.topics: required but missing" in msg
    assert "non-empty list of topic names" in msg


def test_empty_topics_rejected(tmp_path: Path) -> None:
    msg = load_error(tmp_path, GOOD.replace('["payments"]', "[]"))
    assert "kafka.topics" in msg


def test_several_errors_reported_together(tmp_path: Path) -> None:
    text = GOOD.replace('retention = "7d"', 'retention = "soon"').replace(
        "max_retries = 3", "max_retries = -1"
    )
    msg = load_error(tmp_path, text)
    assert "dedupe.retention" in msg and "processing.max_retries" in msg


def test_owned_librdkafka_properties_are_refused(tmp_path: Path) -> None:
    msg = load_error(
        tmp_path, GOOD.replace('"session.timeout.ms" = 45000', '"enable.auto.commit" = true')
    )
    assert "kafka.consumer" in msg and "commit after persist" in msg


def test_dead_letter_topic_must_not_be_a_source(tmp_path: Path) -> None:
    msg = load_error(tmp_path, GOOD.replace('"payments.dlq"', '"payments"'))
    assert "dead_letter_topic" in msg


def test_invalid_toml_reports_the_line(tmp_path: Path) -> None:
    msg = load_error(tmp_path, GOOD.replace("batch_size = 500", "batch_size = = 500"))
    assert "not valid TOML" in msg and "line" in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.from_toml(tmp_path / "nope.toml")


def test_bad_env_value_is_reported_like_a_file_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEDUPE_DEDUPE__ON_MISSING_ID", "ignore")
    msg = load_error(tmp_path, GOOD)
    assert "dedupe.on_missing_id = 'ignore'" in msg
    assert "'dead-letter', 'fail' or 'hash'" in msg


def test_optional_section_errors_name_accepted_keys_and_ranges(tmp_path: Path) -> None:
    text = GOOD + '\n[sidecar]\ntarget_ur = "http://127.0.0.1:8080/"\nmax_retries = -3\n'
    msg = load_error(tmp_path, text, SidecarAppSettings)
    [unknown] = [line for line in msg.splitlines() if "sidecar.target_ur:" in line]
    assert "unknown key" in unknown and "target_url" in unknown  # accepted keys are listed
    assert "sidecar.target_url: required but missing: set it to" in msg
    assert "sidecar.max_retries = -3" in msg and "0..100" in msg


def test_the_sidecar_section_belongs_to_the_sidecar_settings(tmp_path: Path) -> None:
    """Core settings know nothing of [sidecar]; the sidecar's settings add it."""
    assert "sidecar" not in Settings.model_fields
    text = GOOD + '\n[sidecar]\ntarget_url = "http://127.0.0.1:8080/events"\n'
    msg = load_error(tmp_path, text)
    [line] = [line for line in msg.splitlines() if line.startswith("  - sidecar:")]
    assert "unknown key" in line and "`dedupe-consumer sidecar`" in line
    loaded = SidecarAppSettings.from_toml(write(tmp_path, text))
    assert isinstance(loaded, SidecarAppSettings) and isinstance(loaded, Settings)
    assert loaded.sidecar is not None
    assert loaded.sidecar.target_url == "http://127.0.0.1:8080/events"
    assert loaded.kafka.topics == ["payments"]


def test_shipped_sidecar_config_loads() -> None:
    s = SidecarAppSettings.from_toml(REPO / "config" / "sidecar.toml")
    assert s.sidecar is not None and s.sidecar.target_url.startswith("http")


def test_run_reads_a_file_with_a_sidecar_section_and_still_checks_it(tmp_path: Path) -> None:
    """One file may serve `run` and `sidecar`: `run` loads it, and a bad [sidecar] stops it."""
    good = write(tmp_path, GOOD + '\n[sidecar]\ntarget_url = "http://127.0.0.1:8080/e"\n')
    assert load_settings(good, None).kafka.group_id == "payments-dedupe"
    bad = write(tmp_path, GOOD + '\n[sidecar]\ntarget_url = "ftp://127.0.0.1/e"\n')
    with pytest.raises(ConfigError, match=r"sidecar\.target_url"):
        load_settings(bad, "127.0.0.1:1")
