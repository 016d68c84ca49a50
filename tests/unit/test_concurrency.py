"""The concurrent engine keeps the guarantees (issue 13).

Each test drives a real :class:`~dedupe_consumer.DedupeConsumer` over replay edges
(a real RocksDB store, no broker) with ``processing.concurrency`` and
``processing.ordering`` set, and checks what the design promises: per-key (or
per-partition) offset order, different keys in parallel, one call per event ID,
commits and watermarks only up to the contiguous decided prefix, decisions above
a gap kept as ID records, and ``async def`` handlers really awaited.

Every run is bounded: a consumer that does not finish in time is stopped and the
test fails (a hang is a failure here, never a stuck CI job).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest

from dedupe_consumer import (
    DedupeConsumer,
    Event,
    Handler,
    PermanentError,
    RetryableError,
    Settings,
)
from dedupe_consumer.engine import payload_digest
from dedupe_consumer.models import BatchStats, TopicPartition
from dedupe_consumer.replay import Record, edges
from dedupe_consumer.replay.source import ReplayFeed, ReplaySource
from dedupe_consumer.replay.wiring import ReplayEdges
from dedupe_consumer.store import RocksStore
from dedupe_consumer.store.base import IdRecord, RecordStatus, WriteSet

from .conftest import TOPIC, Recorder, Rig, make_settings, rec

RUN_TIMEOUT_S = 30.0
"""A run that has not ended by then is stopped and fails the test (no hangs)."""

TP0 = TopicPartition(TOPIC, 0)


def settings(path: Path, concurrency: int, ordering: str = "key", **processing: Any) -> Settings:
    return make_settings(
        path, processing={"concurrency": concurrency, "ordering": ordering, **processing}
    )


def keyed(offset: int, event_id: str, key: str, partition: int = 0) -> Record:
    return rec(offset, event_id, key=key.encode(), partition=partition)


# -- bounded runs, with a check on every commit ------------------------------------------


CommitCheck = Callable[[Mapping[TopicPartition, int]], None]


class _CheckedSource(ReplaySource):
    check: CommitCheck | None = None

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if self.check is not None and offsets:
            self.check(offsets)
        super().commit(offsets)


class _CheckedFeed(ReplayFeed):
    def __init__(self, records: Sequence[Record], check: CommitCheck | None) -> None:
        super().__init__(records)
        self.check = check

    def __call__(self, listener: Any) -> ReplaySource:
        source = _CheckedSource(self.records, listener)
        source.check = self.check
        self.opened = source
        return source


class Run:
    """One consumer run over ``records``; the edges stay open for inspection."""

    def __init__(self, replayed: ReplayEdges, consumer: DedupeConsumer) -> None:
        self.edges = replayed
        self.consumer = consumer
        self.totals = BatchStats()
        self.error: BaseException | None = None

    @property
    def committed(self) -> dict[TopicPartition, int]:
        return self.edges.source.committed

    def watermark(self, tp: TopicPartition = TP0) -> int | None:
        return self.edges.store.watermark(tp)

    def recorded(self, ids: Sequence[str], tp: TopicPartition = TP0) -> dict[str, int | None]:
        """The offset of each ID's record in the store (None: no record)."""
        found = self.edges.store.lookup(tp, ids, int(time.time() * 1000))
        return {i: (None if r is None else r.offset) for i, r in zip(ids, found, strict=True)}


@contextmanager
def running(
    handler: Handler,
    config: Settings,
    records: Sequence[Record],
    *,
    check: CommitCheck | None = None,
    on_start: Callable[[Run], None] | None = None,
    until_exhausted: bool = True,
    timeout_s: float = RUN_TIMEOUT_S,
) -> Iterator[Run]:
    replayed = dataclasses.replace(edges(records, config), source=_CheckedFeed(records, check))
    consumer = DedupeConsumer(handler, config, edges=replayed)
    run = Run(replayed, consumer)
    if on_start is not None:
        on_start(run)

    def target() -> None:
        try:
            until = (lambda _t: replayed.source.exhausted) if until_exhausted else None
            run.totals = consumer.run(until=until, install_signal_handlers=False)
        except BaseException as exc:  # reported by the test below
            run.error = exc

    thread = threading.Thread(target=target, name="consumer-under-test", daemon=True)
    try:
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            consumer.stop()
            thread.join(10)
            pytest.fail(f"the consumer did not finish within {timeout_s}s (stopped now)")
        if run.error is not None:
            raise run.error
        yield run
    finally:
        if not thread.is_alive():
            replayed.close()


