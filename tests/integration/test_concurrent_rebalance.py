"""A rebalance while handler calls run in parallel (issue 13), on a real broker.

A second instance joins the group while the first one has calls in flight. The
first one's revoke stops starting events of the revoked partitions, waits for
their running calls, persists and commits what they decided, and lets go: no
event of a revoked partition is started or finished by the old owner after its
revoke returned, and every event ID is handled exactly once across both
instances (plain mode: a repeat would be visible).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from dedupe_consumer import DedupeConsumer, Event, Handler
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import committed_offsets, end_offsets, produce_events, settings_for

pytestmark = pytest.mark.kafka

PARTITIONS = 4
EVENTS = 80
CALL_S = 0.3


@dataclass(frozen=True)
class Call:
    who: str
    event_id: str
    partition: int
    started: float
    ended: float


class Slow(Handler):
    """Each call takes CALL_S; every call is noted with its instance and times."""

    def __init__(self, who: str, calls: list[Call], lock: threading.Lock) -> None:
        self.who = who
        self.calls = calls
        self.lock = lock

    def handle(self, event: Event) -> None:
        started = time.monotonic()
        time.sleep(CALL_S)
        with self.lock:
            self.calls.append(Call(self.who, event.id, event.partition, started, time.monotonic()))


@dataclass
class Ownership:
    """When an instance was told it got or lost partitions (monotonic times)."""

    events: list[tuple[float, str, frozenset[int]]]

    def hook(self, what: str) -> Callable[[Sequence[TopicPartition]], None]:
        def note(tps: Sequence[TopicPartition]) -> None:
            self.events.append((time.monotonic(), what, frozenset(tp.partition for tp in tps)))

        return note

    def timeline(self, t0: float) -> list[tuple[float, str, list[int]]]:
        return [(round(t - t0, 2), what, sorted(parts)) for t, what, parts in self.events]

    def held(self, partition: int, at: float) -> bool:
        """Whether the partition was this instance's at time ``at`` (from the hooks)."""
        owned = False
        for when, what, parts in self.events:
            if when > at:
                break
            if partition in parts:
                owned = what == "assign"
        return owned


def test_a_member_joining_mid_batch_takes_over_without_a_repeat_or_a_late_decision(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=PARTITIONS)
    sent = produce_events(kafka_bootstrap, topic, EVENTS, duplicates=0.0, seed=31)
    calls: list[Call] = []
    lock = threading.Lock()
    owners = {"A": Ownership([]), "B": Ownership([])}
    consumers: dict[str, DedupeConsumer] = {}
    errors: list[BaseException] = []
    threads: list[threading.Thread] = []
    group = f"g-{topic}"
    t0 = time.monotonic()
    deadline = t0 + 60

    def start(who: str) -> None:
        settings = settings_for(
            kafka_bootstrap,
            topic,
            tmp_path / who,
            group=group,
            processing={"concurrency": 4, "batch_size": 500},
        )
        consumer = consumers[who] = DedupeConsumer(Slow(who, calls, lock), settings)
        ownership = owners[who]
        consumer.on_assign(ownership.hook("assign"))
        consumer.on_revoke(ownership.hook("revoke"))
        consumer.on_lost(ownership.hook("lost"))

        def target() -> None:
            try:
                consumer.run(install_signal_handlers=False)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=target, name=f"consumer-{who}", daemon=True)
        threads.append(thread)
        thread.start()

    def handled() -> int:
        with lock:
            return len(calls)

    try:
        start("A")
        while handled() < 8 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        assert handled() >= 8, "A never got going"
        start("B")  # A has a batch of about 80 events with 4 calls in flight now
        done = False
        while time.monotonic() < deadline and not errors:
            if len({c.event_id for c in calls}) >= len(set(sent)) and committed_offsets(
                kafka_bootstrap, group, topic, PARTITIONS
            ) == end_offsets(kafka_bootstrap, topic, PARTITIONS):
                done = True
                break
            time.sleep(0.5)
    finally:
        stacks = _stacks(threads)
        for consumer in consumers.values():
            consumer.stop()
        for thread in threads:
            thread.join(60)
    assert errors == []
    assert not any(t.is_alive() for t in threads), "a consumer did not stop"
    assert done, (
        f"not finished: {len(calls)} calls of {len(set(sent))} IDs; committed "
        f"{committed_offsets(kafka_bootstrap, group, topic, PARTITIONS)} of "
        f"{end_offsets(kafka_bootstrap, topic, PARTITIONS)}; calls per (who, partition) "
        f"{sorted(Counter((c.who, c.partition) for c in calls).items())}; hooks "
        f"{ {w: o.timeline(t0) for w, o in owners.items()} }\n"
        f"{stacks}"
    )

    assert any(what == "revoke" for _, what, _ in owners["A"].events), "no rebalance happened"
    assert {c.who for c in calls} == {"A", "B"}, "B never took anything over"
    # Each ID once across both instances.
    by_id: dict[str, list[Call]] = {}
    for c in calls:
        by_id.setdefault(c.event_id, []).append(c)
    repeats = {i: [(c.who, c.partition) for c in cs] for i, cs in by_id.items() if len(cs) > 1}
    assert repeats == {}
    assert sorted(by_id) == sorted(set(sent))
    # No call started or finished by an instance on a partition it did not hold then.
    late = [
        c
        for c in calls
        if not owners[c.who].held(c.partition, c.started)
        or not owners[c.who].held(c.partition, c.ended)
    ]
    assert late == [], f"{len(late)} calls outside the ownership, first: {late[:3]}"


def _stacks(threads: Sequence[threading.Thread]) -> str:
    """Where each consumer thread is now (for a failure message)."""
    frames = sys._current_frames()
    out = []
    for thread in threads:
        frame = frames.get(thread.ident or -1)
        if frame is not None:
            out.append(f"{thread.name}:\n{''.join(traceback.format_stack(frame)[-8:])}")
    return "\n".join(out)
