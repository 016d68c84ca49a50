"""Stored responses without a broker: the record format, what counts as a response, the
engine's replies to duplicates in one batch and across restarts, and the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from dedupe_consumer import ConfigError, Event, Handler, Response
from dedupe_consumer.replay import Record
from dedupe_consumer.responses import ResponseRefused, as_response
from dedupe_consumer.store import IdRecord, RecordStatus

from .changelog_rig import TP0, RecordingChangelog, changelog_engine
from .conftest import TOPIC, make_settings


class Topics(RecordingChangelog):
    def output_limit(self, topic: str, *, create: bool = False) -> int | None:
        return None if topic.startswith("missing") else 0


def request(
    offset: int, event_id: str, correlation: str, reply_to: str | None = "replies"
) -> Record:
    headers: list[tuple[str, str | bytes | None]] = [
        ("event-id", event_id.encode()),
        ("correlation-id", correlation.encode()),
    ]
    if reply_to is not None:
        headers.append(("reply-to", reply_to.encode()))
    return Record(TOPIC, 0, offset, event_id.encode(), b"{}", headers, 1_700_000_000_000)


class Counting(Handler):
    def __init__(self) -> None:
        self.calls = 0
        self.seen: list[tuple[str, Response | None]] = []

    def handle(self, event: Event) -> object:
        self.calls += 1
        return f"{event.id}#{self.calls}"

    def on_duplicate(self, event: Event, stored: Response | None) -> None:
        self.seen.append((event.id, stored))


def test_the_record_keeps_the_response_and_reads_the_old_25_byte_format() -> None:
    plain = IdRecord(RecordStatus.HANDLED, 7, 123, b"d" * 8)
    assert len(plain.encode()) == 25 and IdRecord.decode(plain.encode()) == plain
    for response in (
        Response(b""),
        Response(b"v", "replies", b""),
        Response(b"\x00\xff" * 40, None, b"k"),
    ):
        record = plain._replace(response=response)
        assert IdRecord.decode(record.encode()) == record
    newer = plain.encode() + b"\x02" + bytes(6)
    with pytest.raises(ValueError, match="newer version"):
        IdRecord.decode(newer)


class Answer(BaseModel):
    status: str


@pytest.mark.parametrize(
    ("returned", "stored"),
    [
        (None, None),
        (b"raw", Response(b"raw")),
        (bytearray(b"ba"), Response(b"ba")),
        ("text", Response(b"text")),
        (Answer(status="ok"), Response(b'{"status":"ok"}')),
        (Response("v", "t", "k"), Response(b"v", "t", b"k")),  # type: ignore[arg-type]
        (True, None),  # not a response: not stored (the engine warns once)
        ({"a": 1}, None),
    ],
)
def test_what_counts_as_a_response(returned: object, stored: Response | None) -> None:
    assert as_response(returned, 1024, "dedupe.max_response_bytes") == stored


def test_a_response_is_bounded_by_value_topic_and_key() -> None:
    assert as_response(Response(b"v" * 6, "tt", b"kk"), 10, "x") is not None
    with pytest.raises(ResponseRefused, match="11 bytes"):
        as_response(Response(b"v" * 6, "tt", b"kkk"), 10, "x")
    with pytest.raises(ResponseRefused, match=r"Response\.topic"):
        as_response(Response(b"v", ""), 10, "x")


def test_duplicates_in_one_batch_and_after_a_restart_get_the_first_reply(tmp_path: Path) -> None:
    handler = Counting()
    changelog = Topics()
    processing: dict[str, Any] = {"reply_on_duplicate": True}
    engine, store = changelog_engine(tmp_path, handler, changelog, processing=processing)
    try:
        engine.process([request(0, "a", "c0"), request(1, "a", "c1"), request(2, "b", "c2")])
    finally:
        engine.close()
        store.close()
    engine, store = changelog_engine(tmp_path, handler, changelog, processing=processing)
    try:
        engine.process([request(3, "a", "c3", reply_to="elsewhere"), request(4, "b", "c4", None)])
    finally:
        engine.close()
        store.close()
    assert handler.calls == 2
    outputs = [o for w in changelog.writes for o in w.outputs.get(TP0, [])]
    assert [(o.topic, o.value, o.key, o.headers) for o in outputs] == [
        ("replies", b"a#1", b"a", (("correlation-id", b"c0"),)),
        ("replies", b"a#1", b"a", (("correlation-id", b"c1"),)),
        ("replies", b"b#2", b"b", (("correlation-id", b"c2"),)),
        ("elsewhere", b"a#1", b"a", (("correlation-id", b"c3"),)),  # the duplicate's reply-to
        # c4 names no reply-to and no processing.reply_topic is set: stored, not sent.
    ]
    assert handler.seen == [
        ("a", Response(b"a#1")),
        ("a", Response(b"a#1")),
        ("b", Response(b"b#2")),
    ]


class Failing(Counting):
    def on_duplicate(self, event: Event, stored: Response | None) -> None:
        raise RuntimeError("on_duplicate is broken")


def test_a_failing_on_duplicate_is_logged_and_the_duplicate_skipped(tmp_path: Path) -> None:
    handler = Failing()
    engine, store = changelog_engine(tmp_path, handler, Topics())
    try:
        result = engine.process([request(0, "a", "c0"), request(1, "a", "c1")])
    finally:
        engine.close()
        store.close()
    assert (result.stats.handled, result.stats.duplicates, handler.calls) == (1, 1, 1)


class AsyncOnDuplicate(Handler):
    def handle(self, event: Event) -> None:
        pass

    async def on_duplicate(self, event: Event, stored: Response | None) -> None:  # type: ignore[override]
        pass


def test_an_async_on_duplicate_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="on_duplicate is `async def`"):
        changelog_engine(tmp_path, AsyncOnDuplicate(), Topics())


def test_replies_need_the_changelog_and_a_topic_nobody_reads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"reply_on_duplicate = true need store.changelog"):
        make_settings(tmp_path, store={"changelog": False}, processing={"reply_on_duplicate": True})
    with pytest.raises(ConfigError, match="replies would be consumed again"):
        make_settings(tmp_path, processing={"reply_topic": TOPIC})
