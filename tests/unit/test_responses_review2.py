"""Stored responses, second adversarial review (rev15d): each test fails on i15b."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dedupe_consumer import Event, Handler, PermanentError
from dedupe_consumer.errors import DeadLetterError, NotOwnerError
from dedupe_consumer.store import WriteSet

from .changelog_rig import TP0
from .conftest import TOPIC
from .test_responses_review import SlowFirst, Topics, carried_engine, make_engine, request


def outputs(changelog: Topics) -> list[Any]:
    return [o for w in changelog.writes for outs in w.outputs.values() for o in outs]


def correlations(changelog: Topics) -> list[bytes | None]:
    return [dict(o.headers).get("correlation-id") for o in outputs(changelog)]


# -- 1. responses off, yet the request's reply-to header refuses the call -------------------


def test_without_store_responses_a_reply_to_header_does_not_refuse_the_handler(
    tmp_path: Path,
) -> None:
    """Responses are opt-in: no reply setting, store_responses false, return values
    ignored. But _attempts checks the reply-to header whenever a changelog exists
    (`respond and self._sends_replies`, not self._responds): an existing consumer whose
    messages carry a 'reply-to' header (another system's convention, a bridge) naming a
    topic missing in this cluster (or the source topic) has every event refused before
    the handler is called, then dead-lettered output-failed."""

    class Plain(Handler):
        def __init__(self) -> None:
            self.calls = 0

        def handle(self, event: Event) -> None:
            self.calls += 1

    handler = Plain()
    e, store, dead = make_engine(tmp_path, handler, Topics(), processing={"max_retries": 0})
    try:
        result = e.process(
            [
                request(0, "p-1", "c0", reply_to="missing-elsewhere"),
                request(1, "p-2", "c1", reply_to=TOPIC),
            ]
        )
    finally:
        e.close()
        store.close()
    assert handler.calls == 2, [d.letter.reason for d in dead.letters]
    assert result.stats.handled == 2


# -- 2. a lost dead letter keeps the replies of duplicates above it ------------------------


class LosesLetterAt:
    """Accepts sends; the first flush after a letter for ``offset`` loses it."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.armed = False
        self.lost = False

    def send(self, message: Any, letter: Any) -> None:
        if message.offset() == self.offset and not self.lost:
            self.armed = True

    def flush(self) -> None:
        if self.armed:
            self.armed, self.lost = False, True
            raise DeadLetterError("lost", ((TOPIC, 0, self.offset),))


class AnswersRefusesBad(Handler):
    def handle(self, event: Event) -> object:
        if event.id.startswith("bad"):
            raise PermanentError("no")
        return f"answer:{event.id}"


def test_a_lost_letter_keeps_a_later_duplicates_reply_that_is_sent_again(tmp_path: Path) -> None:
    """'x' handled and committed (reply c0). Next batch: offset 1 'bad' (permanent error:
    its letter is lost at flush), offset 2 a duplicate of 'x' (reply c2). _cut_before
    keeps every decision after the lost letter but stops the watermark at 0: the
    duplicate's reply stays in the committed transaction while its offset does not.
    After the restart offsets 1-2 are read again and the duplicate (first_offset 0)
    is answered again: two replies to c2."""
    changelog = Topics()
    handler = AnswersRefusesBad()
    sections: dict[str, Any] = {"processing": {"reply_on_duplicate": True}}
    e, store, _ = make_engine(tmp_path, handler, changelog, **sections)
    e.dead_letters = LosesLetterAt(1)
    try:
        e.process([request(0, "x", "c0", key=b"x")])
        e.process([request(1, "bad", "c1", key=b"b"), request(2, "x", "c2", key=b"x2")])
    finally:
        e.close()
        store.close()
    assert store_watermark_after(tmp_path) == 0
    e, store, _ = make_engine(tmp_path, handler, changelog, **sections)  # the restart
    try:
        e.process([request(1, "bad", "c1", key=b"b"), request(2, "x", "c2", key=b"x2")])
    finally:
        e.close()
        store.close()
    assert correlations(changelog).count(b"c2") == 1, correlations(changelog)


def store_watermark_after(tmp_path: Path) -> int | None:
    from dedupe_consumer.store import RocksStore

    s = RocksStore(_store_path(tmp_path), retention_ms=10**9)
    try:
        return s.watermark(TP0)
    finally:
        s.close()


def _store_path(tmp_path: Path) -> str:
    from .conftest import make_settings

    return str(make_settings(tmp_path / "s").store.path)


# -- 3. a rewind (fenced write) leaves waiting duplicates above it: answered twice ----------


class FenceFirstWatermark(Topics):
    def __init__(self) -> None:
        super().__init__()
        self.fenced = False

    def before_write(self, write: WriteSet) -> None:
        if write.watermarks and not self.fenced:
            self.fenced = True
            raise NotOwnerError("ILLEGAL_GENERATION")


def test_a_fenced_write_rewinds_below_a_waiting_duplicate_which_is_answered_twice(
    tmp_path: Path,
) -> None:
    """Offset 0 'a' (handled), 1 'slow-1' (carried through its backoff), 2 a duplicate
    of slow-1 (c2, waits in _unanswered). The batch's write is fenced: _rewound seeks
    back to 0 and lowers _covered to -1, but leaves the duplicate waiting (unlike
    _give_back). slow-1 completes; the next drain answers the duplicate in a write
    whose watermark is capped by _covered (-1): the reply c2 is produced, offset 2 is
    not covered. Offsets 0-2 are read again (the rewind): 2 is no longer waiting, is
    classified a duplicate of offset 1 and answered again."""
    handler = SlowFirst()
    changelog = FenceFirstWatermark()
    e, store, _ = carried_engine(tmp_path, handler, changelog, "300ms")
    batch = [
        request(0, "a", "c0", key=b"a"),
        request(1, "slow-1", "c1", key=b"s"),
        request(2, "slow-1", "c2", key=b"d"),
    ]
    try:
        e.pipeline(batch)
        fenced = e.drain()  # the write is fenced: read again from 0
        assert fenced.rewind.get(TP0) == 0
        time.sleep(0.8)  # slow-1's second attempt succeeds
        e.drain()  # an idle poll while the consumer seeks back
        e.process(batch)  # the re-read
    finally:
        e.close()
        store.close()
    assert correlations(changelog).count(b"c2") == 1, correlations(changelog)


# -- 4. a waiting duplicate's reply is overtaken by a later request's (same key) ----------


# -- 5. waiting duplicates are not bounded by processing.max_unpersisted --------------------


def test_waiting_duplicates_are_bounded_by_max_unpersisted(tmp_path: Path) -> None:
    """A carried lane in a long backoff (a slow downstream: exactly when clients retry)
    and a stream of duplicates above it: each waits in Engine._unanswered, with its
    message, for as long as the backoff lasts. Carried events count against
    processing.max_unpersisted (_held_open); waiting duplicates do not: memory grows
    without bound."""
    handler = SlowFirst()
    changelog = Topics()
    e, store, _ = make_engine(
        tmp_path,
        handler,
        changelog,
        processing={
            "concurrency": 4,
            "reply_on_duplicate": True,
            "retry_backoff": "2s",
            "retry_backoff_max": "2s",
            "max_unpersisted": 5,
        },
    )
    peak = 0
    try:
        e.pipeline([request(0, "slow-1", "c0", key=b"s")])
        for offset in range(1, 41):
            e.pipeline([request(offset, "slow-1", f"c{offset}", key=b"k%d" % offset)])
            peak = max(peak, len(e._unanswered.get(TP0, [])))
        e.drain(final=True)
    finally:
        e.close()
        store.close()
    assert peak <= 5, f"{peak} duplicates waited in memory for max_unpersisted = 5"


# -- 6. reconcile returning an empty response is taken for "it did not happen" ---------------


def test_reconcile_returning_an_empty_response_does_not_call_handle_again(tmp_path: Path) -> None:
    """reconcile may return the response (anything but a bool). A handler whose answer
    is empty (b"", a 204) reconciles to b"": _resolve_uncertain tests `if called.result`
    and, b"" being falsy, calls handle() again: the payment is charged twice."""
    import contextlib

    from .test_responses_review import Crash

    class EmptyAnswer(Handler):
        def __init__(self) -> None:
            self.crash = True
            self.calls = 0

        def handle(self, event: Event) -> object:
            self.calls += 1
            if self.crash:
                raise Crash
            return b""

        def reconcile(self, event: Event) -> object:
            return b""  # it happened; its answer was empty

    handler = EmptyAnswer()
    changelog = Topics()
    sections: dict[str, Any] = {
        "processing": {"mode": "claim", "on_uncertain": "reconcile", "claim_lease": "1ms"},
        "dedupe": {"store_responses": True},
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
        e.process([request(0, "pay-1", "c0")])
    finally:
        e.close()
        store.close()
    assert handler.calls == 1, f"handle() ran {handler.calls} times; reconcile said it happened"
