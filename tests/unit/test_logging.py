"""Every log call is safe in every format: JSON never raises, the console escapes."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from dedupe_consumer import Event, PermanentError
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.observability import configure_logging

from .conftest import TOPIC, Recorder, Rig, rec

FORGED = "pay-1\n2026-01-01T00:00:00Z [info     ] all_clear \x1b[32mok\x1b[0m\r\u2028\u202e"
NO_SPACES = "pay-2\x1b[2J\x1b[31mFAKE\x0b\x0c\x85\u2028next"
"""No character the renderer quotes by itself: only escaping stops these."""


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def lines_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")

    def __repr__(self) -> str:
        raise RuntimeError("no")


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_no_log_call_raises_in_any_format(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("debug", fmt)
    log = structlog.get_logger("test")
    log.info(
        "odd_values",
        by_partition={TopicPartition("t", 0): 1, ("a", 1): 2, None: 3, 1.5: 4},
        nan=math.nan,
        raw=b"\xff\x00",
        obj=object(),
        bad=Unprintable(),
        nested=[{TopicPartition("t", 1): {"x": {1, 2}}}],
    )
    (line,) = lines_of(capsys.readouterr().err)
    assert "odd_values" in line
    if fmt == "json":
        data = json.loads(line)
        assert data["by_partition"] == {"t[0]": 1, "('a', 1)": 2, "None": 3, "1.5": 4}
        assert data["nan"] == "nan"
        assert data["nested"] == [{"t[1]": {"x": [1, 2]}}]
        assert data["bad"].startswith("<unprintable")


def test_engine_assignment_log_renders_as_json(
    rig: Callable[..., Rig], capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", "json")
    r = rig()  # assigns four partitions: the log line that crashed `run` and `sidecar`
    r.engine.assign([TopicPartition(TOPIC, 0)])
    assigned = [json.loads(line) for line in lines_of(capsys.readouterr().err)]
    assert [a["event"] for a in assigned] == ["partitions_assigned"] * 2
    assert assigned[0]["resume"] == {f"{TOPIC}[{p}]": None for p in range(4)}


def reject(event: Event) -> None:
    raise PermanentError(f"refused {FORGED}")


def test_console_escapes_control_characters_in_logged_text(
    rig: Callable[..., Rig], capsys: pytest.CaptureFixture[str]
) -> None:
    # An ID with control characters never reaches a log line: it is dead-lettered as
    # invalid-id. Other text from outside does (a handler's error message, a reason).
    configure_logging("info", "console")
    r = rig(Recorder(fail=reject))
    capsys.readouterr()
    r.engine.process([rec(0, "pay-1")])
    err = capsys.readouterr().err
    (line,) = lines_of(err)  # one event, one line: no forged second line
    assert "dead_lettered" in line
    for raw in ("\x1b", "\r", "\u2028", "\u202e"):
        assert raw not in err
    assert "refused pay-1\\n2026-01-01T00:00:00Z" in line
    assert "\\x1b[32mok\\x1b[0m\\r\\u2028\\u202e" in line


def test_an_id_with_control_characters_is_never_logged_raw(
    rig: Callable[..., Rig], capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", "console")
    r = rig()
    capsys.readouterr()
    r.engine.process([rec(0, FORGED)])
    err = capsys.readouterr().err
    (line,) = lines_of(err)
    assert "invalid-id" in line
    for raw in ("\x1b", "\r", "\u2028", "\u202e"):
        assert raw not in err


@pytest.mark.parametrize("where", ["value", "event", "key"])
def test_console_escapes_ansi_and_line_breaks_without_spaces(
    where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", "console")
    log = structlog.get_logger("test")
    if where == "value":
        log.warning("missing_event_id", event_id=NO_SPACES)
    elif where == "event":
        log.warning(NO_SPACES)
    else:
        log.warning("odd_key", **{NO_SPACES: 1})
    err = capsys.readouterr().err
    (line,) = lines_of(err)
    for raw in ("\x1b", "\x0b", "\x0c", "\x85", "\u2028"):
        assert raw not in err
    assert "pay-2\\x1b[2J\\x1b[31mFAKE\\x0b\\x0c\\x85\\u2028next" in line


def test_console_keeps_traceback_lines_but_escapes_their_controls(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "console")
    try:
        raise ValueError("bad \x1b[31mid")
    except ValueError:
        structlog.get_logger("test").exception("failed", event_id="a\nb")
    err = capsys.readouterr().err
    assert "\x1b" not in err
    assert "Traceback (most recent call last):\n" in err
    assert "bad \\x1b[31mid" in err
    assert "event_id='a\\nb'" in err


def test_json_lines_stay_one_line_per_event(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    values: dict[str, Any] = {"event_id": FORGED, "lone": "\ud800"}
    structlog.get_logger("test").warning("forged", **values)
    (line,) = lines_of(capsys.readouterr().err)
    assert json.loads(line)["event_id"] == FORGED


def test_the_library_logs_as_its_settings_say_unless_the_app_configured_logging(
    tmp_path: Path,
) -> None:
    """A script that only calls DedupeConsumer.run() gets observability.log_format."""
    import subprocess
    import sys

    recording = tmp_path / "r.jsonl"
    head = {"format": "dedupe-consumer-recording", "version": 1, "topic": "t",
            "partitions": 1, "recorded_at": "2024-06-01T00:00:00Z"}  # fmt: skip
    line = {
        "topic": "t",
        "partition": 0,
        "offset": 0,
        "timestamp": 1,
        "key": "k",
        "value": "{}",
        "headers": [],
    }  # fmt: skip  (no event-id: a logged warning)
    recording.write_text(json.dumps(head) + "\n" + json.dumps(line) + "\n")
    script = f"""
from dedupe_consumer import Handler, Settings
from dedupe_consumer.replay import replay_recording
class H(Handler):
    def handle(self, event): pass
settings = Settings.load(
    kafka={{"bootstrap_servers": "x:1", "group_id": "g", "topics": ["t"]}},
    processing={{"dead_letter_topic": "dlq"}}, store={{"path": {str(tmp_path / "s")!r}}},
    observability={{"log_format": "json", "log_level": "warning"}},
)
replay_recording(H, {str(recording)!r}, settings=settings, state_dir={str(tmp_path / "r")!r})
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    logged = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith("{")]
    assert any(e["event"] == "missing_event_id" for e in logged), proc.stderr
    assert not [x for x in proc.stderr.splitlines() if "[warning" in x]  # no console lines
