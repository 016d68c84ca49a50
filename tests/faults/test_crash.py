"""Real SIGKILLs of a real consumer process at named crash points, on a real broker.

Each test runs ``python -m dedupe_consumer run`` as a subprocess with an
``AppendHandler`` that records every call outside the store, kills it at a
fault point (``DEDUPE_FAULT_POINT``), restarts it without the fault, then stops
it with SIGTERM and checks the effects file against what was produced.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import committed_offsets, end_offsets, produce_events, wait_for
from .consumer_process import effects_of, log_tail, start_consumer, stop_consumer, write_config
from .suite import MODES, plain_repeat_bound

pytestmark = pytest.mark.kafka
BATCH = 50


def finish(
    proc: subprocess.Popen[bytes],
    config: Path,
    effects: Path,
    unique: set[str],
    bootstrap: str,
    topic: str,
    partitions: int,
) -> None:
    """Wait until every ID took effect and offsets reached the end, then SIGTERM: exit 0."""
    try:
        wait_for(lambda: set(effects_of(effects)) >= unique, 90, "every unique ID to take effect")
        wait_for(
            lambda: (
                committed_offsets(bootstrap, f"{topic}-group", topic, partitions)
                == end_offsets(bootstrap, topic, partitions)
            ),
            60,
            "offsets committed to the end",
        )
    finally:
        stop_consumer(proc)
    assert proc.returncode == 0, log_tail(config)


@pytest.mark.parametrize("point", ["after_persist", "after_commit"])
def test_crash_after_persist_or_commit_repeats_only_the_batch_walked_meanwhile(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path, point: str
) -> None:
    topic = kafka_topic(partitions=2)
    sent = produce_events(kafka_bootstrap, topic, 1000, duplicates=0.1, seed=11)
    config = write_config(tmp_path, kafka_bootstrap, topic, batch=BATCH)
    effects = tmp_path / "effects"

    crashed = start_consumer(config, effects, fault=point, after=4)
    assert crashed.wait(timeout=90) == -signal.SIGKILL
    before = effects_of(effects)
    assert 0 < sum(before.values()) < len(set(sent)), "the crash should land mid-stream"

    finish(start_consumer(config, effects), config, effects, set(sent), kafka_bootstrap, topic, 2)
    calls = effects_of(effects)
    assert set(calls) == set(sent)
    # What was durable never runs again. The write is made durable while the next batch
    # is walked (max_unpersisted = 1: one batch, not more), and that batch may run again.
    repeated = [i for i, n in calls.items() if n > 1]
    assert len(repeated) <= BATCH, len(repeated)


def test_crash_between_handler_and_persist_repeats_at_most_what_was_not_durable(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    sent = produce_events(kafka_bootstrap, topic, 1000, duplicates=0.1, seed=12)
    config = write_config(tmp_path, kafka_bootstrap, topic, batch=BATCH)
    effects = tmp_path / "effects"

    crashed = start_consumer(config, effects, fault="after_handler", after=3 * BATCH + 7)
    assert crashed.wait(timeout=90) == -signal.SIGKILL
    finish(start_consumer(config, effects), config, effects, set(sent), kafka_bootstrap, topic, 1)

    calls = effects_of(effects)
    assert set(calls) == set(sent)  # nothing lost
    repeated = [i for i, n in calls.items() if n > 1]
    # Plain mode's documented window: what was handled and not durable runs again (the
    # batch being written and the batch being walked, with max_unpersisted = 1).
    assert 0 < len(repeated) <= plain_repeat_bound(MODES[0], BATCH)
    assert all(calls[i] == 2 for i in repeated)
