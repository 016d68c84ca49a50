"""Replay through the engine: exact report numbers on a hand-built recording, the
stressors, the report's failure detection, the CLI and the pytest fixture."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import BaseModel
from typer.testing import CliRunner

from dedupe_consumer import DeadLetterReason, Event, Handler, PermanentError, Settings
from dedupe_consumer.cli import app
from dedupe_consumer.dead_letters import DeadLetter, KeptDeadLetter
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.replay import Record, ReplayReport, read_recording, replay_recording
from dedupe_consumer.replay.harness import (
    CountingHandler,
    ReconcilingCountingHandler,
    counting,
    with_injected_duplicates,
)
from dedupe_consumer.replay.report import audit
from dedupe_consumer.testing.pytest_plugin import ReplayRunner

TOPIC = "payments"
HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The commands configure structlog to print to the sys.stderr of the moment, which
    CliRunner replaces and then closes; later log lines in this process must not go there."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


class Payment(BaseModel):
    id: str
    cents: int = 100


class CountingIds(Handler):
    """Counts calls per ID; refuses (permanently) IDs starting with 'bad'."""

    payload_model = Payment

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def handle(self, event: Event) -> None:
        if event.id.startswith("bad"):
            raise PermanentError("refused")
        self.calls[event.id] += 1


def line(partition: int, offset: int, event_id: str | None, cents: int = 100) -> dict[str, Any]:
    return {
        "topic": TOPIC,
        "partition": partition,
        "offset": offset,
        "timestamp": 1_717_200_000_000 + offset,
        "key": event_id,
        "value": json.dumps({"id": event_id or "none", "cents": cents}),
        "headers": [] if event_id is None else [["event-id", event_id], ["source", "test"]],
    }


# 12 events, 2 partitions: 7 unique IDs of which 6 handled and 1 refused by the
# handler, 3 duplicates, 1 conflicting duplicate (same ID, other payload), 1 event
# without an ID.
KNOWN = [
    line(0, 0, "a"),
    line(0, 1, "b"),
    line(0, 2, "a"),  # duplicate
    line(0, 3, None),  # no event ID -> dead-lettered (missing-id)
    line(0, 4, "c"),
    line(0, 5, "b"),  # duplicate
    line(1, 10, "d"),  # offsets need not start at 0
    line(1, 11, "e"),
    line(1, 12, "d"),  # duplicate
    line(1, 13, "e", cents=999),  # conflicting duplicate
    line(1, 14, "bad-1"),  # handler raises PermanentError -> dead-lettered
    line(1, 15, "f"),
]


def write_recording(path: Path, lines: list[dict[str, Any]], partitions: int = 2) -> Path:
    head = {
        "format": "dedupe-consumer-recording",
        "version": 1,
        "topic": TOPIC,
        "partitions": partitions,
        "recorded_at": "2024-06-01T00:00:00Z",
    }
    path.write_text("".join(json.dumps(x) + "\n" for x in [head, *lines]))
    return path


@pytest.fixture
def known(tmp_path: Path) -> Path:
    return write_recording(tmp_path / "known.jsonl", KNOWN)


def test_report_numbers_of_a_known_recording(known: Path, tmp_path: Path) -> None:
    handler = CountingIds()
    report = replay_recording(handler, known, state_dir=tmp_path / "s")

    assert report.ok, report.to_json()
    assert (report.events, report.injected, report.deliveries) == (12, 0, 12)
    assert report.handled == 6
    assert report.duplicates == 3
    assert report.conflicting == 0  # on_conflict = "dead-letter" (the default)
    assert report.replays == 0
    assert report.dead_lettered == 3
    assert report.dead_letter_reasons == {
        "conflicting-duplicate": 1,
        "missing-id": 1,
        "permanent-error": 1,
    }
    assert report.missing_id == 1
    assert report.unique_ids == {"a", "b", "c", "d", "e", "f", "bad-1"}
    assert report.handled_ids == {"a", "b", "c", "d", "e", "f"}
    assert report.dead_lettered_ids == {"bad-1", "e"}  # e: its conflicting copy
    assert report.handled_more_than_once == {}
    assert report.lost == []
    assert handler.calls == dict.fromkeys("abcdef", 1)  # the wrapper did not hide the handler


def test_injected_duplicates_are_seeded_retries_and_still_handled_once(
    known: Path, tmp_path: Path
) -> None:
    first = replay_recording(CountingIds, known, inject_duplicates=0.5, seed=3, state_dir=tmp_path)
    again = replay_recording(
        CountingIds, known, inject_duplicates=0.5, seed=3, state_dir=tmp_path / "again"
    )

    assert first.ok and again.ok
    assert (first.events, first.injected) == (18, 6)
    assert first.handled == 6
    assert first.handled_ids == {"a", "b", "c", "d", "e", "f"}
    # every copy is a duplicate, a conflict or a dead letter (missing ID), never a handling
    assert first.duplicates + first.conflicting + first.dead_lettered == 18 - 6
    assert first.to_dict() | {"seconds": 0} == again.to_dict() | {"seconds": 0}


def test_injected_copies_follow_each_partitions_last_offset() -> None:
    records = read_recording_of(KNOWN)
    fed, count = with_injected_duplicates(records, 0.5, seed=11)
    assert count == 6
    assert fed[:12] == records
    copies = fed[12:]
    last = {0: 5, 1: 15}
    for copy in copies:
        last[copy.partition_] += 1
        assert copy.offset_ == last[copy.partition_]  # appended, consecutive
        same = [r for r in records if r.partition_ == copy.partition_ and r.offset_ < 16]
        assert replace(copy, offset_=0) in [replace(r, offset_=0) for r in same]  # a true copy
    assert with_injected_duplicates(records, 0.5, seed=11) == (fed, 6)
    assert with_injected_duplicates(records, 0.0, seed=11) == (records, 0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        with_injected_duplicates(records, 1.5, seed=1)


def read_recording_of(lines: list[dict[str, Any]]) -> list[Record]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return read_recording(write_recording(Path(tmp) / "r.jsonl", lines)).records


def test_redelivered_batches_are_replays_not_second_handlings(known: Path, tmp_path: Path) -> None:
    settings = Settings.load(
        kafka={"bootstrap_servers": "x", "group_id": "g", "topics": [TOPIC]},
        processing={"dead_letter_topic": "dlq", "batch_size": 5},  # several batches
        store={"path": str(tmp_path / "ignored")},
    )
    handler = CountingIds()
    report = replay_recording(
        handler, known, settings=settings, redeliver_batches=True, state_dir=tmp_path / "s"
    )
    assert report.ok, report.to_json()
    assert report.deliveries == 24
    assert report.replays == 12
    assert report.handled == 6
    assert report.handled_ids == {"a", "b", "c", "d", "e", "f"}
    assert max(handler.calls.values()) == 1
    assert not (tmp_path / "ignored").exists()  # the configured store path is never touched


def test_an_id_in_two_partitions_is_reported_as_handled_twice(tmp_path: Path) -> None:
    # Dedupe scope is the partition: a producer that keys one event two ways gets two
    # handlings. The report must say so, and fail.
    path = write_recording(tmp_path / "r.jsonl", [line(0, 0, "x"), line(1, 0, "x")])
    report = replay_recording(CountingIds, path, state_dir=tmp_path / "s")
    assert report.handled_more_than_once == {"x": 2}
    assert report.ids_in_several_partitions == {"x"}
    assert not report.ok
    assert json.loads(report.to_json())["handled_more_than_once"] == {"x": 2}


def test_a_run_cut_short_reports_the_undecided_events_as_lost(known: Path, tmp_path: Path) -> None:
    settings = Settings.load(
        kafka={"bootstrap_servers": "x", "group_id": "g", "topics": [TOPIC]},
        processing={"dead_letter_topic": "dlq"},
        dedupe={"on_missing_id": "fail"},
    )
    report = replay_recording(CountingIds, known, settings=settings, state_dir=tmp_path)
    assert report.error is not None and "MissingEventIdError" in report.error
    assert not report.ok
    # partition 0 stops at the ID-less offset 3: it and everything after it is undecided
    assert [(lost.partition, lost.offset) for lost in report.lost if lost.partition == 0] == [
        (0, 3),
        (0, 4),
        (0, 5),
    ]
    assert all("never decided" in lost.reason for lost in report.lost)


def test_on_missing_id_hash_counts_the_hash_as_an_id(known: Path, tmp_path: Path) -> None:
    settings = Settings.load(
        kafka={"bootstrap_servers": "x", "group_id": "g", "topics": [TOPIC]},
        processing={"dead_letter_topic": "dlq"},
        dedupe={"on_missing_id": "hash"},
    )
    report = replay_recording(CountingIds, known, settings=settings, state_dir=tmp_path)
    assert report.ok
    assert report.missing_id == 0
    assert len(report.unique_ids) == 8
    assert report.handled == 7


def test_state_dir_must_be_fresh(known: Path, tmp_path: Path) -> None:
    replay_recording(CountingIds, known, state_dir=tmp_path)
    with pytest.raises(ValueError, match="already holds a store"):
        replay_recording(CountingIds, known, state_dir=tmp_path)


# -- the audit on its own: the failures an engine bug would cause ---------------------------


def _audit_inputs() -> tuple[list[Record], list[str | None]]:
    records = [
        Record(TOPIC, 0, 0, None, b"1"),
        Record(TOPIC, 0, 1, None, b"2"),
        Record(TOPIC, 0, 2, None, b"3"),
        Record(TOPIC, 0, 3, None, b"4"),
        Record(TOPIC, 0, 4, None, b"5"),
    ]
    return records, ["a", "b", None, "c", "d"]


def test_audit_passes_a_clean_run() -> None:
    records, ids = _audit_inputs()
    letters = [
        KeptDeadLetter(
            records[2], DeadLetter(DeadLetterReason.MISSING_ID, None, "MissingId", "", 0)
        )
    ]
    checked = audit(
        records,
        ids,
        {"a": 1, "b": 1, "c": 1, "d": 1},
        letters,
        {TopicPartition(TOPIC, 0): 5},
        lambda tp, found: [True] * len(found),
    )
    assert checked.lost == []
    assert checked.handled_more_than_once == {}
    assert checked.unique_ids == checked.handled_ids == {"a", "b", "c", "d"}
    assert checked.missing_id == 1


def test_audit_detects_double_handling_and_every_kind_of_loss() -> None:
    records, ids = _audit_inputs()
    checked = audit(
        records,
        ids,
        {"a": 2, "c": 1, "zero": 0},  # a twice; b never; d never
        [],  # the ID-less event was not dead-lettered either
        {TopicPartition(TOPIC, 0): 4},  # offset 4 (d) never committed
        lambda tp, found: [event_id != "c" for event_id in found],  # c not in the store
    )
    assert checked.handled_more_than_once == {"a": 2}
    assert checked.handled_ids == {"a", "c"}
    assert [(lost.offset, lost.event_id, lost.reason) for lost in checked.lost] == [
        (1, "b", "neither handled nor dead-lettered"),
        (2, None, "no event ID and not dead-lettered"),
        (3, "c", "no durable decision in the store"),
        (4, "d", "never decided: not below the committed offset"),
    ]
    report = ReplayReport(
        recording="r",
        topic=TOPIC,
        events=5,
        injected=0,
        deliveries=5,
        handled=2,
        duplicates=0,
        replays=0,
        conflicting=0,
        dead_lettered=0,
        missing_id=checked.missing_id,
        unique_ids=checked.unique_ids,
        handled_ids=checked.handled_ids,
        dead_lettered_ids=checked.dead_lettered_ids,
        handled_more_than_once=checked.handled_more_than_once,
        lost=checked.lost,
    )
    assert not report.ok
    as_json = json.loads(report.to_json())
    assert as_json["ok"] is False
    assert as_json["handled_more_than_once"] == {"a": 2}
    assert [lost["offset"] for lost in as_json["lost"]] == [1, 2, 3, 4]


def test_counting_wrapper_keeps_the_handlers_capabilities() -> None:
    class Reconciling(CountingIds):
        def reconcile(self, event: Event) -> bool:
            return True

    plain, reconciling = counting(CountingIds()), counting(Reconciling())
    assert type(plain) is CountingHandler  # engine still refuses on_uncertain=reconcile
    assert type(reconciling) is ReconcilingCountingHandler
    assert plain.parse(b'{"id": "q"}') == Payment(id="q")  # delegates payload parsing
    with pytest.raises(ValueError):
        plain.parse(b"not json")


# -- the pytest fixture --------------------------------------------------------------------


def test_replay_fixture_keeps_state_under_tmp_path(
    replay: ReplayRunner, known: Path, tmp_path: Path
) -> None:
    first = replay(CountingIds, known, inject_duplicates=0.2, seed=1)
    second = replay(CountingIds, str(known), redeliver_batches=True)
    assert first.handled_ids == first.unique_ids - {"bad-1"}
    assert second.ok and second.replays == 12
    assert (tmp_path / "replay-0" / "state").is_dir()
    assert (tmp_path / "replay-1" / "state").is_dir()


def test_replay_fixture_finds_a_relative_recording_beside_the_test(
    replay: ReplayRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # not where the recording is
    report = replay(CountingIds, "../../examples/replay_test/payments.jsonl")
    assert report.events == 50


# -- the command line ----------------------------------------------------------------------

HANDLER = f"{__name__}:CountingIds"


def test_cli_json_report_and_exit_0(known: Path) -> None:
    result = CliRunner().invoke(
        app, ["replay", str(known), "--handler", HANDLER, "--json", "--inject-duplicates", "0.25"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert (report["events"], report["injected"], report["handled"]) == (15, 3, 6)
    assert report["unique_ids"] == 7


def test_cli_text_report(known: Path) -> None:
    result = CliRunner().invoke(app, ["replay", str(known), "--handler", HANDLER])
    assert result.exit_code == 0, result.output
    assert "OK" in result.stdout
    assert "handled" in result.stdout


def test_cli_exit_1_when_an_id_is_handled_twice(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "r.jsonl", [line(0, 0, "x"), line(1, 0, "x")])
    result = CliRunner().invoke(app, ["replay", str(path), "--handler", HANDLER])
    assert result.exit_code == 1
    assert "handled 2x: x (in several partitions)" in result.stdout
    assert "FAILED" in result.stdout


def test_cli_malformed_recording_exit_2_with_line_number(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "r.jsonl", [line(0, 0, "x")])
    path.write_text(path.read_text() + '{"topic": "payments", "partition": 0}\n')
    result = CliRunner().invoke(app, ["replay", str(path), "--handler", HANDLER])
    assert result.exit_code == 2
    assert "line 3" in result.stderr and '"offset" must be' in result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "exactly one of --handler"),
        (["--handler", HANDLER, "--to-topic", "t"], "exactly one of --handler"),
        (["--to-topic", "t"], "needs --bootstrap-servers"),
        (["--to-topic", "t", "-b", "x:1", "--json"], "--json only apply with --handler"),
        (["--handler", HANDLER, "-b", "x:1"], "only apply with --to-topic"),
        (["--handler", "nope.module:Handler"], "cannot import"),
    ],
)
def test_cli_usage_errors_exit_2(known: Path, args: list[str], says: str) -> None:
    result = CliRunner().invoke(app, ["replay", str(known), *args])
    assert result.exit_code == 2
    assert says in result.stderr


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_cli_uses_the_config_file(known: Path, tmp_path: Path, fmt: str) -> None:
    config = tmp_path / "consumer.toml"
    config.write_text(
        "[kafka]\nbootstrap_servers = 'x:1'\ngroup_id = 'g'\ntopics = ['payments']\n"
        "[dedupe]\non_missing_id = 'hash'\n"
        f"[store]\npath = '{tmp_path / 'never'}'\n"
        "[processing]\ndead_letter_topic = 'dlq'\n"
        f"[observability]\nlog_level = 'info'\nlog_format = '{fmt}'\n"
    )
    try:
        result = CliRunner().invoke(
            app, ["replay", str(known), "--handler", HANDLER, "--config", str(config), "--json"]
        )
    finally:
        structlog.reset_defaults()
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["missing_id"] == 0  # on_missing_id = 'hash' applied
    assert not (tmp_path / "never").exists()
    logged = [line for line in result.stderr.splitlines() if line.strip()]
    assert any("partitions_assigned" in line for line in logged), result.stderr
    if fmt == "json":
        assert all(json.loads(line)["event"] for line in logged)


def test_installed_command_runs_the_example(tmp_path: Path) -> None:
    root = HERE.parent.parent
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dedupe_consumer",
            "replay",
            "examples/replay_test/payments.jsonl",
            "--handler",
            "examples.replay_test.payments_handler:ChargeHandler",
            "--redeliver-batches",
            "--json",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert (report["events"], report["unique_ids"], report["handled"]) == (50, 42, 42)


def headerless(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same events without the event-id header: the default id_source finds nothing."""
    return [{**x, "headers": [["source", "test"]]} for x in lines]


