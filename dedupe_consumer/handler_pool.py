"""Where handler calls run: worker threads for sync code, one event loop for coroutines.

The consuming thread never calls the handler itself: it keeps polling (with the
partitions paused) while handler calls run, so no call, however long, costs the
group membership. ``processing.concurrency`` workers take the calls; at 1, one
thread runs ``setup``, every ``handle`` and ``teardown``, so a handler that keeps
thread-bound resources (a sqlite3 connection, say) works as written.

A hook written ``async def`` (or any call that returns an awaitable) is awaited
on one asyncio loop in a thread of its own; the worker that made the call waits
for it, so up to ``concurrency`` coroutines are in flight on that loop.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class HandlerPool:
    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._workers = ThreadPoolExecutor(concurrency, thread_name_prefix="dedupe-handler")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on a worker thread."""
        return self._workers.submit(fn, *args)

    def call(self, fn: Callable[..., object], *args: Any) -> object:
        """``fn(*args)`` on this thread; an awaitable it returns is awaited on the loop."""
        result = fn(*args)
        if inspect.isawaitable(result):
            return self.wait_for(result)
        return result

    def wait_for(self, awaitable: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(_coroutine(awaitable), self._event_loop()).result()

    def run(self, fn: Callable[..., object], *args: Any) -> object:
        """``call(fn, *args)`` on a worker, and wait (``setup``/``teardown``)."""
        return self.submit(self.call, fn, *args).result()

    def close(self) -> None:
        """Stop taking calls; running ones finish on their own (nothing can stop them)."""
        self._workers.shutdown(wait=False, cancel_futures=True)
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=5)

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