class InFlight:
    """Counts calls running at once (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.max = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.max = max(self.max, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


class Tracker(Handler):
    """Records every call (start order, key, offset), in-flight counts and completions."""

    def __init__(
        self,
        *,
        latency: Callable[[Event], float] | None = None,
        before: Callable[[Event], None] | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self.started: list[Event] = []
        self.finished: list[Event] = []
        self.inflight = InFlight()
        self.by_id: dict[str, int] = defaultdict(int)
        self.running_ids: set[str] = set()
        self.overlapping_ids: list[str] = []
        self.latency = latency
        self.before = before

    def handle(self, event: Event) -> None:
        with self.lock:
            self.started.append(event)
            if event.id in self.running_ids:
                self.overlapping_ids.append(event.id)
            self.running_ids.add(event.id)
        self.inflight.enter()
        try:
            if self.before is not None:
                self.before(event)
            if self.latency is not None:
                time.sleep(self.latency(event))
        finally:
            self.inflight.leave()
            with self.lock:
                self.running_ids.discard(event.id)
        with self.lock:
            self.by_id[event.id] += 1
            self.finished.append(event)

    def offsets_by(self, lane: Callable[[Event], object]) -> dict[object, list[int]]:
        out: dict[object, list[int]] = defaultdict(list)
        for e in self.started:
            out[lane(e)].append(e.offset)
        return dict(out)


# -- key ordering ------------------------------------------------------------------------


def test_key_ordering_runs_four_keys_at_once_and_each_key_in_offset_order(
    tmp_path: Path,
) -> None:
    # Four keys, three events each, interleaved: offset o has key o % 4.
    records = [keyed(o, f"e{o}", f"k{o % 4}") for o in range(12)]
    barrier = threading.Barrier(parties=4, timeout=10)
    broken: list[str] = []

    def first_of_each_key_meets(event: Event) -> None:
        if event.offset < 4:  # the first event of each key: only 4 at once pass
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                broken.append(event.id)

    handler = Tracker(before=first_of_each_key_meets, latency=lambda e: 0.002 * (e.offset % 3))
    with running(handler, settings(tmp_path / "s", 4), records) as run:
        assert run.committed == {TP0: 12}
        assert run.watermark() == 11
    assert broken == [], "4 calls of 4 distinct keys did not run at once at concurrency 4"
    assert handler.inflight.max == 4  # never more than the concurrency
    assert handler.offsets_by(lambda e: e.key) == {
        f"k{k}".encode(): [k, k + 4, k + 8] for k in range(4)
    }
    assert sorted(handler.by_id.items()) == sorted((f"e{o}", 1) for o in range(12))
    assert run.totals.handled == 12


@pytest.mark.parametrize(
    ("concurrency", "ordering"), [(1, "key"), (4, "partition")], ids=["c1-key", "c4-partition"]
)
def test_one_call_at_a_time_when_concurrency_1_or_one_partition_in_partition_order(
    tmp_path: Path, concurrency: int, ordering: str
) -> None:
    # The same 4 distinct keys as above: a Barrier(4) would time out here, so count instead.
    records = [keyed(o, f"e{o}", f"k{o % 4}") for o in range(12)]
    handler = Tracker(latency=lambda _e: 0.005)
    with running(handler, settings(tmp_path / "s", concurrency, ordering), records) as run:
        assert run.committed == {TP0: 12}
    assert handler.inflight.max == 1
    assert [e.offset for e in handler.started] == list(range(12))
    assert run.totals.handled == 12


def test_one_event_id_under_two_keys_never_runs_twice_at_once_and_is_handled_once(
    tmp_path: Path,
) -> None:
    # Each ID arrives twice with different keys (a producer that re-keyed a retry);
    # the copies are adjacent so that a key-only scheduler would run them together.
    records: list[Record] = []
    for i in range(6):
        records.append(keyed(2 * i, f"id{i}", f"a{i}"))
        records.append(keyed(2 * i + 1, f"id{i}", f"b{i}"))
    handler = Tracker(latency=lambda _e: 0.05)
    with running(handler, settings(tmp_path / "s", 8), records) as run:
        assert run.committed == {TP0: 12}
        assert run.watermark() == 11
        assert run.recorded([f"id{i}" for i in range(6)]) == {f"id{i}": 2 * i for i in range(6)}
    assert handler.overlapping_ids == []
    assert dict(handler.by_id) == {f"id{i}": 1 for i in range(6)}
    # The first copy is the one handled; the second is its duplicate.
    assert sorted(e.offset for e in handler.started) == [0, 2, 4, 6, 8, 10]
    assert (run.totals.handled, run.totals.duplicates, run.totals.consumed) == (6, 6, 12)
    assert handler.inflight.max > 1  # the six IDs themselves did run in parallel


class FlakyFirst(Tracker):
    """``slow`` raises RetryableError on its first two attempts."""

    def __init__(self) -> None:
        super().__init__(latency=lambda _e: 0.01)
        self.attempts: list[int] = []

    def handle(self, event: Event) -> None:
        if event.id == "slow":
            with self.lock:
                self.attempts.append(event.attempt)
            if event.attempt <= 2:
                raise RetryableError(f"transient, attempt {event.attempt}")
        super().handle(event)


def test_a_retrying_event_holds_only_its_own_key(tmp_path: Path) -> None:
    records = [keyed(0, "slow", "k-slow")]
    records += [keyed(o, f"e{o}", f"k{o}") for o in range(1, 9)]
    records.append(keyed(9, "after-slow", "k-slow"))  # same key: must wait for "slow"
    handler = FlakyFirst()
    config = settings(tmp_path / "s", 4, retry_backoff="200ms", retry_backoff_max="1s")
    with running(handler, config, records) as run:
        assert run.committed == {TP0: 10}
        assert run.watermark() == 9
    assert handler.attempts == [1, 2, 3]
    done = [e.id for e in handler.finished]
    # 200 ms + 400 ms of backoff: every other key finished meanwhile.
    assert done[-2:] == ["slow", "after-slow"]
    assert sorted(done[:-2]) == sorted(f"e{o}" for o in range(1, 9))
    assert run.totals.handled == 10


# -- partition ordering ------------------------------------------------------------------


def test_partition_ordering_keeps_strict_offset_order_per_partition(tmp_path: Path) -> None:
    # 4 partitions x 10 events, many keys, interleaved across partitions.
    records = [
        keyed(o, f"p{p}-e{o}", f"k{(o * 7 + p) % 13}", partition=p)
        for o in range(10)
        for p in range(4)
    ]
    barrier = threading.Barrier(parties=4, timeout=10)
    broken: list[str] = []
    lock = threading.Lock()
    running_per_partition: dict[int, int] = defaultdict(int)
    overlaps: list[tuple[int, int]] = []

    def one_per_partition(event: Event) -> None:
        with lock:
            running_per_partition[event.partition] += 1
            if running_per_partition[event.partition] > 1:
                overlaps.append((event.partition, event.offset))
        try:
            if event.offset == 0:  # partitions still run in parallel with each other
                try:
                    barrier.wait()
                except threading.BrokenBarrierError:
                    broken.append(event.id)
            time.sleep(random.Random(event.id).random() * 0.004)
        finally:
            with lock:
                running_per_partition[event.partition] -= 1

    handler = Tracker(before=one_per_partition)
    with running(handler, settings(tmp_path / "s", 8, "partition"), records) as run:
        assert run.committed == {TopicPartition(TOPIC, p): 10 for p in range(4)}
    assert overlaps == []
    assert handler.offsets_by(lambda e: e.partition) == {p: list(range(10)) for p in range(4)}
    assert broken == [], "the 4 partitions' first events did not run at once"
    assert run.totals.handled == 40


# -- the property: random latencies, duplicates, both orderings --------------------------


def random_topic(seed: int) -> list[Record]:
    """200 events over 4 partitions and 30 keys; about 15% repeat an earlier ID.

    A key always lands on one partition (``key % 4``), as a partitioner puts it,
    and a repeated ID comes back with its key: a producer retry or a re-publish.
    """
    rng = random.Random(seed)
    next_offset = [0, 0, 0, 0]
    seen: list[tuple[str, int]] = []
    records: list[Record] = []
    for n in range(200):
        if seen and rng.random() < 0.15:
            event_id, key = rng.choice(seen)
        else:
            event_id, key = f"id{n}", rng.randrange(30)
            seen.append((event_id, key))
        p = key % 4
        records.append(keyed(next_offset[p], event_id, f"k{key}", partition=p))
        next_offset[p] += 1
    return records


@pytest.mark.parametrize("mode", ["plain", "claim"])
@pytest.mark.parametrize("ordering", ["key", "partition"])
@pytest.mark.parametrize("concurrency", [1, 4, 16])
def test_every_id_handled_once_in_lane_order_and_commits_never_pass_an_undecided_offset(
    tmp_path: Path, concurrency: int, ordering: str, mode: str
) -> None:
    seed = concurrency * 10 + len(ordering) + len(mode)
    records = random_topic(seed)
    latency_rng = random.Random(seed)
    latencies = {r.offset_ + 1000 * r.partition_: latency_rng.random() * 0.004 for r in records}
    first_offset: dict[tuple[int, str], int] = {}
    for r in records:
        event_id = dict(r.headers_)["event-id"]
        assert isinstance(event_id, bytes)
        first_offset.setdefault((r.partition_, event_id.decode()), r.offset_)
    needs_call = {(p, o) for (p, _), o in first_offset.items()}
    completed: set[tuple[int, int]] = set()
    lock = threading.Lock()
    bad_commits: list[str] = []
    started: list[Run] = []

    class Recording(Tracker):
        def handle(self, event: Event) -> None:
            super().handle(event)
            with lock:
                completed.add((event.partition, event.offset))

    def check(offsets: Mapping[TopicPartition, int]) -> None:
        with lock:
            for tp, end in offsets.items():
                unhandled = sorted(
                    o
                    for (p, o) in needs_call
                    if p == tp.partition and o < end and (p, o) not in completed
                )
                if unhandled:
                    bad_commits.append(f"{tp}: commit {end} passes unhandled {unhandled}")
        assert started, "a commit before the run started"
        for tp, end in offsets.items():  # commit after persist: the watermark covers it
            wm = started[0].watermark(tp)
            if wm is None or wm < end - 1:
                bad_commits.append(f"{tp}: commit {end} before the watermark ({wm}) covers it")

    handler = Recording(latency=lambda e: latencies[e.offset + 1000 * e.partition])
    config = settings(tmp_path / "s", concurrency, ordering, batch_size=64, mode=mode)
    with running(handler, config, records, check=check, on_start=started.append) as run:
        ends = {TopicPartition(TOPIC, p): n for p, n in enumerate(_counts(records))}
        assert run.committed == ends
        for tp, end in ends.items():
            assert run.watermark(tp) == end - 1
    assert bad_commits == []
    # Each ID once per partition (its dedupe scope), and nothing else.
    assert sorted((e.partition, e.offset) for e in handler.started) == sorted(needs_call)
    assert all(n == 1 for n in handler.by_id.values())
    assert handler.overlapping_ids == []
    # Per lane, calls started in offset order.
    lane: Callable[[Event], object] = (
        (lambda e: (e.partition, e.key)) if ordering == "key" else (lambda e: e.partition)
    )
    for offsets in handler.offsets_by(lane).values():
        assert offsets == sorted(offsets)
    # Every offset ends as exactly one decision.
    totals = run.totals
    assert totals.consumed == 200
    assert (totals.handled, totals.duplicates) == (len(needs_call), 200 - len(needs_call))
    assert totals.dead_lettered == totals.conflicts == totals.replays == 0
    assert handler.inflight.max <= concurrency
    if ordering == "partition":
        assert handler.inflight.max <= 4


def _counts(records: Sequence[Record]) -> list[int]:
    counts = [0, 0, 0, 0]
    for r in records:
        counts[r.partition_] += 1
    return counts


# -- a stop in the middle: decisions above a gap -----------------------------------------


class StuckB(Tracker):
    """``b`` fails with a long backoff (a gap at offset 1); the rest succeeds.

    When every other event that can run has finished, a stop is requested from a
    thread of its own (as SIGTERM would be).
    """

    def __init__(self, others: set[str]) -> None:
        super().__init__()
        self.others = others
        self.consumer: DedupeConsumer | None = None
        self.b_attempts = 0

    def handle(self, event: Event) -> None:
        if event.id == "b":
            with self.lock:
                self.b_attempts += 1
            raise RetryableError("down for a while")
        super().handle(event)
        with self.lock:
            if {e.id for e in self.finished} == self.others and self.consumer is not None:
                threading.Thread(target=self.consumer.stop, name="stopper").start()


def test_a_stop_persists_decisions_above_a_gap_and_a_restart_handles_only_the_rest(
    tmp_path: Path,
) -> None:
    records = [keyed(0, "a", "ka"), keyed(1, "b", "kb")]
    records += [keyed(o, f"x{o}", f"k{o}") for o in range(2, 7)]
    records.append(keyed(7, "b2", "kb"))  # behind "b" on its key
    others = {"a"} | {f"x{o}" for o in range(2, 7)}
    config = settings(
        tmp_path / "s", 4, retry_backoff="20s", retry_backoff_max="20s", max_retries=3
    )
    first = StuckB(others)

    def attach(run: Run) -> None:
        first.consumer = run.consumer

    with running(first, config, records, on_start=attach, until_exhausted=False) as run:
        assert run.watermark() == 0  # the contiguous prefix ends before the gap
        assert run.committed.get(TP0, 0) <= 1  # never past offset 1 (undecided)
        assert run.committed == {TP0: 1}
        # Above the gap: every decision is a durable ID record.
        assert run.recorded(sorted(others - {"a"})) == {f"x{o}": o for o in range(2, 7)}
        assert run.recorded(["b", "b2"]) == {"b": None, "b2": None}
    assert first.b_attempts == 1  # the stop cut the backoff short
    assert {e.id for e in first.started} == others  # b2 never started (its key was held)
    assert run.totals.handled == 6

    second = Tracker()
    with running(second, config, records) as again:
        assert again.watermark() == 7
        assert again.committed == {TP0: 8}
    # No second call of a decided event: only the gap and what its key held back.
    assert [e.id for e in second.started] == ["b", "b2"]
    totals = again.totals
    assert totals.handled == 2
    assert totals.consumed == 7  # offsets 1..7 were re-read
    assert totals.replays + totals.duplicates == 5


# -- async handlers ----------------------------------------------------------------------


class AsyncCounter(Handler):
    """An ``async def`` handler whose side effect only happens if it is awaited."""

    def __init__(self) -> None:
        self.effects: list[str] = []
        self.setup_done = False
        self.teardown_done = False
        self.handled_before_setup: list[str] = []

    async def setup(self) -> None:  # type: ignore[override]
        await asyncio.sleep(0.001)
        self.setup_done = True

    async def handle(self, event: Event) -> None:
        if not self.setup_done:
            self.handled_before_setup.append(event.id)
        await asyncio.sleep(0.001)
        self.effects.append(event.id)

    async def teardown(self) -> None:  # type: ignore[override]
        await asyncio.sleep(0.001)
        self.teardown_done = True


@pytest.mark.parametrize("concurrency", [1, 4])
def test_async_handlers_are_awaited_every_time(tmp_path: Path, concurrency: int) -> None:
    records = [keyed(o, f"e{o % 40}", f"k{o % 7}") for o in range(50)]  # 10 duplicates
    handler = AsyncCounter()
    with running(handler, settings(tmp_path / "s", concurrency), records) as run:
        assert run.committed == {TP0: 50}
    # The old silent loss: every event "handled", no effect. Count the effects.
    assert sorted(handler.effects) == sorted(f"e{i}" for i in range(40))
    assert (run.totals.handled, run.totals.duplicates) == (40, 10)
    assert handler.setup_done and handler.teardown_done
    assert handler.handled_before_setup == []


class AsyncGate(Handler):
    """Waits (bounded) until ``target`` calls are in flight on the loop at once."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.now = 0
        self.max = 0
        self.full: asyncio.Event | None = None
        self.timeouts = 0
        self.threads: set[int] = set()
        self.loops: set[int] = set()
        self.done: list[str] = []

    async def handle(self, event: Event) -> None:
        self.threads.add(threading.get_ident())
        self.loops.add(id(asyncio.get_running_loop()))
        if self.full is None:
            self.full = asyncio.Event()
        self.now += 1
        self.max = max(self.max, self.now)
        try:
            if self.now >= self.target:
                self.full.set()
            try:
                await asyncio.wait_for(self.full.wait(), 10)
            except TimeoutError:
                self.timeouts += 1
            await asyncio.sleep(0.002)
        finally:
            self.now -= 1
        self.done.append(event.id)


