"""``bench/storm.py``'s verdict: what makes it exit 1, without a broker.

It must fail a storm on everything the CI storm test (``tests/faults/test_storm.py``)
fails it on: a bench table that says "0 lost" while events were dead-lettered, or
while a consumer failed its drain on SIGTERM, is not a measurement of the guarantee.
"""

from __future__ import annotations

from bench.storm import verdict
from tests.faults.storm import Incarnation, Storm, StormOutcome, staged_counts
from tests.faults.suite import MODES

PLAIN = next(m for m in MODES if m.name == "plain")


def _clean() -> StormOutcome:
    out = StormOutcome(PLAIN.name, Storm())
    out.catch_up_s = 1.0
    out.incarnations = [Incarnation("c0.0", 0, 100, 0.0, end="final", exit_code=0)]
    return out


def test_a_clean_storm_passes() -> None:
    assert verdict(_clean(), PLAIN) == []


def test_dead_lettered_events_break_the_storm() -> None:
    """``lost`` leaves the dead-lettered IDs out: nothing in the storm is poison, so a
    dead letter is an event that was not handled."""
    out = _clean()
    out.dead_lettered = {"e1"}
    assert verdict(out, PLAIN) != []


def test_a_consumer_that_fails_its_sigterm_drain_breaks_the_storm() -> None:
    """Exit 1 on SIGTERM (the crash fixed in 22e30ce): the drain did not finish."""
    for end in ("term", "final"):
        out = _clean()
        out.incarnations.append(Incarnation("c1.0", 1, 101, 0.0, end=end, exit_code=1))
        assert verdict(out, PLAIN) != [], end


def test_a_count_committed_twice_is_a_duplicate_effect_even_when_it_ends_at_1() -> None:
    """Transactional mode counts the effect with the ledger's ``count:<id>``. A new owner
    that lost the ID's state (with the counter in it) handles the ID again, reads no
    counter and commits ``1`` again: the last value says once, the changelog says the
    effect was committed twice. (A clean storm commits each ID's counter once: 2,385
    IDs, 0 committed twice, in a run of tests/faults/test_storm.py's storm.)"""
    once = [(b"e:count:a", b"1"), (b"d:a", b"x")]
    assert staged_counts(once) == {"a": 1}
    state_lost = [(b"e:count:a", b"1"), (b"e:count:b", b"1"), (b"e:count:a", b"1")]
    assert staged_counts(state_lost)["a"] > 1
    assert staged_counts(state_lost)["b"] == 1
    counted_on = [(b"e:count:a", b"1"), (b"e:count:a", b"2")]
    assert staged_counts(counted_on)["a"] == 2
