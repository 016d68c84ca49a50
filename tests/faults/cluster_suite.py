"""Broker faults on a three-node cluster while events flow through a real consumer process.

Shared by ``tests/faults/test_cluster.py`` (CI: short) and ``bench/broker_faults.py``
(50k events per fault and mode). One run: a topic with replication factor 3 on a
:class:`~dedupe_consumer.testing.LocalKafkaCluster`, a part of the events produced
up front and the rest paced from a thread while the consumer
(``python -m dedupe_consumer run``, as in the kill suite) works through them; once
it has handled some, one fault:

- ``leader``: SIGKILL the leader of the busiest partition (most events not yet
  committed by the group), restart it;
- ``controller``: SIGKILL the active controller (the KRaft quorum's leader), restart it;
- ``rolling``: restart all three nodes one after the other (SIGTERM, each after the
  cluster is fully replicated again).

Then the consumer finishes the topic and is stopped with SIGTERM, and the effects are
checked with the kill suite's :func:`~tests.faults.suite.measure`: lost (must be 0),
duplicate effects (0 with claim+reconcile and transactional effects; in plain mode at
most :func:`~tests.faults.suite.plain_repeat_bound` per node stopped). The consumer is
never killed here: a consumer that exits during a fault is a finding, restarted (as a
supervisor would) and counted.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dedupe_consumer import Settings
from dedupe_consumer.testing import LocalKafkaCluster

from ..kafka_helpers import committed_offsets, end_offsets
from .consumer_process import log_tail
from .suite import PARTITIONS, Mode, Outcome, measure, plain_repeat_bound, produce, start_run

Fault = Literal["leader", "controller", "rolling"]
FAULTS: tuple[Fault, ...] = ("leader", "controller", "rolling")

CLUSTER_MODES = [
    Mode("plain"),
    Mode("claim+reconcile", "claim", "reconcile", "tests.faults.handlers:ReconcilingHandler"),
    Mode("transactional", handler="tests.faults.handlers:LedgerHandler", transactional=True),
]
"""The three modes the issue measures under broker faults."""

DOWN_S = 5.0
"""How long a SIGKILLed node stays down before it is started again."""


@dataclass
class FaultOutcome:
    fault: str
    outcome: Outcome
    topic: str = ""
    nodes_stopped: int = 0
    killed_node: int | None = None
    """``leader``/``controller``: the node id SIGKILLed."""
    partition: int | None = None
    """``leader``: the busiest partition, whose leader was killed."""
    fault_s: float = 0.0
    """From the first signal to the cluster fully replicated again."""
    drained_s: float = 0.0
    """From the first signal until the group committed every offset of the topic."""
    longest_pause_s: float = 0.0
    """The longest time, between the fault and the drain, without a new handler call
    while produced IDs were waiting for one (time with nothing to do is no pause)."""
    consumer_exits: list[int] = field(default_factory=list)
    """Exit codes of consumer processes that ended on their own (restarted each time)."""

    def bound(self, mode: Mode, batch: int) -> int:
        """Repeated handler calls allowed: 0 outside plain mode; in plain mode the kill
        suite's per-crash bound for each node stopped and each consumer exit."""
        if mode.mode != "plain" or mode.transactional:
            return 0
        crashes = self.nodes_stopped + len(self.consumer_exits)
        return crashes * plain_repeat_bound(mode, batch, self.outcome.max_unpersisted)

    @property
    def extra_calls(self) -> int:
        return sum(n - 1 for n in self.outcome.duplicate_effects.values())

    def row(self, mode: Mode, batch: int) -> dict[str, object]:
        return {
            "fault": self.fault,
            "mode": self.outcome.mode,
            "events": self.outcome.events,
            "lost": len(self.outcome.lost),
            "duplicate effects": self.extra_calls,
            "allowed": self.bound(mode, batch),
            "fault s": round(self.fault_s, 1),
            "drained s": round(self.drained_s, 1),
            "longest pause s": round(self.longest_pause_s, 1),
            "consumer exits": len(self.consumer_exits),
        }


def _busiest_partition(bootstrap: str, topic: str, group: str) -> int:
    committed = committed_offsets(bootstrap, group, topic, PARTITIONS)
    ends = end_offsets(bootstrap, topic, PARTITIONS)
    return max(range(PARTITIONS), key=lambda p: ends[p] - max(committed[p], 0))