def test_async_handlers_have_concurrency_calls_in_flight_on_one_loop(tmp_path: Path) -> None:
    records = [keyed(o, f"e{o}", f"k{o}") for o in range(24)]
    handler = AsyncGate(target=8)
    with running(handler, settings(tmp_path / "s", 8), records) as run:
        assert run.committed == {TP0: 24}
    assert handler.timeouts == 0, "8 calls were never in flight at once"
    assert handler.max == 8  # and never more than the concurrency
    assert len(handler.threads) == 1 and len(handler.loops) == 1
    assert sorted(handler.done) == sorted(f"e{o}" for o in range(24))


class AsyncReconciler(Handler):
    """``async def`` handle and reconcile; ``done`` plays the downstream system."""

    def __init__(self, done: set[str]) -> None:
        self.done = done
        self.reconciled: list[str] = []
        self.handled: list[str] = []

    async def reconcile(self, event: Event) -> bool:
        await asyncio.sleep(0.001)
        self.reconciled.append(event.id)
        return event.id in self.done

    async def handle(self, event: Event) -> None:
        await asyncio.sleep(0.001)
        self.handled.append(event.id)
        self.done.add(event.id)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_an_async_reconcile_is_awaited_for_claims_found_in_progress(
    tmp_path: Path, concurrency: int
) -> None:
    ids = ["a", "b", "c", "d"]
    records = [keyed(o, i, f"k{i}") for o, i in enumerate(ids)]
    config = settings(tmp_path / "s", concurrency, mode="claim", on_uncertain="reconcile")
    # A previous run claimed a, b and c and died: their claims are in progress.
    store = RocksStore(config.store.path, retention_ms=10**12)
    try:
        now_ms = int(time.time() * 1000)
        claims = [
            (i, IdRecord(RecordStatus.IN_PROGRESS, r.offset_, now_ms, payload_digest(r.value_)))
            for i, r in zip(ids[:3], records[:3], strict=True)
        ]
        store.persist(WriteSet(records={TP0: claims}))
    finally:
        store.close()
    handler = AsyncReconciler(done={"a"})  # only a's effect had happened
    with running(handler, config, records) as run:
        assert run.committed == {TP0: 4}
        assert run.watermark() == 3
    assert sorted(handler.reconciled) == ["a", "b", "c"]
    assert sorted(handler.handled) == ["b", "c", "d"]  # a happened: not called again
    assert (run.totals.uncertain, run.totals.handled) == (3, 4)


