"""Every mode, killed with SIGKILL at random moments and at each fault point.

10k events with 10% duplicates per mode and 5 kills per mode, with
the sequential engine; then plain and claim mode again with handlers in
parallel (concurrency 8 in key order, 4 in partition order) on a smaller topic.
``bench/crash_soak.py`` runs the same with hundreds of kills and more events, and
``--extra`` the modes CI leaves out (``SOAK_ONLY``: each covered here by a harder
mode of its kind).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from .suite import (
    CONCURRENT_MODES,
    EMIT_MODES,
    MODES,
    SCOPE_MODES,
    SOAK_ONLY,
    Mode,
    Outcome,
    plain_repeat_bound,
    run_mode,
)

pytestmark = pytest.mark.kafka
EVENTS = 10_000
CONCURRENT_EVENTS = 5_000
KILLS = 5
BATCH = 100


def check(out: Outcome, mode: Mode) -> None:
    print(out.row())
    assert out.kills >= 3, f"only {out.kills} kills landed: {out.exit_codes}"
    assert out.stalls == 0, out.notes
    assert out.exit_codes[-1] == 0, "the final run must stop cleanly on SIGTERM"
    assert all(c in (0, -signal.SIGKILL) for c in out.exit_codes), out.exit_codes

    if mode.on_uncertain == "skip" and mode.mode == "claim":
        # skip assumes done: an effect can be missing, but only for an uncertain outcome
        assert set(out.lost) <= out.uncertain
    else:
        assert out.lost == [], f"{len(out.lost)} events lost: {out.notes}"

    if mode.emits:  # outputs commit with their decisions: exactly once in every mode
        assert out.duplicate_effects == {}, f"{len(out.duplicate_effects)} outputs repeated"
        assert out.wrong_replies == {}, list(out.wrong_replies.items())[:3]
    elif mode.transactional or (mode.mode == "claim" and mode.on_uncertain != "retry"):
        assert out.duplicate_effects == {}
    elif mode.mode == "claim":  # claim + retry: repeats only for uncertain outcomes
        assert set(out.duplicate_effects) <= out.uncertain
    else:  # plain: each kill repeats at most what was in flight or not yet durable
        extra_calls = sum(n - 1 for n in out.duplicate_effects.values())
        assert extra_calls <= out.kills * plain_repeat_bound(mode, BATCH, out.max_unpersisted)


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_kills_lose_nothing_and_repeat_only_inside_the_documented_window(
    kafka_bootstrap: str, tmp_path: Path, mode: Mode
) -> None:
    out = run_mode(
        kafka_bootstrap,
        tmp_path,
        mode,
        events=EVENTS,
        duplicates=0.1,
        kills=KILLS,
        seed=hash(mode.name) % 1000,
        batch=BATCH,
    )
    check(out, mode)


CI_CONCURRENT_MODES = [m for m in CONCURRENT_MODES if m.name not in SOAK_ONLY]
CI_SCOPE_MODES = [m for m in SCOPE_MODES if m.name not in SOAK_ONLY]
CI_EMIT_MODES = [m for m in EMIT_MODES if m.name not in SOAK_ONLY]


@pytest.mark.parametrize("mode", CI_CONCURRENT_MODES, ids=[m.name for m in CI_CONCURRENT_MODES])
def test_kills_with_parallel_handlers_keep_the_same_guarantees(
    kafka_bootstrap: str, tmp_path: Path, mode: Mode
) -> None:
    assert mode.concurrency > 1
    out = run_mode(
        kafka_bootstrap,
        tmp_path,
        mode,
        events=CONCURRENT_EVENTS,
        duplicates=0.1,
        kills=KILLS,
        seed=sum(map(ord, mode.name)) % 1000,
        batch=BATCH,
        max_unpersisted=2 * BATCH,  # batches gathered into one write while one persists
    )
    check(out, mode)


@pytest.mark.parametrize("mode", CI_SCOPE_MODES, ids=[m.name for m in CI_SCOPE_MODES])
def test_kills_in_topic_scope_keep_the_guarantees_across_partitioners(
    kafka_bootstrap: str, tmp_path: Path, mode: Mode
) -> None:
    """Copies of an ID on two partitions (two partitioners), the hop and the engine
    killed: nothing lost, and repeats only inside the mode's window."""
    out = run_mode(
        kafka_bootstrap,
        tmp_path,
        mode,
        events=CONCURRENT_EVENTS,
        duplicates=0.2,
        kills=KILLS,
        seed=sum(map(ord, mode.name)) % 1000,
        batch=BATCH,
    )
    check(out, mode)


@pytest.mark.parametrize("mode", CI_EMIT_MODES, ids=[m.name for m in CI_EMIT_MODES])
def test_kills_never_lose_or_repeat_an_emitted_output(
    kafka_bootstrap: str, tmp_path: Path, mode: Mode
) -> None:
    """A handler emits one output per input (``event.emit``); SIGKILLs at random and at
    each fault point: a read_committed reader sees exactly one output per unique ID."""
    out = run_mode(
        kafka_bootstrap,
        tmp_path,
        mode,
        events=CONCURRENT_EVENTS,
        duplicates=0.1,
        kills=KILLS,
        seed=sum(map(ord, mode.name)) % 1000,
        batch=BATCH,
        max_unpersisted=2 * BATCH,
    )
    check(out, mode)
