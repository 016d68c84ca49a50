"""Defects an adversarial review of the concurrent engine reproduced (issue 13).

Engine only: real RocksDB, dead letters in memory, no broker.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dedupe_consumer import Event, Handler, PermanentError
from dedupe_consumer.dead_letters import MemoryDeadLetters
from dedupe_consumer.engine import Engine
from dedupe_consumer.errors import DeadLetterError
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import RocksStore

from .conftest import TOPIC, make_settings, rec

TP0 = TopicPartition(TOPIC, 0)


def engine_for(
    tmp_path: Path, handler: Handler, dead: MemoryDeadLetters | None = None, **processing: Any
) -> tuple[Engine, RocksStore]:
    s = make_settings(tmp_path / "state", processing=processing)
    store = RocksStore(s.store.path, retention_ms=int(s.dedupe.retention.total_seconds() * 1000))
    engine = Engine(
        handler,
        s.dedupe,
        s.processing,
        store,
        dead or MemoryDeadLetters(),
        sweep_keys=s.store.sweep_keys,
        revoked_state_grace=s.store.revoked_state_grace,
    )
    engine.assign([TP0])
    return engine, store


class LosesLetters(MemoryDeadLetters):
    def flush(self) -> None:
        if self.letters:
            failed = tuple((TOPIC, 0, m.message.offset() or 0) for m in self.letters)
            self.letters.clear()
            raise DeadLetterError("the dead-letter topic is gone", failed)


def test_a_lost_dead_letter_above_a_gap_never_moves_the_watermark_over_the_gap(
    tmp_path: Path,
) -> None:
    ran: list[str] = []
    stopped: list[Engine] = []

    class StopDuringA0(Handler):
        def handle(self, event: Event) -> None:
            ran.append(event.id)
            if event.id == "a0":
                time.sleep(0.3)
                stopped[0].request_stop()  # SIGTERM while a0 runs: a1 never starts
            if event.id == "b2":
                raise PermanentError("poison")

    engine, store = engine_for(tmp_path, StopDuringA0(), LosesLetters(), concurrency=2)
    stopped.append(engine)
    try:
        msgs = [rec(0, "a0", key=b"a"), rec(1, "a1", key=b"a"), rec(2, "b2", key=b"b")]
        result = engine.process(msgs)
        assert "a1" not in ran
        assert store.watermark(TP0) == 0  # offset 1 (a1) was never decided
        assert result.commits == {TP0: 1}
    finally:
        engine.close()
        store.close()


class Hang(Handler):
    def __init__(self) -> None:
        self.release = threading.Event()
        self.torn_down = False

    def handle(self, event: Event) -> None:
        self.release.wait(20)

    def teardown(self) -> None:
        self.torn_down = True


def test_a_stop_does_not_wait_for_ever_on_a_hung_call(tmp_path: Path) -> None:
    handler = Hang()
    engine, store = engine_for(tmp_path, handler)
    engine.walk_budget_s = 0.5  # how long a stop waits for running calls
    results: list[Any] = []
    walk = threading.Thread(
        target=lambda: results.append(engine.process([rec(0, "a"), rec(1, "b")], lambda: None)),
        daemon=True,
    )
    try:
        walk.start()
        time.sleep(0.3)
        engine.request_stop()
        walk.join(5)
        assert not walk.is_alive(), "process() still waits on a hung call after a stop"
        assert results[0].commits == {}  # the hung event stays undecided: read again
        assert store.watermark(TP0) is None
    finally:
        handler.release.set()
        engine.close()
        store.close()


def test_teardown_is_not_queued_for_ever_behind_a_hung_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dedupe_consumer.engine._TEARDOWN_WAIT_S", 0.5)
    handler = Hang()
    engine, store = engine_for(tmp_path, handler)  # concurrency 1: one worker, held
    walk = threading.Thread(target=lambda: engine.process([rec(0, "a")]), daemon=True)
    try:
        walk.start()
        time.sleep(0.3)
        teardown = threading.Thread(target=engine.teardown_handler, daemon=True)
        teardown.start()
        teardown.join(5)
        assert not teardown.is_alive(), "teardown_handler blocks behind the hung call"
        assert not handler.torn_down
    finally:
        handler.release.set()
        walk.join(5)
        engine.close()
        store.close()


class Counter(Handler):
    """Every event adds 1 to one shared effect key (a per-merchant total, say)."""

    def handle(self, event: Event) -> None:
        total = int(event.staged(b"total") or b"0")
        time.sleep(0.02)
        event.stage(b"total", str(total + 1).encode())


def test_an_effect_key_shared_across_keys_is_exact_in_partition_order(tmp_path: Path) -> None:
    """Under key ordering, lanes of other keys do not see each other's staged writes
    (docs/concurrency.md): an effect key written by events of many keys needs
    ``ordering = "partition"``, where the count is exact."""
    engine, store = engine_for(tmp_path, Counter(), concurrency=8, ordering="partition")
    try:
        engine.process([rec(i, f"e{i}") for i in range(8)])
        assert store.effect(TP0, b"total") == b"8"
    finally:
        engine.close()
        store.close()


def test_async_handlers_leave_no_descriptors_behind(tmp_path: Path) -> None:
    import os

    class Async(Handler):
        async def handle(self, event: Event) -> None:
            return None

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for n in range(5):
        engine, store = engine_for(tmp_path / str(n), Async())
        engine.process([rec(0, "a")])
        engine.close()
        store.close()
    assert open_fds() <= before + 2  # the event loop's selector and self-pipe are closed
