"""docs/configuration.md's reference is generated from the settings models and must not drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from dedupe_consumer import Settings
from dedupe_consumer.sidecar.settings import SidecarSettings

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "configuration.md"


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_docs.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _keys(model: type[BaseModel], prefix: str) -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        nested = [
            t
            for t in (info.annotation, *getattr(info.annotation, "__args__", ()))
            if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        if nested:
            keys += _keys(nested[0], f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_configuration_reference_is_current() -> None:
    proc = _check("--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_reference_has_every_key_with_its_environment_variable() -> None:
    text = PAGE.read_text(encoding="utf-8")
    keys = _keys(Settings, "") + _keys(SidecarSettings, "sidecar.")
    assert "kafka.bootstrap_servers" in keys and "sidecar.target_url" in keys
    for key in keys:
        assert f"### `{key}`" in text, key
        env = "DEDUPE_" + key.replace(".", "__").upper()
        assert f"`{env}`" in text, env


def test_reference_shows_defaults_as_written_in_toml() -> None:
    text = PAGE.read_text(encoding="utf-8")
    retention = text.split("### `dedupe.retention`", 1)[1].split("###", 1)[0]
    assert '* Default: `"7d"`' in retention
    group = text.split("### `kafka.group_id`", 1)[1].split("###", 1)[0]
    assert "* Default: **required**" in group
