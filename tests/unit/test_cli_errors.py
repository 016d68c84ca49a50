"""Every command reports an error the same way: one line, the same label, the same exit code."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dedupe_consumer.cli import app
from dedupe_consumer.cli_support import reporting_errors, usage_error
from dedupe_consumer.errors import ConfigError, OffsetRegressionError

from .test_settings import GOOD

runner = CliRunner()

BAD = GOOD.replace("batch_size = 500", "batch_size = 0")


def _invocations(config: Path, recording: Path) -> dict[str, list[str]]:
    """The commands that read a config file, each given *config*."""
    return {
        "run": ["run", "-c", str(config), "--handler", "x.y:Z"],
        "sidecar": ["sidecar", "-c", str(config)],
        "replay": ["replay", str(recording), "-c", str(config), "--handler", "x.y:Z"],
    }


def test_a_missing_config_file_reads_the_same_in_every_command_that_takes_one(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "missing.toml"
    reports = {}
    for command, args in _invocations(missing, tmp_path / "r.jsonl").items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (command, result.output)
        reports[command] = result.stderr
    expected = (
        f"configuration error: config file {str(missing)!r} does not exist or is not a file\n"
    )
    assert reports == dict.fromkeys(reports, expected), reports


def test_a_bad_setting_is_a_configuration_error_naming_key_and_fix_in_every_command(
    tmp_path: Path,
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(BAD)
    for command, args in _invocations(config, tmp_path / "r.jsonl").items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (command, result.output)
        assert "Traceback" not in result.output, command
        assert result.stderr.startswith("configuration error: invalid configuration in "), (
            command,
            result.stderr,
        )
        assert "processing.batch_size = 0" in result.stderr, command
        assert "1..100000" in result.stderr, command  # what is accepted: the fix


def test_a_bad_handler_reads_the_same_in_run_and_replay(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    run = runner.invoke(app, ["run", "-c", str(config), "--handler", "no_colon"])
    replay = runner.invoke(app, ["replay", str(tmp_path / "r.jsonl"), "--handler", "no_colon"])
    assert run.exit_code == replay.exit_code == 2
    assert run.stderr == replay.stderr
    assert run.stderr == (
        "configuration error: --handler 'no_colon': expected 'package.module:ClassName'\n"
    )


def test_bad_input_is_an_error_line_exit_2(tmp_path: Path) -> None:
    replay = runner.invoke(app, ["replay", str(tmp_path / "r.jsonl")])
    assert replay.exit_code == 2
    assert replay.stderr == (
        "error: give exactly one of --handler (replay through the engine) or --to-topic\n"
    )
    record = runner.invoke(app, ["record", "-b", "x:1", "-t", "t", "-o", "o", "--from", "soon"])
    assert record.exit_code == 2, record.output
    assert record.stderr.startswith("error: "), record.stderr
    assert len(record.stderr.splitlines()) == 1, record.stderr


def test_a_broker_that_cannot_be_had_is_an_error_line_exit_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DEDUPE_KAFKA_MAVEN_ARTIFACT", "not-coordinates")
    monkeypatch.setenv("DEDUPE_KAFKA_CACHE", str(tmp_path))
    result = runner.invoke(app, ["broker"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: BrokerUnavailableError: maven coordinates "), (
        result.stderr
    )
    assert "must look like group:artifact:version" in result.stderr


def test_a_schema_registry_that_cannot_be_had_is_an_error_line_exit_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DEDUPE_APICURIO_REGISTRY_VERSION", "not a version")
    monkeypatch.setenv("DEDUPE_SCHEMA_REGISTRY_CACHE", str(tmp_path))
    result = runner.invoke(app, ["schema-registry"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith(
        "error: SchemaRegistryStartError: Apicurio Registry version 'not a version'"
    ), result.stderr
    assert list(tmp_path.iterdir()) == []


def _raising(error: Exception, **options: object) -> typer.Typer:
    """A one-command app that raises *error* inside ``reporting_errors(**options)``."""
    one = typer.Typer()

    @one.command()
    def fail() -> None:
        with reporting_errors(**options):  # type: ignore[arg-type]
            raise error

    return one


@pytest.mark.parametrize(
    ("error", "options", "code", "line"),
    [
        (ConfigError("[sidecar] target_url: missing"), {}, 2, "configuration error: "),
        (ValueError("--from 'x': bad"), {"usage": (ValueError,)}, 2, "error: "),
        (OffsetRegressionError("[/x] went back"), {}, 1, "error: OffsetRegressionError: "),
        (OSError("disk full"), {"unexpected": True}, 1, "error: OSError: "),
    ],
)
def test_the_reporter_maps_each_kind_to_its_label_and_exit_code(
    error: Exception, options: dict[str, object], code: int, line: str
) -> None:
    result = runner.invoke(_raising(error, **options), [])
    assert result.exit_code == code, result.output
    assert result.stderr == f"{line}{error}\n"  # literal: "[sidecar]" is not rich markup


def test_the_reporter_lets_other_errors_and_typer_exits_through() -> None:
    result = runner.invoke(_raising(OSError("disk full")), [])
    assert isinstance(result.exception, OSError)  # a bug is a traceback, not a line
    result = runner.invoke(_raising(typer.Exit(3), unexpected=True), [])
    assert result.exit_code == 3
    assert result.stderr == ""


def test_usage_error_exits_2_with_the_message() -> None:
    one = typer.Typer()

    @one.command()
    def fail() -> None:
        usage_error("--to-topic needs --bootstrap-servers")

    result = runner.invoke(one, [])
    assert result.exit_code == 2
    assert result.stderr == "error: --to-topic needs --bootstrap-servers\n"
