"""User-supplied text printed through rich is text, never markup.

Event IDs, topics, paths and error texts come from producers and users; rich
reads ``[...]`` as markup, so an ID ``[/x]`` raised ``MarkupError`` and one
like ``[bold]`` silently changed what the report said.
"""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from dedupe_consumer.cli import app
from dedupe_consumer.replay.cli import _print_report
from dedupe_consumer.replay.report import LostEvent, ReplayReport

from .test_replay import HANDLER, line, write_recording

TRICKY = ["[/x]", "[bold red]y", "[link=http://e.example]z", "\\[w]"]


def test_replay_report_prints_ids_and_paths_literally(tmp_path: Path) -> None:
    folder = tmp_path / "[red]dir"
    folder.mkdir()
    lines = []
    for n, event_id in enumerate(TRICKY):  # each ID in two partitions: handled twice
        lines += [line(0, n, event_id), line(1, n, event_id)]
    path = write_recording(folder / "[bold]rec.jsonl", lines)
    result = CliRunner().invoke(app, ["replay", str(path), "--handler", HANDLER])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == 1, result.output
    for event_id in TRICKY:
        assert f"handled 2x: {event_id} (in several partitions)" in result.stdout


def test_usage_errors_print_paths_literally(tmp_path: Path) -> None:
    missing = tmp_path / "[/x][bold].jsonl"
    result = CliRunner().invoke(app, ["replay", str(missing), "--handler", HANDLER])
    assert result.exit_code == 2, repr(result.exception)
    assert "[/x][bold].jsonl" in result.stderr


def test_property_errors_print_literally_and_hide_secrets() -> None:
    result = CliRunner().invoke(
        app, ["record", "-b", "127.0.0.1:1", "-t", "t", "-o", "x.jsonl", "-X", "[/a]"]
    )
    assert result.exit_code == 2, repr(result.exception)
    assert "--property '[/a]': expected KEY=VALUE" in result.stderr
    result = CliRunner().invoke(
        app,
        ["record", "-b", "127.0.0.1:1", "-t", "t", "-o", "x.jsonl", "-X", "sasl.password:pw-9Zk"],
    )
    assert result.exit_code == 2, repr(result.exception)
    assert "expected KEY=VALUE" in result.stderr
    assert "pw-9Zk" not in result.output


def test_every_report_line_is_literal() -> None:
    report = ReplayReport(
        recording="[/rec].jsonl",
        topic="[/topic]",
        events=2,
        injected=0,
        deliveries=2,
        handled=1,
        duplicates=0,
        replays=0,
        conflicting=0,
        dead_lettered=1,
        missing_id=0,
        unique_ids={"[/a]", "[/b]"},
        handled_ids={"[/a]"},
        dead_lettered_ids={"[/b]"},
        handled_more_than_once={"[/a]": 2},
        lost=[LostEvent(0, 7, "[/lost]", "neither handled nor dead-lettered")],
        dead_letter_reasons={"[/reason]": 1},
        ids_in_several_partitions=set(),
        error="MissingEventIdError: [/e] at offset 7",
    )
    out = io.StringIO()
    _print_report(Console(file=out, width=200), report)
    text = out.getvalue()
    for shown in (
        "[/topic]",
        "[/rec].jsonl",
        "[/reason]: 1",
        "handled 2x: [/a]",
        "id [/lost]",
        "[/e] at offset 7",
    ):
        assert shown in text, text