class ThreadNoter(Handler):
    def __init__(self) -> None:
        self.threads: dict[str, set[int]] = defaultdict(set)

    def setup(self) -> None:
        self.threads["setup"].add(threading.get_ident())

    def handle(self, event: Event) -> None:
        self.threads["handle"].add(threading.get_ident())

    def teardown(self) -> None:
        self.threads["teardown"].add(threading.get_ident())


def test_at_concurrency_1_a_sync_handler_lives_on_one_thread(tmp_path: Path) -> None:
    records = [keyed(o, f"e{o}", f"k{o % 5}") for o in range(30)]
    handler = ThreadNoter()
    with running(handler, settings(tmp_path / "s", 1), records) as run:
        assert run.totals.handled == 30
    assert set(handler.threads) == {"setup", "handle", "teardown"}
    assert len(set().union(*handler.threads.values())) == 1, dict(handler.threads)


# -- a revoke in the middle of a batch ---------------------------------------------------


class RebalancingSource:
    """One partition, revoked once while handler calls run (as Kafka does inside a poll
    that ``keep_alive`` makes), then assigned back at the next poll.

    Like the Kafka source it commits what ``on_revoked`` returns before the partition
    goes, and it notes any commit offered for a partition it does not hold.
    """

    def __init__(
        self,
        records: Sequence[Record],
        listener: Any,
        revoke_when: Callable[[], bool],
        after_revoke: Callable[[], None],
        on_reassign: Callable[[], None],
    ) -> None:
        self.records = list(records)
        self.listener = listener
        self.revoke_when = revoke_when
        self.after_revoke = after_revoke
        self.on_reassign = on_reassign
        self.committed: dict[TopicPartition, int] = {}
        self.foreign_commits: list[dict[TopicPartition, int]] = []
        self.revoke_commits: dict[TopicPartition, int] | None = None
        self.assigned = False
        self.pending: list[Record] = []
        self._assign()

    def _assign(self) -> None:
        start = self.listener.on_assigned([TP0]).get(TP0)
        if start is None:
            start = self.committed.get(TP0, 0)
        self.pending = [r for r in self.records if r.offset_ >= start]
        self.assigned = True

    @property
    def exhausted(self) -> bool:
        return self.revoke_commits is not None and self.assigned and not self.pending

    def poll(self, max_messages: int, timeout_s: float) -> list[Record]:
        if not self.assigned:
            self.on_reassign()
            self._assign()  # the partition comes back (to this same instance)
        batch, self.pending = self.pending[:max_messages], self.pending[max_messages:]
        return batch

    def keep_alive(self) -> None:
        if self.assigned and self.revoke_commits is None and self.revoke_when():
            self.revoke_commits = dict(self.listener.on_revoked([TP0]))
            self.committed.update(self.revoke_commits)
            self.assigned = False
            self.pending = []
            self.after_revoke()

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if offsets and not self.assigned:
            self.foreign_commits.append(dict(offsets))
        self.committed.update(offsets)

    def seek(self, offsets: Mapping[TopicPartition, int]) -> None:
        if self.assigned and TP0 in offsets:
            self.pending = [r for r in self.records if r.offset_ >= offsets[TP0]]

    def close(self) -> None:
        return None


