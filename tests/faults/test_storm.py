"""The rebalance storm, short: three consumer processes in one group, each with its own
store, restarted with SIGTERM in turn and SIGKILLed while events flow.

17 s of production (150 messages/s, 10% re-sends of IDs first sent 6 s or more
before) on six partitions, four faults: three SIGTERM restarts (the first one
restarts its consumer armed with a crash point, after a handler call, where it
SIGKILLs itself: inside the window a kill may repeat) and one SIGKILL at a random
moment; then a drain. Plain mode and transactional effects. ``bench/storm.py``
runs the same for minutes (docs/benchmarks.md). How each repeated call is charged
to a SIGKILL window or to a graceful move is in ``tests/faults/storm.py``; the
first test checks that charging on its own.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from .storm import Storm, StormOutcome, attribute_repeats, run_storm
from .suite import MODES, Mode

STORM = Storm(
    consumers=3,
    partitions=6,
    duration_s=17,
    rate=150,
    resend=0.1,
    resend_age_s=6,
    fault_every_s=4,
    kill_share=0.4,
    point_share=0.5,
    crash_points=("after_handler",),  # a plain-mode kill there repeats that batch's calls
    restart_after_s=(0.5, 2.0),
    seed=1,  # faults at 2.3 s (a restart armed with a crash point), 7.7, 12.7 (SIGKILL), 15.7
    drain_timeout_s=90,
)
STORM_MODES = [m for m in MODES if m.name in ("plain", "transactional")]


def test_a_repeat_is_charged_to_a_kill_only_when_the_killed_process_made_the_call_last() -> None:
    """What a real bug would produce is charged to a graceful move: a repeat of a call
    made by a process that stopped gracefully, or made by a killed one long before its
    end (outside the window a kill may repeat), or made twice by one process."""
    killed = {"c0.0"}
    early = [(f"e{n}", "c0.0") for n in range(10)]  # c0.0's first ten calls
    calls = [
        *early,
        ("tail", "c0.0"),  # c0.0's last call before its SIGKILL
        ("moved", "c1.0"),  # c1.0 stops gracefully
        ("tail", "c2.0"),  # within the kill window: a documented repeat
        ("moved", "c2.0"),  # across a graceful move: a bug
        ("e0", "c2.0"),  # c0.0's first call, 10 calls before its end: outside a 5-call window
        ("twice", "c2.0"),
        ("twice", "c2.0"),  # one process, twice: a bug
    ]
    out = attribute_repeats(calls, killed, bound=5)
    assert (out.after_kill, out.per_kill) == (1, {"c0.0": 1})
    assert out.graceful == {
        "e0": ["c0.0", "c2.0"],
        "moved": ["c1.0", "c2.0"],
        "twice": ["c2.0", "c2.0"],
    }
    assert out.graceful_calls == 3
    # With a window as long as the killed process's calls, its first call is in it too.
    assert attribute_repeats(calls, killed, bound=11).after_kill == 2


def check(out: StormOutcome, mode: Mode) -> None:
    print(out.row(), out.notes)
    # The storm happened: restarts, kills, rebalances, state moved, old IDs re-sent.
    assert out.terms >= 2 and out.kills >= 2 and out.point_kills >= 1, out.faults
    assert out.rebalances >= 3
    assert out.restored_records > 0, "no partition state was restored from the changelog"
    assert out.resends > 0
    # Every consumer obeyed its SIGTERM and none died by itself; all caught up.
    assert out.crashes == 0 and out.stop_timeouts == 0, out.notes
    for incarnation in out.incarnations:
        if incarnation.end in ("term", "final"):
            assert incarnation.exit_code == 0, incarnation
        else:
            assert incarnation.end in ("kill", "term-early"), incarnation
            assert incarnation.exit_code in (-signal.SIGKILL, -signal.SIGTERM), incarnation
    assert out.catch_up_s is not None, f"never caught up: lag {out.final_lag}"

    assert out.lost == [], f"{len(out.lost)} lost, e.g. {out.lost[:3]}"
    assert out.dead_lettered == set()
    assert out.repeats.graceful == {}, "repeated across a graceful move (ID: tags of its calls)"
    assert all(n <= out.repeat_bound for n in out.repeats.per_kill.values()), out.repeats
    if mode.transactional:
        assert out.duplicate_effects == {}
    else:  # plain: every repeated effect is a repeated call, charged to a kill above
        assert sum(n - 1 for n in out.duplicate_effects.values()) == out.repeats.after_kill


@pytest.mark.kafka
@pytest.mark.parametrize("mode", STORM_MODES, ids=[m.name for m in STORM_MODES])
def test_a_storm_of_restarts_and_kills_loses_nothing_and_repeats_only_after_kills(
    kafka_bootstrap: str, tmp_path: Path, mode: Mode
) -> None:
    out = run_storm(kafka_bootstrap, tmp_path, mode, STORM)
    check(out, mode)