def test_a_replay_that_handled_nothing_fails_and_says_why(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "r.jsonl", headerless(KNOWN))
    report = replay_recording(CountingIds, path, state_dir=tmp_path / "s")
    # the old pass condition held: nothing was handled twice, nothing lost, both sets empty
    assert report.handled_ids == report.unique_ids == set()
    assert report.lost == [] and report.handled_more_than_once == {}
    assert not report.ok
    assert report.tested_nothing is not None
    assert "no event was handled: 12 of 12 were dead-lettered" in report.tested_nothing
    assert "dedupe.id_source" in report.tested_nothing
    assert report.to_dict()["tested_nothing"] == report.tested_nothing

    fixed = Settings.load(
        kafka={"bootstrap_servers": "x", "group_id": "g", "topics": [TOPIC]},
        processing={"dead_letter_topic": "dlq"},
        store={"path": str(tmp_path / "ignored")},
        dedupe={"id_source": "json:/id"},
    )
    good = replay_recording(CountingIds, path, settings=fixed, state_dir=tmp_path / "s2")
    assert good.ok, good.to_json()
    assert good.handled == 7  # the event without a header has id "none" in its JSON


def test_a_replay_that_dead_lettered_most_events_fails_unless_allowed(tmp_path: Path) -> None:
    lines = [line(0, n, f"bad-{n}") for n in range(7)] + [
        line(0, 7 + n, f"ok-{n}") for n in range(3)
    ]
    path = write_recording(tmp_path / "r.jsonl", lines)
    strict = replay_recording(CountingIds, path, state_dir=tmp_path / "s")
    assert (strict.handled, strict.dead_lettered) == (3, 7)
    assert not strict.ok
    assert "7 of 10 events were dead-lettered" in (strict.tested_nothing or "")
    allowed = replay_recording(CountingIds, path, state_dir=tmp_path / "s2", max_dead_lettered=0.8)
    assert allowed.ok, allowed.to_json()


def test_cli_replay_without_config_that_handles_nothing_exits_1(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "r.jsonl", headerless(KNOWN))
    result = CliRunner().invoke(app, ["replay", str(path), "--handler", HANDLER])
    assert result.exit_code == 1, result.output
    assert "OK" not in result.stdout
    assert "tested too little" in result.stdout
    assert "FAILED" in result.stdout
    as_json = CliRunner().invoke(app, ["replay", str(path), "--handler", HANDLER, "--json"])
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["ok"] is False
