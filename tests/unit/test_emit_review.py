"""Review of issue 15 (``event.emit``): failing tests for the defects found (no broker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dedupe_consumer import Event, Handler
from dedupe_consumer.effects import Effects
from dedupe_consumer.replay import replay_recording

from .changelog_rig import TP0, RecordingChangelog, changelog_engine
from .conftest import rec

ROOT = Path(__file__).resolve().parents[2]


class EmitEach(Handler):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def handle(self, event: Event) -> None:
        self.calls.append(event.id)
        event.emit("out", f"done:{event.id}", key=event.id)


def recording(path: Path, ids: list[str]) -> Path:
    head = {
        "format": "dedupe-consumer-recording",
        "version": 1,
        "topic": "payments",
        "partitions": 1,
        "recorded_at": "2024-06-01T00:00:00Z",
    }
    lines = [
        {
            "topic": "payments",
            "partition": 0,
            "offset": n,
            "timestamp": 1_717_200_000_000 + n,
            "key": i,
            "value": json.dumps({"id": i}),
            "headers": [["event-id", i]],
        }
        for n, i in enumerate(ids)
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in [head, *lines]))
    return path


def test_a_replay_of_an_emitting_handler_handles_its_events(tmp_path: Path) -> None:
    """The replay harness has no changelog, so every emit raises RuntimeError
    (store.changelog = true): each event is retried, then dead-lettered, and the
    report fails as having tested nothing -- a production handler that emits cannot
    be replayed at all. The replay should keep outputs in memory (like its dead
    letters) and report them."""
    path = recording(tmp_path / "r.jsonl", ["a", "b", "c"])
    report = replay_recording(EmitEach, path, state_dir=tmp_path / "s")
    assert report.dead_letter_reasons == {}, report.dead_letter_reasons
    assert report.handled == 3 and report.ok


def test_a_header_name_given_as_bytes_is_refused_or_kept_not_mangled() -> None:
    """Effects.emit turns each header name into str(name): b"trace" becomes the
    header "b'trace'" silently (confluent-kafka itself refuses a bytes name)."""
    effects = Effects(lambda _k: None, {}, 10_000, topic_limit=lambda _t: 0)
    try:
        effects.emit("out", b"v", headers=[(b"trace", b"1")])  # type: ignore[list-item]
    except (TypeError, ValueError):
        return  # refused: fine
    assert effects.outputs[0].headers == (("trace", b"1"),)


class ExistingTopics(RecordingChangelog):
    def output_limit(self, topic: str, *, create: bool = False) -> int | None:
        return 0


class Crash(BaseException):
    """The process dies after the handler emitted, before the batch persists."""


class EmitThenCrash(Handler):
    def __init__(self) -> None:
        self.crash = True

    def handle(self, event: Event) -> None:
        event.emit("out", f"done:{event.id}")
        if self.crash:
            raise Crash

    def reconcile(self, event: Event) -> bool:
        # "The effect happened": its output did not (it is transactional), so a
        # reconcile emits again what handle would have (docs/handlers.md).
        event.emit("out", f"done:{event.id}")
        return True


@pytest.mark.parametrize(("policy", "emitted"), [("skip", []), ("reconcile", [b"done:a"])])
def test_an_uncertain_event_gets_its_output_only_from_a_call_that_emits_it(
    tmp_path: Path, policy: str, emitted: list[bytes]
) -> None:
    """Claim mode: the handler emitted, the process died before the changelog
    transaction, so the output was certainly not produced. A reconcile that emits
    again gets it produced with the decision; on_uncertain = "skip" records the event
    handled without calling anything, so without its output (documented)."""
    handler = EmitThenCrash()
    changelog = ExistingTopics()
    processing: dict[str, Any] = {"mode": "claim", "on_uncertain": policy, "claim_lease": "0s"}
    engine, store = changelog_engine(tmp_path, handler, changelog, processing=processing)
    with pytest.raises(Crash):
        engine.process([rec(0, "a")])
    engine.close()
    store.close()
    handler.crash = False
    engine, store = changelog_engine(tmp_path, handler, changelog, processing=processing)
    try:
        result = engine.process([rec(0, "a")])
        assert result.stats.handled == 1
        outputs = [o for w in changelog.writes for o in w.outputs.get(TP0, [])]
        assert [o.value for o in outputs] == emitted
    finally:
        engine.close()
        store.close()


def test_the_docs_say_an_output_needs_a_read_committed_reader() -> None:
    """Only Event.emit's docstring mentions isolation.level = read_committed; no page
    of docs/ or the README describes event.emit at all (a default read_uncommitted
    reader sees the outputs of aborted transactions: duplicates and outputs of events
    that were then dead-lettered)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    text = {p: p.read_text() for p in pages}
    about_emit = [p for p, t in text.items() if "emit(" in t]
    assert about_emit, "no documentation page describes event.emit"
    assert any("read_committed" in text[p] for p in about_emit)