def run_broker_fault(
    cluster: LocalKafkaCluster,
    workdir: Path,
    mode: Mode,
    fault: Fault,
    *,
    events: int,
    duplicates: float = 0.1,
    seed: int = 1,
    batch: int = 100,
    upfront: float = 0.4,
    rate: float = 1500.0,
    fault_after: float = 0.15,
    timeout_s: float = 300.0,
    static_member: bool = False,
    down_s: float = DOWN_S,
) -> FaultOutcome:
    """Produce ``events`` (``upfront`` of them before the consumer starts, the rest at
    ``rate`` per second from a thread), fault the cluster once the consumer handled
    ``fault_after`` of them (a killed node stays down ``down_s``), let it drain, check.
    Returns what was measured.

    ``static_member``: the consumer joins with a ``group.instance.id`` (as in the kill
    suite). With the suite's 6 s session, a coordinator that moves with a killed node
    can take longer than that to answer; librdkafka then rejoins and is fenced by its
    own instance id (``FENCED_INSTANCE_ID``, fatal: librdkafka issue 3437), and the
    consumer exits (counted in ``consumer_exits``)."""
    bootstrap = cluster.bootstrap_servers
    first = max(1, int(events * upfront))
    run = start_run(
        bootstrap,
        workdir,
        mode,
        topic_prefix=f"faults-{fault}",
        events=first,
        duplicates=duplicates,
        seed=seed,
        batch=batch,
        timeout_s=timeout_s,
        static_member=static_member,
        replication=cluster.replication_factor,
    )
    topic, group, sent, config, outcome = run.topic, run.group, run.sent, run.config, run.outcome
    assert Settings.from_toml(config).store.changelog  # state and offsets in transactions
    known = list(dict.fromkeys(sent))
    flushed = [len(known)]
    """Unique IDs that are in the topic (their produce call returned)."""
    lock = threading.Lock()
    producing_failed: list[BaseException] = []

    def produce_rest() -> None:
        rng = random.Random(seed)
        left, chunk = events - first, max(100, int(rate / 4))
        try:
            while left > 0:
                started = time.monotonic()
                n = min(chunk, left)
                more = produce(bootstrap, topic, n, duplicates, rng.randrange(1 << 30), ids=known)
                with lock:
                    sent.extend(more)
                flushed[0] = len(known)
                left -= n
                time.sleep(max(0.0, n / rate - (time.monotonic() - started)))
        except BaseException as exc:  # the main thread fails the run with it
            producing_failed.append(exc)

    effects = run.effects
    result = FaultOutcome(fault, outcome, topic)
    deadline = run.deadline

    def calls() -> int:
        """Handler calls so far: the effects file holds one 36-character ID and a newline
        per call (its size, not its lines: this is asked four times a second)."""
        try:
            return effects.stat().st_size // 37
        except FileNotFoundError:
            return 0

    def drained() -> bool:
        if producer.is_alive():
            return False
        return committed_offsets(bootstrap, group, topic, PARTITIONS) == end_offsets(
            bootstrap, topic, PARTITIONS
        )

    procs = [run.start_consumer()]
    """The consumer process; a new one is appended when one exits on its own."""
    producer = threading.Thread(target=produce_rest, name="produce-rest", daemon=True)
    producer.start()
    watching = threading.Event()
    watch_errors: list[BaseException] = []

    def watch() -> None:
        """Measure the longest pause in handler calls while IDs wait for one, and
        restart a consumer that exited on its own (as a supervisor would: a finding,
        counted). Each unique ID in the topic (``flushed``) takes one handler call in
        every mode here."""
        try:
            last_calls, last_change = calls(), time.monotonic()
            while watching.is_set():
                now, current = time.monotonic(), calls()
                if current != last_calls or current >= flushed[0]:
                    last_calls, last_change = current, now
                result.longest_pause_s = max(result.longest_pause_s, now - last_change)
                code = procs[-1].poll()
                if code is not None:
                    result.consumer_exits.append(code)
                    outcome.notes.append(
                        f"consumer exited with {code} during the run:\n{log_tail(config, 6000)}"
                    )
                    procs.append(run.start_consumer())
                time.sleep(0.25)
        except BaseException as exc:  # told to the main thread
            watch_errors.append(exc)

    watcher = threading.Thread(target=watch, name="watch-consumer", daemon=True)
    try:
        while calls() < fault_after * events:
            if procs[-1].poll() is not None:
                raise AssertionError(f"the consumer exited before the fault:\n{log_tail(config)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no progress before the fault:\n{log_tail(config)}")
            time.sleep(0.2)

        # The fault runs on this (the main) thread: a node started again from another
        # thread would not get LocalKafka's die-with-parent signal.
        watching.set()
        watcher.start()
        started = time.monotonic()
        if fault == "leader":
            result.partition = _busiest_partition(bootstrap, topic, group)
            result.killed_node = cluster.leader(topic, result.partition)
        elif fault == "controller":
            result.killed_node = cluster.active_controller()
        if result.killed_node is not None:
            node = cluster.node(result.killed_node)
            node.stop_process(graceful=False)
            result.nodes_stopped = 1
            time.sleep(down_s)
            node.start_process()
            cluster.wait_until_registered()
            cluster.wait_fully_replicated()
        else:
            cluster.rolling_restart(graceful=True)
            result.nodes_stopped = len(cluster.nodes)
        result.fault_s = time.monotonic() - started
        while not drained():
            if watch_errors:
                raise watch_errors[0]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not drained {timeout_s:.0f} s after the start:\n{log_tail(config)}"
                )
            time.sleep(0.25)
        result.drained_s = time.monotonic() - started
    finally:
        watching.clear()
        if watcher.is_alive():
            watcher.join(timeout=10)
        proc = procs[-1]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                outcome.exit_codes.append(proc.wait(timeout=60))
            except Exception:
                proc.kill()
                proc.wait(timeout=30)
                raise
        producer.join(timeout=120)
    if producing_failed:
        raise producing_failed[0]
    unique = set(sent)
    outcome.events, outcome.unique = len(sent), len(unique)
    outcome.exit_codes = [*result.consumer_exits, *outcome.exit_codes]
    measure(bootstrap, workdir, topic, mode, sent, outcome, run.log)
    return result
