"""The engine driven through the replay source's records: no broker, real RocksDB."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import pytest
from pydantic import BaseModel

from dedupe_consumer import (
    ConfigError,
    Event,
    MissingEventIdError,
    PermanentError,
    RetryableError,
)
from dedupe_consumer.models import TopicPartition

from .conftest import TOPIC, Recorder, Rig, rec

TP0 = TopicPartition(TOPIC, 0)
RigFactory = Callable[..., Rig]


def test_each_id_handled_once_within_and_across_batches(rig: RigFactory) -> None:
    r = rig()
    first = r.engine.process([rec(0, "a"), rec(1, "b"), rec(2, "a")])
    second = r.engine.process([rec(3, "b"), rec(4, "c"), rec(5, "a")])
    assert r.handler.ids == ["a", "b", "c"]  # type: ignore[attr-defined]
    assert (first.stats.handled, first.stats.duplicates) == (2, 1)
    assert (second.stats.handled, second.stats.duplicates) == (1, 2)
    assert second.commits == {TP0: 6}


def test_duplicates_suppressed_across_restart(rig: RigFactory) -> None:
    r = rig()
    r.engine.process([rec(0, "a"), rec(1, "b")])
    engine = r.restart()
    result = engine.process([rec(2, "a"), rec(3, "c")])
    assert r.handler.ids == ["a", "b", "c"]  # type: ignore[attr-defined]
    assert result.stats.duplicates == 1


def test_redelivered_offsets_at_or_below_watermark_are_replays(rig: RigFactory) -> None:
    r = rig()
    r.engine.process([rec(0, "a"), rec(1, "b"), rec(2, "c")])
    engine = r.restart()
    assert engine.assign([TP0]) == {TP0: 3}  # resume after the durable watermark
    result = engine.process([rec(1, "b"), rec(2, "c"), rec(3, "d")])
    assert result.stats.replays == 2
    assert result.stats.duplicates == 0  # skipped before any ID lookup
    assert r.handler.ids == ["a", "b", "c", "d"]  # type: ignore[attr-defined]


def test_every_offset_ends_as_exactly_one_decision(rig: RigFactory) -> None:
    r = rig(dedupe={"on_conflict": "skip"})
    r.engine.process([rec(0, "a")])
    msgs = [rec(0, "a"), rec(1, "a"), rec(2, None), rec(3, "b"), rec(4, "b", body={"x": 1})]
    s = r.engine.process(msgs).stats
    assert s.consumed == len(msgs)
    assert s.handled + s.duplicates + s.conflicts + s.replays + s.dead_lettered == s.consumed
    assert (s.replays, s.duplicates, s.dead_lettered, s.handled, s.conflicts) == (1, 1, 1, 1, 1)


def test_a_dead_lettered_conflict_is_counted_once_as_a_dead_letter(rig: RigFactory) -> None:
    r = rig()  # on_conflict = "dead-letter" is the default
    r.engine.process([rec(0, "a", body={"amount": 1})])
    s = r.engine.process([rec(1, "a", body={"amount": 2})]).stats
    assert (s.consumed, s.dead_lettered, s.conflicts) == (1, 1, 0)
    assert s.by_reason == {"conflicting-duplicate": 1}
    [letter] = r.dead.letters
    assert letter.letter.reason == "conflicting-duplicate"


def test_conflicting_duplicate_is_counted_and_skipped(rig: RigFactory) -> None:
    r = rig(dedupe={"on_conflict": "skip"})
    r.engine.process([rec(0, "a", body={"amount": 1})])
    result = r.engine.process([rec(1, "a", body={"amount": 2})])
    assert result.stats.conflicts == 1
    assert r.handler.ids == ["a"]  # type: ignore[attr-defined]
    assert r.dead.letters == []


def test_conflicting_duplicate_can_be_dead_lettered(rig: RigFactory) -> None:
    r = rig(dedupe={"on_conflict": "dead-letter"})
    r.engine.process([rec(0, "a", body={"amount": 1}), rec(1, "a", body={"amount": 2})])
    [letter] = r.dead.letters
    assert letter.letter.reason == "conflicting-duplicate"
    assert "offset 0" in letter.letter.error_message
    assert letter.message.offset() == 1


def test_missing_id_goes_to_dead_letters_with_reason(rig: RigFactory) -> None:
    r = rig()
    result = r.engine.process([rec(0, None), rec(1, "b")])
    [letter] = r.dead.letters
    assert letter.letter.reason == "missing-id"
    assert "header 'event-id' is absent" in letter.letter.error_message
    assert result.stats.dead_lettered == 1
    assert r.handler.ids == ["b"]  # type: ignore[attr-defined]
    assert result.commits == {TP0: 2}


def test_missing_id_policy_hash_uses_payload_hash(rig: RigFactory) -> None:
    r = rig(dedupe={"on_missing_id": "hash"})
    r.engine.process(
        [rec(0, None, value=b"same"), rec(1, None, value=b"same"), rec(2, None, value=b"other")]
    )
    assert len(r.handler.ids) == 2  # type: ignore[attr-defined]
    assert r.dead.letters == []


def test_missing_id_policy_fail_persists_the_prefix_then_raises(rig: RigFactory) -> None:
    r = rig(dedupe={"on_missing_id": "fail"})
    result = r.engine.process([rec(0, "a"), rec(1, None), rec(2, "c")])
    assert isinstance(result.error, MissingEventIdError)
    assert "payments[0]@1" in str(result.error)
    assert result.commits == {TP0: 1}  # only offset 0 is decided
    assert r.handler.ids == ["a"]  # type: ignore[attr-defined]
    assert r.store is not None and r.store.watermark(TP0) == 0


@pytest.mark.parametrize(
    ("id_source", "message_id"),
    [("key", "k1"), ("json:/payment/id", "p1"), ("header:event-id", "h1")],
)
def test_id_sources(rig: RigFactory, id_source: str, message_id: str) -> None:
    from dedupe_consumer.replay import Record

    r = rig(dedupe={"id_source": id_source})
    message = Record(TOPIC, 0, 0, b"k1", b'{"payment": {"id": "p1"}}', [("event-id", b"h1")])
    r.engine.process([message])
    assert r.handler.ids == [message_id]  # type: ignore[attr-defined]


class Payment(BaseModel):
    amount_cents: int


class PaymentHandler(Recorder):
    payload_model = Payment


def test_invalid_payload_is_dead_lettered_without_calling_the_handler(rig: RigFactory) -> None:
    handler = PaymentHandler()
    r = rig(handler)
    r.engine.process(
        [rec(0, "a", body={"amount_cents": "lots"}), rec(1, "b", body={"amount_cents": 5})]
    )
    assert [e.id for e in handler.calls] == ["b"]
    assert handler.calls[0].payload == Payment(amount_cents=5)
    [letter] = r.dead.letters
    assert (letter.letter.reason, letter.letter.error_class) == (
        "invalid-payload",
        "ValidationError",
    )
    # Dead-lettered IDs are recorded: a redelivery is a duplicate, not a second try.
    again = r.engine.process([rec(2, "a", body={"amount_cents": "lots"})])
    assert again.stats.duplicates == 1 and len(r.dead.letters) == 1


def test_poison_message_retried_then_dead_lettered_partition_keeps_flowing(
    rig: RigFactory,
) -> None:
    def fail(event: Event) -> None:
        if event.id == "poison":
            raise RetryableError("downstream timeout")

    handler = Recorder(fail)
    r = rig(handler, processing={"max_retries": 3})
    result = r.engine.process([rec(0, "poison"), rec(1, "b"), rec(2, "c")])
    assert [e.attempt for e in handler.calls if e.id == "poison"] == [1, 2, 3, 4]
    assert [e.id for e in handler.calls if e.id != "poison"] == ["b", "c"]
    [letter] = r.dead.letters
    assert letter.letter.reason == "retries-exhausted"
    assert letter.letter.attempts == 4
    assert result.stats.dead_lettered == 1 and result.stats.handled == 2


def test_unexpected_exception_is_retried_and_can_succeed(rig: RigFactory) -> None:
    attempts: list[int] = []

    def flaky(event: Event) -> None:
        attempts.append(event.attempt)
        if event.attempt < 3:
            raise ConnectionError("reset by peer")

    r = rig(Recorder(flaky))
    result = r.engine.process([rec(0, "a")])
    assert attempts == [1, 2, 3]
    assert result.stats.handled == 1 and r.dead.letters == []


def test_permanent_error_is_not_retried(rig: RigFactory) -> None:
    def fail(event: Event) -> None:
        raise PermanentError("card declined for good")

    r = rig(Recorder(fail))
    r.engine.process([rec(0, "a")])
    [letter] = r.dead.letters
    assert (letter.letter.reason, letter.letter.attempts) == ("permanent-error", 1)
    assert letter.letter.error_message == "card declined for good"


def test_retention_expiry_forgets_old_ids_and_sweep_removes_them(rig: RigFactory) -> None:
    r = rig(dedupe={"retention": "1h"})
    r.engine.process([rec(i, f"id{i}") for i in range(50)])
    r.clock.now += timedelta(minutes=59).total_seconds()
    still = r.engine.process([rec(50, "id0")])
    assert still.stats.duplicates == 1
    r.clock.now += timedelta(minutes=2).total_seconds()
    assert r.store is not None
    deleted = r.store.sweep_expired(int(r.clock.now * 1000), {TP0: 1000})
    assert deleted == 50
    later = r.engine.process([rec(51, "id1")])
    assert later.stats.handled == 1  # expired: treated as never seen


def test_expired_record_reads_as_absent_before_the_sweep(rig: RigFactory) -> None:
    r = rig(dedupe={"retention": "10s"})
    r.engine.process([rec(0, "a")])
    r.clock.now += 11
    assert r.store is not None
    assert r.store.lookup(TP0, ["a"], int(r.clock.now * 1000)) == [None]


def test_stop_during_backoff_persists_only_the_decided_prefix(rig: RigFactory) -> None:
    r: Rig

    def fail(event: Event) -> None:
        if event.id == "slow":
            r.engine.request_stop()
            raise RetryableError("503")

    r = rig(Recorder(fail), processing={"retry_backoff": "5s", "retry_backoff_max": "5s"})
    result = r.engine.process([rec(0, "a"), rec(1, "slow"), rec(2, "c")])
    assert result.commits == {TP0: 1}  # "slow" is undecided: it will be redelivered
    assert r.handler.ids == ["a", "slow"]  # type: ignore[attr-defined]
    assert r.store is not None and r.store.watermark(TP0) == 0


def test_partitions_are_independent_scopes_with_own_watermarks(rig: RigFactory) -> None:
    r = rig()
    result = r.engine.process(
        [rec(0, "a", partition=0), rec(0, "a", partition=1), rec(1, "b", partition=1)]
    )
    assert result.commits == {TP0: 1, TopicPartition(TOPIC, 1): 2}
    assert result.stats.handled == 3


def test_messages_of_unassigned_partitions_are_left_to_their_owner(rig: RigFactory) -> None:
    r = rig()
    r.engine.release([TopicPartition(TOPIC, 1)])
    result = r.engine.process([rec(0, "a", partition=1), rec(0, "b", partition=0)])
    assert result.commits == {TP0: 1}
    assert r.handler.ids == ["b"]  # type: ignore[attr-defined]


def test_watermark_never_moves_backwards(rig: RigFactory) -> None:
    r = rig()
    r.engine.process([rec(i, f"id{i}") for i in range(20)])
    old = r.engine.process([rec(3, "id3"), rec(4, "id4"), rec(5, "id5")])  # a rewind
    assert old.stats.replays == 3
    assert old.commits == {}
    assert r.store is not None and r.store.watermark(TP0) == 19


def test_in_batch_copies_compare_with_the_stored_record(rig: RigFactory) -> None:
    r = rig(dedupe={"on_conflict": "dead-letter"})
    r.engine.process([rec(0, "k", body={"v": 1})])
    result = r.engine.process([rec(1, "k", body={"v": 2}), rec(2, "k", body={"v": 1})])
    assert (result.stats.dead_lettered, result.stats.duplicates) == (1, 1)
    assert [d.message.offset() for d in r.dead.letters] == [1]


def test_poison_values_do_not_stall_the_partition(rig: RigFactory) -> None:
    from dedupe_consumer.replay import Record

    r = rig(dedupe={"id_source": "json:/id"})
    deep = b"[" * 100_000 + b"]" * 100_000
    far_future = Record(TOPIC, 0, 1, None, b'{"id": "x"}', [], 253_402_300_800_000 * 10)
    result = r.engine.process([Record(TOPIC, 0, 0, None, deep, []), far_future])
    assert result.stats.dead_lettered == 1 and result.stats.handled == 1
    assert r.dead.letters[0].letter.reason == "invalid-payload"  # too deep to parse
    assert r.handler.calls[0].timestamp is None  # type: ignore[attr-defined]
    assert result.commits == {TP0: 2}


def test_retention_sweep_keeps_a_hot_partition_bounded(rig: RigFactory) -> None:
    r = rig(dedupe={"retention": "10s"})
    r.engine.process([rec(0, "cold", partition=p) for p in (1, 2, 3)])  # 4 families known
    for n in range(150):  # 100 new IDs a second into partition 0 of 4 assigned
        r.clock.now += 1
        r.engine.process([rec(n * 100 + i, f"id{n}-{i}") for i in range(100)])
    assert r.store is not None
    stored = sum(1 for _ in r.store._family(TP0).keys())  # noqa: SIM118 (rocksdict)
    assert stored <= 100 * 10 * 2, stored  # ~ rate x retention x 1.5, not 15,000


def test_a_walk_past_its_budget_is_cut_and_the_rest_re_read(rig: RigFactory) -> None:
    import time as _time

    def slow(event: Event) -> None:
        _time.sleep(0.05)

    r = rig(Recorder(slow))
    r.engine.walk_budget_s = 0.12
    batch = [rec(i, f"id{i}") for i in range(10)] + [rec(0, "p1", partition=1)]
    first = r.engine.process(batch)
    decided = first.commits[TP0]
    assert 1 <= decided < 10
    assert first.rewind == {TP0: decided, TopicPartition(TOPIC, 1): 0}
    assert r.store is not None and r.store.watermark(TP0) == decided - 1
    r.engine.walk_budget_s = None
    rest = [
        m for m in batch if m.offset() >= first.rewind.get(TopicPartition(TOPIC, m.partition()), 99)
    ]
    second = r.engine.process(rest)
    assert second.rewind == {}
    handled = sorted(r.handler.ids)  # type: ignore[attr-defined]
    assert handled == sorted([*(f"id{i}" for i in range(10)), "p1"])


class _AsyncHandle(Recorder):
    async def handle(self, event: Event) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.calls.append(event)


class _ReturnsCoroutine(Recorder):
    """Not ``async def`` itself, but hands back a coroutine: it is awaited too."""

    def handle(self, event: Event) -> None:
        return self._later(event)  # type: ignore[return-value]

    async def _later(self, event: Event) -> None:
        await asyncio.sleep(0)
        self.calls.append(event)


class _AsyncParse(Recorder):
    async def parse(self, value: bytes | None) -> object:
        return None


@pytest.mark.parametrize("handler", [_AsyncHandle, _ReturnsCoroutine])
def test_an_async_handler_is_awaited_for_every_event(
    rig: RigFactory, handler: type[Recorder]
) -> None:
    """Issue 13: an ``async def handle`` was never awaited and every event was lost."""
    r = rig(handler())
    result = r.engine.process([rec(0, "a"), rec(1, "b"), rec(2, "a")])
    assert result.error is None
    assert r.handler.ids == ["a", "b"]  # type: ignore[attr-defined]
    assert (result.stats.handled, result.stats.duplicates) == (2, 1)
    assert result.commits == {TP0: 3}


def test_an_async_parse_is_refused_at_start_up(rig: RigFactory) -> None:
    with pytest.raises(ConfigError, match=r"_AsyncParse.parse is `async def`"):
        rig(_AsyncParse())