def test_a_revoke_mid_batch_waits_for_running_calls_commits_them_and_starts_nothing_more(
    tmp_path: Path,
) -> None:
    records = [keyed(o, f"e{o}", f"k{o}") for o in range(12)]
    revoking = threading.Event()
    handler_lock = threading.Lock()
    running_now: set[int] = set()
    calls: list[int] = []
    finished: list[int] = []

    class HeldUntilRevoke(Handler):
        def handle(self, event: Event) -> None:
            with handler_lock:
                calls.append(event.offset)
                running_now.add(event.offset)
            try:
                if event.offset >= 2 and not sources[0].revoke_commits:
                    revoking.wait(10)  # still running when the revoke comes...
                    time.sleep(0.2)  # ...and for a while after it started
            finally:
                with handler_lock:
                    running_now.discard(event.offset)
                    finished.append(event.offset)

    sources: list[RebalancingSource] = []
    at_revoke: dict[str, Any] = {}

    def four_running() -> bool:
        with handler_lock:
            return len(running_now) == 4

    def snapshot() -> None:
        with handler_lock:
            at_revoke["calls"] = list(calls)
            at_revoke["finished"] = sorted(finished)
            at_revoke["running"] = set(running_now)

    def source_factory(listener: Any) -> RebalancingSource:
        def revoke_when() -> bool:
            if four_running():
                revoking.set()
                return True
            return False

        def reassigned() -> None:
            with handler_lock:
                at_revoke["calls_at_reassign"] = list(calls)

        source = RebalancingSource(records, listener, revoke_when, snapshot, reassigned)
        sources.append(source)
        return source

    config = settings(tmp_path / "s", 4)
    base = edges(records, config)
    replayed = dataclasses.replace(base, source=cast(Any, source_factory))
    consumer = DedupeConsumer(HeldUntilRevoke(), config, edges=replayed)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            consumer.run(
                until=lambda _t: bool(sources) and sources[0].exhausted,
                install_signal_handlers=False,
            )
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(RUN_TIMEOUT_S)
    try:
        if thread.is_alive():
            consumer.stop()
            thread.join(10)
            pytest.fail(f"the consumer did not finish within {RUN_TIMEOUT_S}s")
        assert errors == []
        source = sources[0]
        assert source.revoke_commits is not None, "the revoke never happened"
        # The calls running at the revoke were waited for, none was started during it...
        assert at_revoke["running"] == set(), "the revoke returned with calls still running"
        started_by_revoke = at_revoke["calls"]
        assert sorted(started_by_revoke) == at_revoke["finished"]
        # nor after it, until the partition came back.
        assert at_revoke["calls_at_reassign"] == started_by_revoke
        decided = sorted(started_by_revoke)
        # ...and what they decided was committed before the partition went.
        assert decided == list(range(len(decided))), "decided offsets should be a prefix here"
        assert 4 <= len(decided) < 12  # some were running, some not started yet
        assert source.revoke_commits == {TP0: len(decided)}
        assert source.foreign_commits == [], "offsets committed for a partition not held"
        # Back again: only what was not decided is handled, each offset once.
        assert sorted(calls) == list(range(12))
        assert source.committed == {TP0: 12}
        assert replayed.store.watermark(TP0) == 11
    finally:
        if not thread.is_alive():
            replayed.close()


