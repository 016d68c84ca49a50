"""What an install carries: one version, aiohttp for the sidecar only, core settings alone."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from typer.testing import CliRunner

import dedupe_consumer
from dedupe_consumer.cli import app

REPO = Path(__file__).resolve().parents[2]

WITHOUT_AIOHTTP = """
import importlib.abc, sys

class NoAiohttp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "aiohttp" or name.startswith("aiohttp."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoAiohttp())
"""
"""Run first in a subprocess: the interpreter behaves as an install without the sidecar extra."""

WITHOUT_OTEL = WITHOUT_AIOHTTP.replace('"aiohttp"', '"opentelemetry"').replace(
    '"aiohttp."', '"opentelemetry."'
)
"""The same, for an install without the otel extra."""


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_COLOR": "1"},
    )


def _pyproject() -> dict[str, object]:
    with (REPO / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)["project"]  # type: ignore[no-any-return]


def test_core_settings_import_nothing_of_the_sidecar() -> None:
    proc = _python(
        "import sys, dedupe_consumer.config\n"
        "print(sorted(m for m in sys.modules if m.startswith('dedupe_consumer.sidecar')))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_core_and_its_command_line_work_without_aiohttp() -> None:
    proc = _python(
        WITHOUT_AIOHTTP + "import dedupe_consumer, dedupe_consumer.cli\n"
        "print('aiohttp' in sys.modules, dedupe_consumer.__version__)"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", dedupe_consumer.__version__]


def test_the_sidecar_without_aiohttp_names_the_extra(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text("")  # never read: the missing dependency is reported first
    proc = _python(
        WITHOUT_AIOHTTP + "import runpy\n"
        "sys.argv = ['dedupe-consumer', *sys.argv[1:]]\n"
        "runpy.run_module('dedupe_consumer', run_name='__main__')",
        "sidecar",
        "--config",
        str(config),
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs aiohttp" in proc.stderr
    assert "pip install 'dedupe-consumer[sidecar]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_aiohttp_is_only_in_the_sidecar_extra_which_the_test_extras_include() -> None:
    project = _pyproject()
    dependencies = project["dependencies"]
    extras = project["optional-dependencies"]
    assert isinstance(dependencies, list) and isinstance(extras, dict)
    assert not [d for d in dependencies if d.startswith("aiohttp")]
    assert [d for d in extras["sidecar"] if d.startswith("aiohttp")]
    assert "dedupe-consumer[sidecar]" in extras["test"]  # the suite tests the sidecar
    assert "dedupe-consumer[test,bench]" in extras["dev"]  # scripts/test.sh installs dev


def test_the_version_is_defined_once_and_everything_agrees() -> None:
    project = _pyproject()
    assert "version" not in project and project["dynamic"] == ["version"]
    with (REPO / "pyproject.toml").open("rb") as fh:
        dynamic = tomllib.load(fh)["tool"]["setuptools"]["dynamic"]
    assert dynamic == {"version": {"attr": "dedupe_consumer.__version__"}}
    assert importlib.metadata.version("dedupe-consumer") == dedupe_consumer.__version__
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"dedupe-consumer {dedupe_consumer.__version__}"


def test_without_the_otel_extra_everything_runs_untraced_and_tracing_names_the_extra(
    tmp_path: Path,
) -> None:
    proc = _python(
        WITHOUT_OTEL
        + "import dedupe_consumer, dedupe_consumer.cli, dedupe_consumer.sidecar.handler\n"
        "from dedupe_consumer import DedupeConsumer, Handler, Settings\n"
        "from dedupe_consumer.observability import configure_logging\n"
        "configure_logging('info', 'json')\n"
        "values = dict(kafka={'bootstrap_servers': 'unused:9092', 'group_id': 'g',\n"
        "    'topics': ['t']}, processing={'dead_letter_topic': 'd'},\n"
        f"    store={{'path': {str(tmp_path / 's')!r}}}, tracing={{'enabled': True}})\n"
        "try:\n"
        "    DedupeConsumer(Handler(), Settings.load(**values)).run()\n"
        "except dedupe_consumer.ConfigError as error:\n"
        "    print('ConfigError:', error)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if 'opentelemetry' in m}))\n"
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("ConfigError: tracing.enabled = true needs OpenTelemetry")
    assert "pip install 'dedupe-consumer[otel]'" in lines[0]
    assert lines[1] == "[]"
    assert not (tmp_path / "s").exists()  # refused before the store was opened


def test_opentelemetry_is_only_in_the_otel_extra_which_the_test_extras_include() -> None:
    project = _pyproject()
    dependencies = project["dependencies"]
    extras = project["optional-dependencies"]
    assert isinstance(dependencies, list) and isinstance(extras, dict)
    assert not [d for d in dependencies if d.startswith("opentelemetry")]
    assert {d.split(">")[0] for d in extras["otel"]} == {
        "opentelemetry-api",
        "opentelemetry-sdk",
        "opentelemetry-exporter-otlp-proto-http",
    }
    assert "dedupe-consumer[otel]" in extras["test"]  # the suite tests tracing, never skips
