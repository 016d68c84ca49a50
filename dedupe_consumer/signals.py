"""SIGTERM and SIGINT as "please stop": the one signal helper every command and the loop use.

A signal handler runs between two bytecodes of the main thread, which may at that
moment hold the log writer's lock, an ``Event``'s condition or any other lock the
stop callback would take: the callback would deadlock on it. So the handler does
no work itself; it starts a short-lived thread that calls the callback.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["STOP_SIGNALS", "install_stop_handlers", "stop_on_signals"]

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
"""The signals that ask for a clean stop: ``kill``, a container stop, Ctrl-C."""


def install_stop_handlers(
    on_stop: Callable[[signal.Signals], object], *, once: bool = False
) -> Callable[[], None]:
    """Make SIGTERM and SIGINT call ``on_stop(signal)`` on a new thread; return ``restore``.

    ``restore()`` puts back the handlers that were installed before (idempotent).
    With *once*, the first signal also restores them at once, so a second Ctrl-C
    is not caught and interrupts as it would without us. Off the main thread,
    where Python cannot install signal handlers, nothing is installed and
    ``restore`` does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def restore() -> None:
        for sig, handler in previous.items():
            if handler is not None:  # None: installed from C, cannot be put back from Python
                signal.signal(sig, handler)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if once:
            restore()  # signal.signal takes no lock: safe inside the signal frame
        threading.Thread(
            target=on_stop, args=(signal.Signals(signum),), name="stop-on-signal", daemon=True
        ).start()

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    return restore


@contextmanager
def stop_on_signals(
    on_stop: Callable[[signal.Signals], object], *, once: bool = False
) -> Iterator[None]:
    """:func:`install_stop_handlers` for the ``with`` block; the old handlers come back after it."""
    restore = install_stop_handlers(on_stop, once=once)
    try:
        yield
    finally:
        restore()
