"""The concurrent engine's bookkeeping: lane order, no deadlock, settled prefix."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dedupe_consumer.scheduling import Lanes, Progress

lane_sets = st.lists(
    st.lists(st.sampled_from("abcdef"), min_size=1, max_size=3), min_size=1, max_size=60
)


@settings(max_examples=200, deadline=None)
@given(lane_sets, st.integers(min_value=1, max_value=8), st.randoms(use_true_random=False))
def test_lanes_run_in_submission_order_one_at_a_time_and_never_deadlock(
    submitted: list[list[str]], concurrency: int, rnd: random.Random
) -> None:
    lanes: Lanes[int] = Lanes()
    for n, names in enumerate(submitted):
        lanes.submit(n, names)
    running: list[int] = []
    started: list[int] = []
    tickets = {}
    while len(started) < len(submitted):
        for ticket in lanes.take(concurrency - len(running)):
            tickets[ticket.item] = ticket
            # nothing running shares a lane with a ticket that starts
            for other in running:
                assert not set(tickets[other].lanes) & set(ticket.lanes)
            running.append(ticket.item)
            started.append(ticket.item)
        assert running, "deadlock: nothing runs while tickets wait"
        done = running.pop(rnd.randrange(len(running)))
        lanes.finish(tickets[done])
    for name in "abcdef":
        order = [n for n in started if name in submitted[n]]
        assert order == sorted(order)
    assert lanes.waiting == 0


def test_a_dropped_lane_gives_back_its_waiting_tickets_only() -> None:
    lanes: Lanes[str] = Lanes()
    first = lanes.submit("p0-a", [("p0", "a")])
    lanes.submit("p0-a2", [("p0", "a")])
    lanes.submit("p1-a", [("p1", "a")])
    assert [t.item for t in lanes.take(1)] == ["p0-a"]
    dropped = lanes.drop([("p0", "a")])
    assert [t.item for t in dropped] == ["p0-a2"]
    lanes.finish(first)  # a started ticket of a dropped lane still finishes quietly
    assert [t.item for t in lanes.take(5)] == ["p1-a"]
    assert lanes.waiting == 0


def test_a_ticket_needs_a_lane() -> None:
    with pytest.raises(ValueError, match="at least one lane"):
        Lanes[int]().submit(1, [])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=50),
    st.randoms(use_true_random=False),
)
def test_settled_is_the_end_of_the_contiguous_decided_run(
    gaps: list[int], rnd: random.Random
) -> None:
    offsets, offset = [], 10
    for gap in gaps:  # Kafka skips numbers (transaction markers): gaps between taken offsets
        offsets.append(offset)
        offset += gap
    progress = Progress(settled=9)
    for o in offsets:
        progress.take(o)
    decided: set[int] = set()
    for o in rnd.sample(offsets, len(offsets)):
        decided.add(o)
        expected = 9
        for taken in offsets:
            if taken not in decided:
                break
            expected = taken
        assert progress.decide(o) == expected
        assert progress.open == len(offsets) - sum(1 for t in offsets if t <= expected)
    assert progress.first_open is None
    assert progress.settled == offsets[-1]


def test_offsets_must_be_taken_in_increasing_order() -> None:
    progress = Progress(settled=4)
    with pytest.raises(ValueError, match="must increase"):
        progress.take(4)
    progress.take(7)
    with pytest.raises(ValueError, match="must increase"):
        progress.take(6)