# -- more: a stop during a call, async failures, worker threads, redelivered batches -----


def test_a_stop_during_a_running_call_waits_for_it_and_a_restart_does_not_call_it_again(
    tmp_path: Path,
) -> None:
    records = [keyed(o, f"e{o}", f"k{o % 3}") for o in range(9)]
    calls: list[str] = []
    consumers: list[DedupeConsumer] = []

    class StopsWhileRunning(Handler):
        def handle(self, event: Event) -> None:
            calls.append(event.id)
            if event.offset == 1:  # ask for a stop, then take a while to finish
                threading.Thread(target=consumers[0].stop, name="stopper").start()
                deadline = time.monotonic() + 10
                while not consumers[0].stopping and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(0.2)

    config = settings(tmp_path / "s", 2)
    with running(
        StopsWhileRunning(),
        config,
        records,
        on_start=lambda run: consumers.append(run.consumer),
        until_exhausted=False,
    ) as run:
        assert "e1" in calls
        wm = run.watermark()
        assert wm is not None and wm >= 1  # the running call was finished and recorded
        first_calls = list(calls)
        assert run.recorded(first_calls) == {i: int(i[1:]) for i in first_calls}
    calls.clear()
    second = Tracker()
    with running(second, config, records) as again:
        assert again.committed == {TP0: 9}
    assert sorted(e.id for e in second.started) == sorted(
        f"e{o}" for o in range(9) if f"e{o}" not in first_calls
    )


