"""The command line: bad input stops at start-up with a message that names the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dedupe_consumer.cli import app

from .test_settings import GOOD

runner = CliRunner()
FORMATS = pytest.mark.parametrize("fmt", ["console", "json"])


def config_in(tmp_path: Path, text: str, fmt: str) -> Path:
    config = tmp_path / "c.toml"
    config.write_text(f"{text}\n[observability]\nlog_format = {fmt!r}\n")
    return config


@FORMATS
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, fmt: str) -> None:
    config = config_in(tmp_path, GOOD.replace("batch_size = 500", "batch_size = 0"), fmt)
    result = runner.invoke(app, ["run", "--config", str(config), "--handler", "x.y:Z"])
    assert result.exit_code == 2
    assert "processing.batch_size = 0" in result.output
    assert "1..100000" in result.output


@FORMATS
def test_bad_handler_reference_exits_2(tmp_path: Path, fmt: str) -> None:
    config = config_in(tmp_path, GOOD, fmt)
    result = runner.invoke(app, ["run", "--config", str(config), "--handler", "no_colon"])
    assert result.exit_code == 2
    assert "expected 'package.module:ClassName'" in result.output
    result = runner.invoke(app, ["run", "--config", str(config), "--handler", "json:loads"])
    assert result.exit_code == 2
    assert "is not a dedupe_consumer.Handler subclass" in result.output


def test_offline_demo_checks_handled_equals_unique() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dedupe_consumer",
            "demo",
            "--events",
            "3000",
            "--duplicates",
            "0.2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every unique event ID was handled exactly once" in proc.stdout
    assert "3,000" in proc.stdout


def test_every_commands_help_is_plain_with_whole_option_names() -> None:
    commands = ["run", "demo", "broker", "schema-registry", "record", "replay", "sidecar"]
    for command in commands:
        result = runner.invoke(app, [command, "--help"], terminal_width=80)
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output, command
        assert "…" not in result.output, command  # no option name cut short
    assert "--port" in runner.invoke(app, ["broker", "--help"]).output
    assert "--brokers" in runner.invoke(app, ["broker", "--help"]).output
    assert "--port" in runner.invoke(app, ["schema-registry", "--help"]).output
    assert "--redeliver-batches" in runner.invoke(app, ["replay", "--help"]).output


def test_broker_refuses_a_pinned_port_for_a_cluster() -> None:
    """``--port`` pins one broker's port; three nodes need three: a usage error, before
    anything is started."""
    result = runner.invoke(app, ["broker", "--brokers", "3", "--port", "9092"])
    assert result.exit_code == 2, result.output
    assert "--port" in result.output and "single broker" in result.output
    assert runner.invoke(app, ["broker", "--brokers", "0"]).exit_code == 2
