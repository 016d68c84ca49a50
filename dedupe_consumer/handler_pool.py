"""Where handler calls run: worker threads for sync code, one event loop for coroutines.

The consuming thread never calls the handler itself: it keeps polling (reading one
batch ahead, then with the partitions paused) while handler calls run, so no call,
however long, costs the group membership. ``processing.concurrency`` workers take
the calls; at 1, one thread runs ``setup``, every ``handle`` and ``teardown``, so a
handler that keeps thread-bound resources (a sqlite3 connection, say) works as
written.

With ``async def handle``, the engine runs its lanes as coroutines on one
asyncio loop in a thread of its own (:meth:`HandlerPool.start_on_loop`), at most
``concurrency`` at once; plain ``def`` hooks next
to it run on the workers (:meth:`HandlerPool.call_on_worker`), never on the loop.
An awaitable returned to a worker (a plain ``def`` returning a coroutine) is
awaited on that loop while the worker waits for it.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from queue import SimpleQueue
from typing import Any, TypeVar

import structlog

T = TypeVar("T")
log = structlog.get_logger("dedupe_consumer.engine")


class HandlerPool:
    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._jobs: SimpleQueue[Callable[[], None] | None] = SimpleQueue()
        # Daemon threads: a handler call that never returns must not keep the process
        # alive after the consumer stopped.
        self._workers = [
            threading.Thread(target=self._work, name=f"dedupe-handler-{n}", daemon=True)
            for n in range(concurrency)
        ]
        for worker in self._workers:
            worker.start()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._queued: deque[Coroutine[Any, Any, None]] = deque()
        """On the loop: coroutines waiting for one of the runners."""
        self._runners = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job()`` on a worker thread (first come, first served); it must not raise."""
        self._jobs.put(job)

    def call(self, fn: Callable[..., object], *args: Any) -> object:
        """``fn(*args)`` on this thread; an awaitable it returns is awaited on the loop."""
        result = fn(*args)
        if result is not None and inspect.isawaitable(result):
            return self.wait_for(result)
        return result

    def start_on_loop(self, coroutines: Sequence[Coroutine[Any, Any, None]]) -> None:
        """Run ``coroutines`` on the event loop, at most ``concurrency`` at once, in the
        order given; they must not raise (lanes catch their own).

        One hand-over for all, and up to ``concurrency`` runner tasks that take them in
        turn: a thread-safe call, a task and a semaphore wait per coroutine cost the
        consuming thread a third of its time and the loop a fifth of its own."""
        if coroutines:
            self._event_loop().call_soon_threadsafe(self._queue_on_loop, coroutines)

    def _queue_on_loop(self, coroutines: Sequence[Coroutine[Any, Any, None]]) -> None:
        loop = asyncio.get_running_loop()
        self._queued.extend(coroutines)
        while self._runners < self.concurrency and self._queued:
            self._runners += 1
            runner = loop.create_task(self._run_queued())
            self._tasks.add(runner)  # the loop keeps only a weak reference
            runner.add_done_callback(self._tasks.discard)

    async def _run_queued(self) -> None:
        try:
            while self._queued:
                coroutine = self._queued.popleft()
                try:
                    await coroutine
                except Exception:  # pragma: no cover - a lane catches its own
                    log.exception("lane_failed_on_the_loop")
        finally:
            self._runners -= 1

    async def call_on_worker(self, fn: Callable[..., object], *args: Any) -> object:
        """On the loop: ``fn(*args)`` on a worker thread, awaited without blocking the
        loop. The outcome comes back as a value (a ``StopIteration`` raised by ``fn``
        cannot travel through a future) and is raised here."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[bool, object]] = loop.create_future()

        def job() -> None:
            try:
                outcome: tuple[bool, object] = (True, fn(*args))
            except BaseException as exc:
                outcome = (False, exc)
            loop.call_soon_threadsafe(_settle, done, outcome)

        self.submit(job)
        ok, value = await done
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return value

    def wait_for(self, awaitable: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(_coroutine(awaitable), self._event_loop()).result()

    def run(self, fn: Callable[..., object], *args: Any, timeout: float | None = None) -> object:
        """``call(fn, *args)`` on a worker, and wait for it (``setup``/``teardown``).

        With a ``timeout``, :class:`TimeoutError` when it has not run by then (every
        worker may be held by a call that never returns)."""
        done = threading.Event()
        outcome: list[tuple[bool, object]] = []

        def job() -> None:
            try:
                outcome.append((True, self.call(fn, *args)))
            except BaseException as exc:
                outcome.append((False, exc))
            finally:
                done.set()

        self.submit(job)
        if not done.wait(timeout):
            raise TimeoutError(f"{getattr(fn, '__qualname__', fn)} did not run within {timeout}s")
        ok, value = outcome[0]
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return value

    def close(self) -> None:
        """Stop the workers once the calls queued before are done (a hung one is left)."""
        for _ in self._workers:
            self._jobs.put(None)
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=5)
                if not self._loop_thread.is_alive():
                    loop.close()  # its selector and self-pipe: no descriptors left behind

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="dedupe-handler-loop", daemon=True
                )
                thread.start()
                self._loop, self._loop_thread = loop, thread
            return self._loop


async def _coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _settle(future: asyncio.Future[tuple[bool, object]], outcome: tuple[bool, object]) -> None:
    if not future.done():  # the awaiting lane may have been cancelled
        future.set_result(outcome)