class AsyncFailing(Handler):
    def __init__(self) -> None:
        self.attempts: dict[str, list[int]] = defaultdict(list)

    async def handle(self, event: Event) -> None:
        await asyncio.sleep(0)
        self.attempts[event.id].append(event.attempt)
        if event.id == "flaky" and event.attempt < 3:
            raise RetryableError("try again")
        if event.id == "broken":
            raise PermanentError("never")


@pytest.mark.parametrize("concurrency", [1, 4])
def test_async_handler_errors_are_retried_or_dead_lettered_like_sync_ones(
    tmp_path: Path, concurrency: int
) -> None:
    records = [keyed(0, "flaky", "a"), keyed(1, "broken", "b"), keyed(2, "fine", "c")]
    handler = AsyncFailing()
    with running(handler, settings(tmp_path / "s", concurrency), records) as run:
        assert run.committed == {TP0: 3}
        assert [kept.letter.event_id for kept in run.edges.dead_letters.letters] == ["broken"]
    assert dict(handler.attempts) == {"flaky": [1, 2, 3], "broken": [1], "fine": [1]}
    assert (run.totals.handled, run.totals.dead_lettered) == (2, 1)


def test_sync_calls_run_on_at_most_concurrency_worker_threads(tmp_path: Path) -> None:
    records = [keyed(o, f"e{o}", f"k{o}") for o in range(40)]
    threads: set[int] = set()
    lock = threading.Lock()

    class Noter(Tracker):
        def handle(self, event: Event) -> None:
            with lock:
                threads.add(threading.get_ident())
            super().handle(event)

    handler = Noter(latency=lambda _e: 0.003)
    with running(handler, settings(tmp_path / "s", 4), records) as run:
        assert run.totals.handled == 40
    assert 1 < len(threads) <= 4
    assert handler.inflight.max <= 4


