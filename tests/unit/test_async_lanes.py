"""Async lanes (driven on the event loop) behave as thread-driven ones: found by review.

Engine only: real RocksDB, dead letters in memory, no broker. Each test compares
what the async driver (``async def handle``) does with what the thread driver
does for the same user code.
"""

from __future__ import annotations

import asyncio
import contextvars
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from dedupe_consumer import Event, Handler, PermanentError
from dedupe_consumer.dead_letters import MemoryDeadLetters
from dedupe_consumer.engine import Engine, payload_digest
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import RocksStore
from dedupe_consumer.store.base import IdRecord, RecordStatus, WriteSet

from .conftest import TOPIC, make_settings, rec

TP0 = TopicPartition(TOPIC, 0)
GUARD_S = 15.0


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


def process_bounded(engine: Engine, msgs: list[Any]) -> tuple[list[Any], list[BaseException]]:
    """engine.process(msgs) on a thread; ([result], []) or ([], [error]); [] [] on a hang."""
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(engine.process(msgs, lambda: None))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(GUARD_S)
    if t.is_alive():
        engine.request_stop()
        t.join(5)
    return results, errors


# -- 1. asyncio.CancelledError raised by the handler ------------------------------------


class CancelledOnce(Handler):
    """Its first attempt ends in asyncio.CancelledError (an inner task of the handler was
    cancelled, or an awaited future was); the retry succeeds."""

    def __init__(self) -> None:
        self.attempts: list[int] = []

    async def handle(self, event: Event) -> None:
        self.attempts.append(event.attempt)
        if event.attempt == 1:
            inner = asyncio.ensure_future(asyncio.sleep(10))
            inner.cancel()
            await inner  # raises asyncio.CancelledError (a BaseException)


class CancelledOnceViaThreadDriver(CancelledOnce):
    """The same coroutine, behind a plain ``def``: the thread driver awaits it."""

    def handle(self, event: Event) -> Any:
        return CancelledOnce.handle(self, event)


def _cancelled_outcome(tmp_path: Path, handler: CancelledOnce) -> tuple[list[Any], list[Any]]:
    engine, store = engine_for(tmp_path, handler, retry_backoff="1ms")
    try:
        return process_bounded(engine, [rec(0, "a")])
    finally:
        engine.close()
        store.close()


def test_thread_driver_retries_a_cancelled_error_from_the_handler(tmp_path: Path) -> None:
    handler = CancelledOnceViaThreadDriver()
    results, errors = _cancelled_outcome(tmp_path, handler)
    assert errors == [] and results[0].commits == {TP0: 1}
    assert handler.attempts == [1, 2]


def test_async_driver_retries_a_cancelled_error_like_the_thread_driver(tmp_path: Path) -> None:
    handler = CancelledOnce()
    results, errors = _cancelled_outcome(tmp_path, handler)
    assert errors == [], f"the consumer crashed on the handler's CancelledError: {errors!r}"
    assert results[0].commits == {TP0: 1}
    assert handler.attempts == [1, 2]


# -- 2./3. a plain-def reconcile next to an async def handle ---------------------------


def _claimed(tmp_path: Path, ids: list[str]) -> list[Any]:
    """Records whose IDs a dead process claimed (in progress, lease long expired)."""
    records = [rec(o, i, key=i.encode()) for o, i in enumerate(ids)]
    s = make_settings(tmp_path / "state")
    store = RocksStore(s.store.path, retention_ms=10**12)
    try:
        old_ms = int(time.time() * 1000) - 3_600_000
        store.persist(
            WriteSet(
                records={
                    TP0: [
                        (
                            (r.key_ or b"").decode(),
                            IdRecord(
                                RecordStatus.IN_PROGRESS,
                                r.offset_,
                                old_ms,
                                payload_digest(r.value_),
                            ),
                        )
                        for r in records
                    ]
                }
            )
        )
    finally:
        store.close()
    return records


class SyncReconcile(Handler):
    def __init__(self, reconcile_raises: BaseException | None = None) -> None:
        self.threads: dict[str, set[int]] = {"setup": set(), "reconcile": set()}
        self.reconcile_raises = reconcile_raises
        self.reconcile_calls = 0

    def setup(self) -> None:
        self.threads["setup"].add(threading.get_ident())

    def reconcile(self, event: Event) -> bool:
        self.reconcile_calls += 1
        self.threads["reconcile"].add(threading.get_ident())
        if self.reconcile_raises is not None:
            raise self.reconcile_raises
        return False

    async def handle(self, event: Event) -> None:
        await asyncio.sleep(0)


def test_a_sync_reconcile_raising_stop_iteration_does_not_hang_the_batch(tmp_path: Path) -> None:
    """asyncio.to_thread cannot carry StopIteration into a Future: the lane waits for ever.

    The thread driver retries it as any other exception and dead-letters the event
    (reconcile-failed)."""
    records = _claimed(tmp_path, ["a"])
    handler = SyncReconcile(reconcile_raises=StopIteration())
    dead = MemoryDeadLetters()
    engine, store = engine_for(
        tmp_path,
        handler,
        dead,
        mode="claim",
        on_uncertain="reconcile",
        max_retries=1,
        retry_backoff="1ms",
    )
    try:
        started = time.monotonic()
        _results, errors = process_bounded(engine, records)
        assert time.monotonic() - started < GUARD_S, (
            "the batch hung on a sync reconcile's StopIteration"
        )
        assert errors == []
        assert [k.letter.reason for k in dead.letters] == ["reconcile-failed"]
    finally:
        engine.close()
        store.close()


