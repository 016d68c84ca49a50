"""The guide's examples (README.md and docs/*.md) are real files under ``examples/`` and run.

Each fenced ``python`` block of the guide must be, byte for byte, the file
listed in ``PYTHON_BLOCKS`` (in guide order: the README, then the docs pages by
name), so the guide cannot show code that is not run. The blocks that need no
broker are executed here through the real engine (the ``replay`` fixture); the
Quickstart on a real broker, and the guide's ``dedupe-consumer
run``/``record``/``replay --to-topic`` commands, are in
``tests/integration/test_readme_examples.py``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dedupe_consumer import Handler, TopicPartition
from dedupe_consumer.replay import read_recording
from dedupe_consumer.replay.report import ReplayReport
from dedupe_consumer.store import RocksStore
from dedupe_consumer.testing.pytest_plugin import ReplayRunner
from examples.quickstart.handlers import ChargeHandler
from examples.quickstart.ledger import Ledger
from examples.replay_test import test_payments_once as replay_example

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
GUIDE = [README, *sorted((ROOT / "docs").glob("*.md"))]
"""Where examples are shown: the README, then the documentation pages by name."""
RECORDING = ROOT / "examples" / "replay_test" / "payments.jsonl"

PYTHON_BLOCKS = [
    "examples/quickstart/handlers.py",  # README: Quickstart
    "examples/quickstart/ledger.py",  # docs/concepts.md: Transactional effects
    "examples/quickstart/handlers.py",  # docs/handlers.md
    "examples/replay_test/test_payments_once.py",  # docs/replay-testing.md
    "examples/quickstart/test_handlers.py",  # docs/testing.md
]


def fenced_blocks(language: str, text: str | None = None) -> list[str]:
    """The bodies of the guide's fenced blocks in ``language``, in order."""
    if text is None:
        text = "\n".join(page.read_text(encoding="utf-8") for page in GUIDE)
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def cli_commands(text: str | None = None) -> list[list[str]]:
    """Every ``dedupe-consumer`` command of the guide's bash blocks, split like a shell."""
    commands = []
    for block in fenced_blocks("bash", text):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:1] == ["dedupe-consumer"]:
                commands.append(argv)
    return commands


def option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg in names:
            return argv[i + 1]
    return None


def unique_payments() -> dict[str, dict[str, Any]]:
    """The recording's payments by event ID (its producer retries counted once)."""
    payments: dict[str, dict[str, Any]] = {}
    for record in read_recording(RECORDING).records:
        payment = json.loads(record.value_ or b"{}")
        payment["partition"] = record.partition()
        payments.setdefault(payment["payment_id"], payment)
    return payments


def test_fenced_blocks_finds_python_blocks_and_nothing_else() -> None:
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert fenced_blocks("python", text) == ["x = 1\n", "y = 2\n"]
    assert cli_commands("```bash\ndedupe-consumer run \\\n  -c a.toml  # note\nls\n```\n") == [
        ["dedupe-consumer", "run", "-c", "a.toml"]
    ]


def test_every_python_block_is_the_text_of_its_example_file() -> None:
    blocks = fenced_blocks("python")
    assert len(blocks) == len(PYTHON_BLOCKS), "a python block was added or removed: map it"
    for block, path in zip(blocks, PYTHON_BLOCKS, strict=True):
        assert block == (ROOT / path).read_text(encoding="utf-8"), f"README block != {path}"


def test_readme_commands_name_files_and_handlers_that_exist() -> None:
    commands = cli_commands()
    subcommands = {argv[1] for argv in commands}
    assert {"run", "record", "replay", "sidecar"} <= subcommands
    handlers = [h for argv in commands if (h := option(argv, "--handler")) is not None]
    configs = [c for argv in commands if (c := option(argv, "--config", "-c")) is not None]
    assert handlers and configs
    for spec in handlers:
        module, _, name = spec.partition(":")
        loaded = getattr(importlib.import_module(module), name)
        assert isinstance(loaded, type) and issubclass(loaded, Handler), spec
    for config in configs:
        assert (ROOT / config).is_file(), config


@pytest.fixture
def from_repo_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository root
    yield


@pytest.mark.usefixtures("from_repo_root")
def test_the_replay_example_runs_and_tests_something(replay: ReplayRunner) -> None:
    reports: list[ReplayReport] = []

    def spy(handler: Any, path: str | Path, **kwargs: Any) -> ReplayReport:
        assert path == "payments.jsonl"  # found next to the example test, as documented
        reports.append(replay(handler, RECORDING.parent / path, **kwargs))
        return reports[-1]

    replay_example.test_payments_once(spy)

    (report,) = reports
    assert report.ok
    assert report.handled == len(unique_payments()) == len(report.handled_ids) > 0
    assert report.dead_lettered == 0
    assert report.duplicates >= report.injected > 0


@pytest.mark.usefixtures("from_repo_root")
def test_the_quickstart_handler_charges_each_payment_once(
    replay: ReplayRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = tmp_path / "charges.sqlite3"
    monkeypatch.setenv("CHARGES_DB", str(database))

    report = replay(ChargeHandler, RECORDING, inject_duplicates=0.3, redeliver_batches=True)

    assert report.ok, report.to_json()
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT idempotency_key, account, amount_cents FROM charges").fetchall()
    payments = unique_payments()
    assert sorted(rows) == sorted(
        (event_id, p["account"], p["amount_cents"]) for event_id, p in payments.items()
    )


def test_the_transactional_effects_example_keeps_one_balance_per_account(
    replay: ReplayRunner, tmp_path: Path
) -> None:
    report = replay(Ledger, RECORDING, inject_duplicates=0.5, redeliver_batches=True, seed=3)
    assert report.ok, report.to_json()
    assert report.duplicates > 0

    expected: dict[tuple[int, str], int] = {}
    for payment in unique_payments().values():
        where = (payment["partition"], payment["account"])
        expected[where] = expected.get(where, 0) + payment["amount_cents"]
    store = RocksStore(tmp_path / "replay-0" / "state", retention_ms=7 * 86_400_000)
    try:
        staged = {
            (partition, account): int(store.effect(TopicPartition("payments", partition), key) or 0)
            for partition, account in expected
            for key in [f"balance:{account}".encode()]
        }
    finally:
        store.close()
    assert staged == expected


def test_the_replay_command_runs_as_written(tmp_path: Path) -> None:
    """``dedupe-consumer replay payments.jsonl --config ... --handler ...``, from a project root."""
    (argv,) = [a for a in cli_commands() if a[1] == "replay" and "--handler" in a]
    (tmp_path / "payments.jsonl").write_bytes(RECORDING.read_bytes())
    (tmp_path / "config").symlink_to(ROOT / "config")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    result = subprocess.run(
        [sys.executable, "-m", "dedupe_consumer", *argv[1:], "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["handled"] == len(unique_payments())
    assert report["dead_lettered"] == 0
