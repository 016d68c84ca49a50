"""docs/api.md is generated from the docstrings and must not drift from the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_api_reference_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "api_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_api_reference_covers_what_users_write_against() -> None:
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for needle in (
        "## `Handler`",
        "### `Handler.reconcile",
        "### `Handler.parse",
        "## `Event`",
        "| `payload` |",
        "### `DedupeConsumer.run(self, *, until",
        "install_signal_handlers",
        "## `kafka_topic`",
        "## `replay`",
        "### `ReplayReport.tested_nothing` (property)",
    ):
        assert needle in text, needle