def test_a_sync_reconcile_runs_on_the_worker_that_ran_setup_at_concurrency_1(
    tmp_path: Path,
) -> None:
    """docs/concurrency.md: at concurrency 1 one worker calls the sync hooks; before 8c9af67
    a sync reconcile next to an async handle ran there (a sqlite3 connection opened in a
    sync setup worked in it). Now it runs on asyncio's default executor."""
    records = _claimed(tmp_path, ["a", "b", "c"])
    handler = SyncReconcile()
    engine, store = engine_for(tmp_path, handler, mode="claim", on_uncertain="reconcile")
    try:
        engine.setup_handler()
        results, errors = process_bounded(engine, records)
        assert errors == [] and results[0].commits == {TP0: 3}
        assert handler.reconcile_calls == 3
        assert handler.threads["reconcile"] == handler.threads["setup"]
    finally:
        engine.close()
        store.close()


def test_a_hung_sync_reconcile_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    """HandlerPool's workers are daemon threads so that a call that never returns cannot
    keep the process alive after the consumer stopped; asyncio.to_thread's are not."""
    _claimed(tmp_path, ["a"])
    script = textwrap.dedent(
        f"""
        import asyncio, sys, threading, time
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        sys.path.insert(0, {str(Path(__file__).parents[2] / "tests")!r})
        from pathlib import Path
        from unit.test_async_lanes import engine_for, Handler
        import unit.test_async_lanes as m

        class HungReconcile(Handler):
            def reconcile(self, event):
                threading.Event().wait()  # never returns
            async def handle(self, event):
                pass

        records = m._claimed_records_for_subprocess()
        engine, store = engine_for(Path({str(tmp_path)!r}), HungReconcile(), mode="claim",
                                   on_uncertain="reconcile")
        engine.walk_budget_s = 0.3
        threading.Timer(0.5, engine.request_stop).start()
        engine.process(records, lambda: None)
        engine.close()
        store.close()
        print("closed", flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=20)
        exited = True
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        exited = False
    assert "closed" in out, out
    assert exited, "the process never exited: a hung reconcile holds a non-daemon thread"


def _claimed_records_for_subprocess() -> list[Any]:
    return [rec(0, "a", key=b"a")]


# -- 4. a dead letter decided on the loop while the persister flushes letters ----------


class SlowFlushLetters(MemoryDeadLetters):
    """KafkaDeadLetters' shape: send and flush share one lock; flush waits for acks."""

    def __init__(self, flush_s: float) -> None:
        super().__init__()
        self.lock = threading.RLock()
        self.flush_s = flush_s

    def send(self, message: Any, letter: Any) -> None:
        with self.lock:
            super().send(message, letter)

    def flush(self) -> None:
        with self.lock:
            if self.letters:
                time.sleep(self.flush_s)


class PoisonAndTicker(Handler):
    def __init__(self) -> None:
        self.max_lag = 0.0

    async def handle(self, event: Event) -> None:
        if event.id.startswith("poison"):
            raise PermanentError("never")
        if event.id == "ticker":  # another key: its own lane, in flight at the same time
            for _ in range(60):
                before = time.monotonic()
                await asyncio.sleep(0.01)
                self.max_lag = max(self.max_lag, time.monotonic() - before - 0.01)


def test_a_dead_letter_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """Batch 1's letter is flushed on the persister (slowly: a broker that acks late) while
    batch 2 runs; batch 2's dead letter is sent from the loop thread and waits for the
    flush: every async call in flight stalls meanwhile."""
    handler = PoisonAndTicker()
    dead = SlowFlushLetters(flush_s=1.5)
    engine, store = engine_for(tmp_path, handler, dead, concurrency=4)
    try:
        engine.pipeline(
            [rec(0, "poison1", key=b"p")], lambda: None
        )  # flushed on the persister meanwhile
        _r2, e2 = process_bounded(engine, [rec(1, "ticker", key=b"t"), rec(2, "poison2", key=b"q")])
        assert e2 == []
        assert handler.max_lag < 0.5, f"the event loop was blocked {handler.max_lag:.2f}s"
    finally:
        engine.close()
        store.close()


# -- 5. context shared across calls of one lane ----------------------------------------

REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("request", default=None)


class ContextUser(Handler):
    def __init__(self) -> None:
        self.seen: list[str | None] = []

    async def handle(self, event: Event) -> None:
        self.seen.append(REQUEST.get())
        REQUEST.set(event.id)  # e.g. structlog.contextvars.bind_contextvars(event_id=...)


def test_each_async_call_has_its_own_context(tmp_path: Path) -> None:
    """Before 8c9af67 each async call was its own Task (a fresh context); now one Task
    runs a whole lane, so what one event's call set is seen by the next one's."""
    handler = ContextUser()
    engine, store = engine_for(tmp_path, handler)
    try:
        _results, errors = process_bounded(engine, [rec(0, "a", key=b"k"), rec(1, "b", key=b"k")])
        assert errors == []
        assert handler.seen == [None, None]
    finally:
        engine.close()
        store.close()
