"""First-day CLI friction (issue 11): the broker address on the command line, handler typos."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dedupe_consumer.cli import app
from dedupe_consumer.cli_support import load_settings
from dedupe_consumer.errors import ConfigError
from dedupe_consumer.loading import load_handler_class

from .test_settings import GOOD

runner = CliRunner()


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(GOOD)
    return path


def test_bootstrap_servers_flag_overrides_the_file_and_the_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)
    assert load_settings(config, None).kafka.bootstrap_servers == "localhost:9092"
    monkeypatch.setenv("DEDUPE_KAFKA__BOOTSTRAP_SERVERS", "env-host:9092")
    assert load_settings(config, None).kafka.bootstrap_servers == "env-host:9092"
    settings = load_settings(config, "flag-host:9093")
    assert settings.kafka.bootstrap_servers == "flag-host:9093"
    assert settings.kafka.group_id == "payments-dedupe"  # the rest of [kafka] is kept
    assert settings.kafka.consumer == {"session.timeout.ms": 45000}


def test_an_empty_bootstrap_servers_flag_is_a_config_error(tmp_path: Path) -> None:
    config = _config(tmp_path)
    result = runner.invoke(
        app, ["run", "-c", str(config), "-b", " ", "--handler", "x:Y"], terminal_width=200
    )
    assert result.exit_code == 2, result.output
    assert "kafka.bootstrap_servers" in result.output


@pytest.mark.parametrize("command", ["run", "sidecar"])
def test_run_and_sidecar_help_show_the_flag_and_the_env_var(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "--bootstrap-servers" in result.output
    assert "-b" in result.output
    assert "DEDUPE_KAFKA__BOOTSTRAP_SERVERS" in result.output


MODULE = """
from dedupe_consumer import Event, Handler


class ChargeHandler(Handler):
    def handle(self, event: Event) -> None:
        pass


class RefundHandler(Handler):
    def handle(self, event: Event) -> None:
        pass


class NotAHandler:
    pass
"""


@pytest.fixture
def handlers_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "fd_handlers.py").write_text(MODULE)
    (tmp_path / "fd_broken.py").write_text("import fd_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("fd_handlers", "fd_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def _error(spec: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_handler_class(spec)
    return str(info.value)


def test_a_misspelled_handler_class_suggests_the_handlers_the_module_has(
    handlers_dir: Path,
) -> None:
    message = _error("fd_handlers:ChrageHandler")
    assert "has no attribute 'ChrageHandler'" in message
    assert "did you mean 'ChargeHandler'" in message
    assert "ChargeHandler, RefundHandler" in message
    assert "not a dedupe_consumer.Handler subclass" not in message


def test_an_existing_class_that_is_not_a_handler_says_so(handlers_dir: Path) -> None:
    message = _error("fd_handlers:NotAHandler")
    assert "is not a dedupe_consumer.Handler subclass" in message
    assert "ChargeHandler, RefundHandler" in message


def test_a_missing_module_is_told_apart_from_an_import_error_inside_it(
    handlers_dir: Path,
) -> None:
    missing = _error("fd_no_such_module:ChargeHandler")
    assert "no module named 'fd_no_such_module'" in missing
    assert "check the name" in missing
    broken = _error("fd_broken:ChargeHandler")
    assert "importing 'fd_broken' failed" in broken
    assert "ModuleNotFoundError: No module named 'fd_no_such_dependency'" in broken