@pytest.mark.parametrize("ordering", ["key", "partition"])
def test_redelivered_batches_are_replays_never_second_calls(tmp_path: Path, ordering: str) -> None:
    # Every batch handed out twice, as after a crash between persist and commit.
    records = random_topic(7)
    config = settings(tmp_path / "s", 16, ordering, batch_size=32)
    replayed = edges(records, config)
    replayed = dataclasses.replace(replayed, source=ReplayFeed(records, redeliver_batches=True))
    handler = Tracker(latency=lambda e: (e.offset % 5) * 0.0005)
    consumer = DedupeConsumer(handler, config, edges=replayed)
    try:
        totals = consumer.run(
            until=lambda _t: replayed.source.exhausted, install_signal_handlers=False
        )
    finally:
        replayed.close()
    assert all(n == 1 for n in handler.by_id.values())
    unique = len({(e.partition, e.id) for e in handler.started})
    assert totals.handled == unique
    assert totals.replays == 200
    assert totals.consumed == 400


def test_a_revoke_that_stops_waiting_keeps_the_claim_of_the_call_still_running(
    rig: Callable[..., Rig],
) -> None:
    """Claim mode: a call still running when the revocation stops waiting may yet have
    its effect; the next owner must find its claim (uncertain), not an unseen event."""
    release = threading.Event()
    started = threading.Event()

    class Stuck(Recorder):
        def handle(self, event: Event) -> None:
            super().handle(event)
            if event.id == "slow":
                started.set()
                release.wait(10)

    r = rig(Stuck(), processing={"mode": "claim", "concurrency": 2})
    r.engine.walk_budget_s = 0.3  # how long the revocation waits for running calls
    revoked: list[dict[TopicPartition, int]] = []

    def keep_alive() -> None:
        if started.is_set() and not revoked:
            revoked.append(r.engine.release([TP0]))

    try:
        msgs = [
            rec(0, "a", key=b"k1"),
            rec(1, "slow", key=b"k2"),
            rec(2, "after", key=b"k2"),  # same key: waits behind "slow", never starts
        ]
        result = r.engine.process(msgs, keep_alive)
        assert revoked == [{TP0: 1}]  # only "a" (offset 0) is settled and committed
        assert result.commits == {}  # nothing of the partition after its revocation
        assert r.store is not None
        slow, after = r.store.lookup(TP0, ["slow", "after"], 1_800_000_000_000)
        assert slow is not None and slow.status is RecordStatus.IN_PROGRESS
        assert after is None  # never started: its claim is withdrawn
    finally:
        release.set()
