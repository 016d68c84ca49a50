"""Stored responses (issue 15), found by an adversarial review: each test fails on i15b."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from dedupe_consumer import Event, Handler, Response
from dedupe_consumer.dead_letters import MemoryDeadLetters
from dedupe_consumer.engine import Engine
from dedupe_consumer.replay import Record
from dedupe_consumer.store import RocksStore

from .changelog_rig import TP0, RecordingChangelog
from .conftest import TOPIC, Clock, Rig, make_settings


class Topics(RecordingChangelog):
    def output_limit(self, topic: str, *, create: bool = False) -> int | None:
        return None if topic.startswith("missing") else 0


def request(
    offset: int,
    event_id: str,
    correlation: str,
    reply_to: str | None = "replies",
    key: bytes | None = None,
) -> Record:
    headers: list[tuple[str, str | bytes | None]] = [
        ("event-id", event_id.encode()),
        ("correlation-id", correlation.encode()),
    ]
    if reply_to is not None:
        headers.append(("reply-to", reply_to.encode()))
    return Record(
        TOPIC,
        0,
        offset,
        key if key is not None else event_id.encode(),
        b"{}",
        headers,
        1_700_000_000_000,
    )


def make_engine(
    tmp_path: Path,
    handler: Handler,
    changelog: RecordingChangelog | None,
    **sections: dict[str, Any],
) -> tuple[Engine, RocksStore, MemoryDeadLetters]:
    settings = make_settings(tmp_path / "s", **sections)
    store = RocksStore(settings.store.path, retention_ms=10**9)
    dead = MemoryDeadLetters()
    e = Engine(
        handler,
        settings.dedupe,
        settings.processing,
        store,
        dead,
        sweep_keys=settings.store.sweep_keys,
        revoked_state_grace=settings.store.revoked_state_grace,
        max_record_bytes=settings.kafka.max_message_bytes,
        clock=Clock(),
        changelog=changelog,
    )
    e.assign([TP0])
    return e, store, dead


def replies(changelog: RecordingChangelog) -> list[tuple[str, bytes | None, tuple[Any, ...]]]:
    return [
        (o.topic, o.value, o.headers)
        for w in changelog.writes
        for outputs in w.outputs.values()
        for o in outputs
    ]


# -- 1. a reply that cannot be produced re-runs a handler that already succeeded ----------


class EmitsThenAnswers(Handler):
    """A payment handler: charges (counted), emits one audit message, answers."""

    def __init__(self, answer: object = b"charged") -> None:
        self.charges = 0
        self.answer = answer

    def handle(self, event: Event) -> object:
        self.charges += 1  # the external effect happened
        event.emit("audit", b"charged")
        return self.answer


def test_a_reply_over_max_outputs_charges_again_on_every_retry(tmp_path: Path) -> None:
    """max_outputs_per_event = 1 and the handler emits one message: the reply is the
    second output. handle() returned normally (the effect happened), then send_reply
    raises OutputError inside the same try as the call: the attempt "fails" and
    handle() is called again max_retries times, each charging once more."""
    handler = EmitsThenAnswers()
    changelog = Topics()
    e, store, _dead = make_engine(
        tmp_path,
        handler,
        changelog,
        dedupe={"store_responses": True},
        processing={"max_outputs_per_event": 1, "max_retries": 3},
    )
    try:
        e.process([request(0, "pay-1", "c0")])
    finally:
        e.close()
        store.close()
    assert handler.charges == 1, f"handle() succeeded {handler.charges} times for one event"


def test_a_handler_chosen_reply_topic_that_is_missing_charges_again(tmp_path: Path) -> None:
    """Response(topic=...) (or the sidecar's Kafka-Reply-Topic) names a topic that does
    not exist: it is only checked after the call, and the failure retries the call."""

    class Answers(Handler):
        def __init__(self) -> None:
            self.charges = 0

        def handle(self, event: Event) -> object:
            self.charges += 1
            return Response(b"ok", topic="missing-replies")

    handler = Answers()
    e, store, _dead = make_engine(
        tmp_path, handler, Topics(), dedupe={"store_responses": True}, processing={"max_retries": 3}
    )
    try:
        e.process([request(0, "pay-1", "c0", reply_to=None)])
    finally:
        e.close()
        store.close()
    assert handler.charges == 1, f"handle() succeeded {handler.charges} times for one event"


def test_without_a_changelog_a_reply_to_header_reruns_a_handler_that_returns(
    tmp_path: Path,
) -> None:
    """store.changelog = false (allowed: the validator only looks at reply_topic and
    reply_on_duplicate). A handler returning anything (e.g. an upgrade of a handler
    that always returned its saved row) gets a request carrying a 'reply-to' header:
    check_reply_to passes (no topic_limit), handle() runs, send_reply -> emit raises
    RuntimeError('event.emit needs store.changelog'): retried, handle() runs again
    each time, then the event is dead-lettered although it was handled."""

    class Saves(Handler):
        def __init__(self) -> None:
            self.saves = 0

        def handle(self, event: Event) -> object:
            self.saves += 1
            return "row-42"

    handler = Saves()
    r = Rig(tmp_path, handler, dedupe={"store_responses": True}, processing={"max_retries": 2})
    try:
        result = r.engine.process([request(0, "pay-1", "c0")])
    finally:
        r.close()
    assert handler.saves == 1, f"handle() succeeded {handler.saves} times for one event"
    assert result.stats.handled == 1 and r.dead.letters == []


# -- 2. a return value that used to be ignored now dead-letters ---------------------------


def test_a_return_value_nobody_asked_to_store_dead_letters_a_handled_event(
    tmp_path: Path,
) -> None:
    """Before issue 15 handle()'s return value was ignored. A handler returning its
    saved document (a 2 KiB str) with no reply configured anywhere: the effect
    happened, but the event is now dead-lettered 'response-too-large' (and with a
    smaller value every ID record grows by it)."""

    class ReturnsDocument(Handler):
        def __init__(self) -> None:
            self.saved = 0

        def handle(self, event: Event) -> object:
            self.saved += 1
            return "x" * 2048

    handler = ReturnsDocument()
    r = Rig(tmp_path, handler)
    try:
        result = r.engine.process([request(0, "pay-1", "c0", reply_to=None)])
    finally:
        r.close()
    assert handler.saved == 1
    assert result.stats.handled == 1, [d.letter.reason for d in r.dead.letters]


# -- 3. duplicates near a carried lane ----------------------------------------------------


class SlowFirst(Handler):
    """Answers every request; the first attempt of 'slow' events fails (its lane is
    carried through a backoff)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.seen: list[tuple[str, Response | None]] = []
        self.lock = threading.Lock()

    def handle(self, event: Event) -> object:
        with self.lock:
            self.calls[event.id] = self.calls.get(event.id, 0) + 1
        if event.id.startswith("slow") and event.attempt == 1:
            raise RuntimeError("503")
        return f"answer:{event.id}"

    def on_duplicate(self, event: Event, stored: Response | None) -> None:
        self.seen.append((event.id, stored))


def carried_engine(
    tmp_path: Path, handler: Handler, changelog: RecordingChangelog, backoff: str
) -> tuple[Engine, RocksStore, MemoryDeadLetters]:
    return make_engine(
        tmp_path,
        handler,
        changelog,
        processing={
            "concurrency": 4,
            "reply_on_duplicate": True,
            "retry_backoff": backoff,
            "retry_backoff_max": backoff,
        },
    )


def test_a_duplicate_of_an_event_still_retrying_in_a_carried_lane_gets_no_reply(
    tmp_path: Path,
) -> None:
    """'slow-1' (correlation c0) fails its first attempt and is carried; its client
    retries (same ID, new correlation c1, another key so another lane). The copy is
    classified DUPLICATE against the held item, _answer_duplicate finds it undecided
    and sends nothing; its offset is committed once slow-1 succeeds. c1 never gets
    a reply although reply_on_duplicate = true promises one per duplicate."""
    handler = SlowFirst()
    changelog = Topics()
    e, store, _ = carried_engine(tmp_path, handler, changelog, "300ms")
    try:
        e.pipeline([request(0, "slow-1", "c0", key=b"k0")])
        e.pipeline([request(1, "slow-1", "c1", key=b"k1")])  # while slow-1 is in backoff
        result = e.drain(final=True)
        assert result.commits.get(TP0, 0) == 2 or store.watermark(TP0) == 1
    finally:
        e.close()
        store.close()
    assert handler.calls["slow-1"] == 2
    correlations = [dict(h).get("correlation-id") for _, _, h in replies(changelog)]
    assert sorted(c for c in correlations if c) == [b"c0", b"c1"], correlations


def test_a_duplicates_reply_is_not_produced_in_a_transaction_that_commits_its_offset(
    tmp_path: Path,
) -> None:
    """'x' was handled and committed. Then: offset 1 'slow-1' (carried through its
    backoff), offset 2 a duplicate of 'x' (correlation c2). The duplicate is settled
    and its reply produced in batch 2's transaction, but the watermark (and the
    committed offset) stays before the held offset 1. The partition is revoked while
    slow-1 waits; the new owner reads offsets 1 and 2 again and the duplicate at
    offset 2 is answered a second time: two replies to one duplicate delivery."""
    handler = SlowFirst()
    changelog = Topics()
    e, store, _ = carried_engine(tmp_path, handler, changelog, "3s")
    try:
        e.process([request(0, "x", "c0", key=b"x")])
        e.pipeline([request(1, "slow-1", "c1", key=b"slow"), request(2, "x", "c2", key=b"x2")])
        commits = e.release([TP0])  # revoked while slow-1 waits out its backoff
        assert all(o <= 1 for o in commits.values())
        e.assign([TP0])  # ours again (or another owner's: same changelog, same store)
        e.process([request(1, "slow-1", "c1", key=b"slow"), request(2, "x", "c2", key=b"x2")])
    finally:
        e.close()
        store.close()
    correlations = [dict(h).get("correlation-id") for _, _, h in replies(changelog)]
    assert correlations.count(b"c2") == 1, correlations


# -- 4. claim mode: an uncertain event resolved without the handler has no response -----


class Crash(BaseException):
    pass


class CrashAfterAnswer(Handler):
    def __init__(self) -> None:
        self.crash = True
        self.calls = 0

    def handle(self, event: Event) -> object:
        self.calls += 1
        if self.crash:
            raise Crash  # stands in for a kill after the effect, before the write
        return "answer"

    def reconcile(self, event: Event) -> object:
        return "answer"  # it happened, and this was the answer


def test_claim_reconcile_records_the_event_without_its_response(tmp_path: Path) -> None:
    """Claim mode, on_uncertain = 'reconcile': the process dies after handle()
    returned, before the write; the requester got no reply (the reply goes with the
    transaction). On restart reconcile() says it happened: the event is recorded
    HANDLED with response None, no reply is sent, and every later duplicate gets
    on_duplicate(None) and no reply either: the request is never answered. Either
    reconcile must be able to return the response, or the engine must not resolve a
    request that expects a reply without one (retry/dead-letter)."""
    handler = CrashAfterAnswer()
    changelog = Topics()
    sections: dict[str, Any] = {
        "processing": {
            "mode": "claim",
            "on_uncertain": "reconcile",
            "reply_on_duplicate": True,
            "claim_lease": "1ms",
        }
    }
    e, store, _ = make_engine(tmp_path, handler, changelog, **sections)
    try:
        with contextlib.suppress(Crash):
            e.process([request(0, "pay-1", "c0")])
    finally:
        e.close()
        store.close()
    handler.crash = False
    time.sleep(0.01)
    e, store, _ = make_engine(tmp_path, handler, changelog, **sections)
    try:
        result = e.process([request(0, "pay-1", "c0"), request(1, "pay-1", "c1")])
    finally:
        e.close()
        store.close()
    assert handler.calls == 1 and result.stats.uncertain == 1  # reconciled, not called
    correlations = [dict(h).get("correlation-id") for _, _, h in replies(changelog)]
    assert correlations, "the request and its duplicate were never answered"


# -- 5. reply-to naming a topic this consumer reads ---------------------------------------


def test_a_reply_to_header_naming_a_source_topic_is_refused(tmp_path: Path) -> None:
    """processing.reply_topic naming a source topic is refused by the validator
    ('replies would be consumed again'), but a request's reply-to header may name it:
    the reply is produced into the topic being consumed and comes back as a request
    (without an event-id header: dead-lettered; with id_source = 'hash': handled)."""

    class Answers(Handler):
        def handle(self, event: Event) -> object:
            return b"ok"

    changelog = Topics()
    e, store, _dead = make_engine(
        tmp_path,
        Answers(),
        changelog,
        dedupe={"store_responses": True},
        processing={"max_retries": 0},
    )
    try:
        e.process([request(0, "r-1", "c0", reply_to=TOPIC)])
    finally:
        e.close()
        store.close()
    assert [o for o in replies(changelog) if o[0] == TOPIC] == [], "a reply into the source topic"


# -- 6. the same event read again after a rewind is taken for its own duplicate ----------


def test_an_event_read_again_after_a_rewind_is_not_answered_twice(tmp_path: Path) -> None:
    """'slow-1' (offset 0) is carried through its backoff; 'a' (offset 1, another key)
    is handled, answered (c1) and its record made durable above the gap, the
    watermark held before offset 0. The partition is revoked while slow-1 waits and
    read again from offset 0 (a restart after a kill does the same). _classify finds
    a's durable record with record.offset == item.offset but not 'unpersisted', so
    it calls _on_seen: the event is taken for a DUPLICATE of itself, on_duplicate is
    called for a request that was never duplicated, and reply_on_duplicate sends its
    reply a second time (two replies to c1)."""
    handler = SlowFirst()
    changelog = Topics()
    e, store, _ = carried_engine(tmp_path, handler, changelog, "3s")
    batch = [request(0, "slow-1", "c0", key=b"slow"), request(1, "a", "c1", key=b"a")]
    try:
        e.pipeline(batch)
        e.drain()  # a's record and reply are durable; slow-1 waits out its backoff
        e.release([TP0])
        e.assign([TP0])
        e.process(batch)
    finally:
        e.close()
        store.close()
    assert handler.calls["a"] == 1
    correlations = [dict(h).get("correlation-id") for _, _, h in replies(changelog)]
    assert correlations.count(b"c1") == 1, correlations
    assert handler.seen == [], f"on_duplicate for a redelivery: {handler.seen}"


# -- 7. a response the setting allows but the changelog record cannot carry -------------


def test_a_response_is_bounded_by_what_a_changelog_record_can_carry(tmp_path: Path) -> None:
    """The response lives in the ID record, which is the changelog record's value.
    dedupe.max_response_bytes (up to 512 KiB) is never checked against the producers'
    message.max.bytes (here 100 kB; staged effects are refused at stage() time for the
    same reason): a 200 kB answer is accepted and recorded, and the batch's
    changelog transaction is then refused by the producer (MSG_SIZE_TOO_LARGE): the
    batch is redelivered and its handlers called again, for ever. Expected: refused
    at load time, or the event dead-lettered 'response-too-large'."""

    class Big(Handler):
        def handle(self, event: Event) -> object:
            return b"x" * 200_000

    changelog = Topics()
    e, store, _dead = make_engine(
        tmp_path,
        Big(),
        changelog,
        dedupe={"max_response_bytes": 512 * 1024, "store_responses": True},
        kafka={"producer": {"message.max.bytes": 100_000}},
    )
    try:
        e.process([request(0, "r-1", "c0", reply_to=None)])
    finally:
        e.close()
        store.close()
    sizes = [
        len(event_id) + len(record.encode())
        for w in changelog.writes
        for records in w.records.values()
        for event_id, record in records
    ]
    assert max(sizes) < 100_000, f"a changelog record of {max(sizes)} bytes"


def test_a_handler_returning_a_value_without_any_reply_setting_keeps_the_old_format(
    tmp_path: Path,
) -> None:
    """No reply_topic, no reply_on_duplicate, no on_duplicate, no reply-to header: the
    stored response has no reader. Yet a handler that returns something (here its row
    ID, ignored before issue 15) now writes ID records of 25 + 7 + n bytes to RocksDB
    and the changelog. A previous version still in the group (rolling deploy, or a
    rollback) decodes ID records with struct.unpack of exactly 25 bytes and fails on
    every restore of such a partition. Storing should be opt-in (or the record format
    versioned so older readers skip the tail)."""

    class Saves(Handler):
        def handle(self, event: Event) -> object:
            return "row-42"

    changelog = Topics()
    e, store, _ = make_engine(tmp_path, Saves(), changelog)
    try:
        e.process([request(0, "r-1", "c0", reply_to=None)])
    finally:
        e.close()
        store.close()
    sizes = [
        len(record.encode())
        for w in changelog.writes
        for records in w.records.values()
        for _, record in records
    ]
    assert sizes == [25], sizes


def test_a_response_that_cannot_be_encoded_charges_again(tmp_path: Path) -> None:
    """handle() returns text that is not encodable (a lone surrogate from a decoded
    byte string; a pydantic model whose model_dump_json raises is the same): as_response
    raises UnicodeEncodeError, which is neither ResponseRefused nor OutputError, so it
    is taken for a handler failure: handle() runs again on every retry."""

    class Answers(Handler):
        def __init__(self) -> None:
            self.charges = 0

        def handle(self, event: Event) -> object:
            self.charges += 1
            return b"caf\xe9".decode("utf-8", "surrogateescape")

    handler = Answers()
    e, store, _dead = make_engine(
        tmp_path, handler, Topics(), dedupe={"store_responses": True}, processing={"max_retries": 3}
    )
    try:
        e.process([request(0, "pay-1", "c0")])
    finally:
        e.close()
        store.close()
    assert handler.charges == 1, f"handle() succeeded {handler.charges} times for one event"


# -- 8. the replay harness drops what handle() returns ------------------------------------


def test_a_replay_sees_responses_like_production(tmp_path: Path) -> None:
    """replay_recording wraps the handler in CountingHandler, whose handle() returns
    None and which does not forward on_duplicate. A replay of a request/reply
    handler therefore stores no response, never calls on_duplicate and never meets
    'response-too-large': the replay reports all handled where production dead-letters
    every event (here each answer is 2 KiB, over the default 1024)."""
    from dedupe_consumer.replay import replay_recording

    from .test_replay import line, write_recording

    class Answers(Handler):
        def __init__(self) -> None:
            self.duplicates: list[str] = []

        def handle(self, event: Event) -> object:
            return "y" * 2048

        def on_duplicate(self, event: Event, stored: Response | None) -> None:
            self.duplicates.append(event.id)

    handler = Answers()
    path = write_recording(tmp_path / "r.jsonl", [line(0, 0, "a"), line(0, 1, "a")], 1)
    settings = make_settings(tmp_path / "unused", dedupe={"store_responses": True})
    report = replay_recording(handler, path, settings=settings, state_dir=tmp_path / "s")
    assert handler.duplicates == ["a"], "on_duplicate never called in a replay"
    assert report.dead_letter_reasons == {"response-too-large": 1}, report.dead_letter_reasons


def test_a_reply_topic_no_output_may_go_to_is_refused_at_load(tmp_path: Path) -> None:
    """processing.reply_topic is checked against the source and dead-letter topics only.
    A Kafka-internal topic (writes refused by the broker: every batch transaction
    fails, see tests/integration/test_responses_review.py) or one of this library's
    own (.dedupe-changelog, .dedupe-by-id: every answering attempt fails, and
    re-runs the handler) is accepted and only fails at run time."""
    import pytest

    from dedupe_consumer import ConfigError

    for bad in ("__consumer_offsets", "__transaction_state", f"g.{TOPIC}.dedupe-changelog"):
        with pytest.raises(ConfigError):
            make_settings(tmp_path, processing={"reply_topic": bad})
