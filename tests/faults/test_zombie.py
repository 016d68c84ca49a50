"""A zombie owner is fenced: its changelog transaction never becomes visible.

Two real consumer processes in one group, transactional effects (``event.stage``).
Instance A stops itself (SIGSTOP); after its session times out, B takes the
partitions and handles everything; then A is woken (SIGCONT) with the stale group
generation. Two places to stop:

- ``before_persist``: the batch is walked, its transaction not yet begun. A's first
  act on waking is the transaction; it carries the source offsets (KIP-447), so the
  broker rejects it and A aborts. Always fenced.
- ``in_handler``: in the middle of a batch. Woken, A may learn from the group that
  its partitions are lost (the poll that keeps the membership runs while handlers
  do) and drop the batch, or reach its transaction first and be fenced; both are
  right, and which comes first is a race, so either is accepted.

Either way none of A's records (decisions, staged effects, release tombstones,
watermark) is visible to a read_committed restore, and no event takes effect twice.
"""

from __future__ import annotations

import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest

from dedupe_consumer.config import KafkaConnection
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import RocksStore
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import committed_offsets, end_offsets, produce_events, wait_for
from .consumer_process import effects_of, log_tail, start_consumer, write_config

pytestmark = pytest.mark.kafka
HANDLER = "tests.faults.handlers:PausingLedger"
PARTITIONS = 2
# A zombie woken in a handler call: fenced at its transaction, told by the group first, or
# stopped with a clear error when it was frozen in the middle of its pipelined transaction.
_EITHER = ("changelog_fenced", "lost_during_walk", "partitions_lost", "persist_failed")


def stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("T")


@pytest.mark.parametrize("stop_at", ["before_persist", "in_handler"])
def test_a_paused_old_owner_is_fenced_and_its_batch_never_becomes_visible(
    stop_at: str,
    kafka_bootstrap: str,
    kafka_topic: TopicFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = kafka_topic(partitions=PARTITIONS)
    sent = produce_events(kafka_bootstrap, topic, 300, duplicates=0.1, seed=71)
    unique = set(sent)
    group = f"{topic}-group"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config_a = write_config(tmp_path / "a", kafka_bootstrap, topic, batch=50)
    config_b = write_config(tmp_path / "b", kafka_bootstrap, topic, batch=50)
    paused = tmp_path / "paused"

    if stop_at == "in_handler":
        # A's open transaction is aborted by the broker after transaction.timeout.ms: 15 s
        # instead of librdkafka's 60 s keeps B's wait (below) short; the case is the same.
        with config_a.open("a", encoding="utf-8") as config:
            config.write('[kafka.producer]\n"transaction.timeout.ms" = 15000\n')
        monkeypatch.setenv("DEDUPE_TEST_PAUSE_AT", "120")
        monkeypatch.setenv("DEDUPE_TEST_PAUSED", str(paused))
        a = start_consumer(config_a, tmp_path / "a-calls", handler=HANDLER)
        monkeypatch.delenv("DEDUPE_TEST_PAUSE_AT")
    else:  # the third batch, walked, stops before its transaction
        monkeypatch.setenv("DEDUPE_FAULT_SIGNAL", "SIGSTOP")
        a = start_consumer(
            config_a, tmp_path / "a-calls", handler=HANDLER, fault="before_persist", after=3
        )
        monkeypatch.delenv("DEDUPE_FAULT_SIGNAL")
    b = None
    outcomes = ("changelog_fenced",) if stop_at == "before_persist" else _EITHER
    try:
        if stop_at == "in_handler":
            wait_for(paused.exists, 60, "A to stop itself in the middle of a batch")
        wait_for(lambda: stopped(a.pid), 60, "A to be stopped")
        calls_before = sum(effects_of(tmp_path / "a-calls").values())
        # B joins; A cannot answer, so its session (6 s) times out and B gets everything.
        # Stopped in a handler call, A may hold its pipelined write's transaction open:
        # B's read_committed restore then waits until the broker aborts it
        # (transaction.timeout.ms, 15 s here), as any exactly-once reader would.
        b = start_consumer(config_b, tmp_path / "b-calls", handler=HANDLER)
        wait_for(
            lambda: (
                committed_offsets(kafka_bootstrap, group, topic, PARTITIONS)
                == end_offsets(kafka_bootstrap, topic, PARTITIONS)
            ),
            60 if stop_at == "before_persist" else 150,
            "B to take over and commit every partition to its end",
        )
        a.send_signal(signal.SIGCONT)  # the zombie goes on with its batch
        wait_for(
            lambda: any(o in log_tail(config_a, 100_000) for o in outcomes),
            30,
            f"A to be fenced or to learn it lost its partitions ({outcomes})",
        )
        time.sleep(2)  # let A go through the rebalance it now joins
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        a.wait(timeout=60)
        if b is not None:
            b.wait(timeout=60)
    log_a = log_tail(config_a, 100_000)
    if stop_at == "in_handler" and a.returncode != 0:
        # Frozen in a handler call while the batch before was in its transaction (the
        # write is pipelined): on waking, librdkafka may time the request out, or the
        # frozen call may count as stuck and its producer be replaced (fencing it). The
        # transaction is aborted and A stops with a clear error. Nothing of it is
        # visible (checked below); a restart rejoins as any member would.
        assert "persist_failed" in log_a, log_tail(config_a)
    else:
        assert a.returncode == 0, log_tail(config_a)  # fenced is not fatal: no crash loop
    assert b is not None and b.returncode == 0, log_tail(config_b)
    assert any(o in log_a for o in outcomes), log_tail(config_a)
    if stop_at == "before_persist":
        # A's batch was handled before it stopped: the fenced transaction held effects.
        assert calls_before > 100, calls_before
    elif "changelog_fenced" in log_a:
        # A really did handle events after waking, in the batch that was fenced.
        assert sum(effects_of(tmp_path / "a-calls").values()) > 120

    # What any next owner would restore: read_committed, through the real restore path.
    changelog = Changelog(
        KafkaConnection(bootstrap_servers=kafka_bootstrap),
        group,
        timedelta(days=7),
        f"check-{topic}",
    )
    store = RocksStore(tmp_path / "check", retention_ms=10**12)
    try:
        total = 0
        for p in range(PARTITIONS):
            tp = TopicPartition(topic, p)
            changelog.restore(tp, store)
            total += int(store.effect(tp, b"total") or b"0")
            counts = {i: store.effect(tp, b"count:" + i.encode()) for i in unique}
            assert all(v in (None, b"1") for v in counts.values()), counts
        effects = {
            i: [store.effect(TopicPartition(topic, p), b"count:" + i.encode()) for p in range(2)]
            for i in unique
        }
        assert all(v.count(b"1") == 1 for v in effects.values())  # each ID took effect once
        # A stale total from the zombie would have overwritten a newer one.
        assert total == len(unique)
    finally:
        store.close()
        changelog.close()
