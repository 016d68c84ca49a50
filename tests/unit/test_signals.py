"""The one signal helper: SIGTERM/SIGINT call a stop callback on another thread, then go back."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import pytest

from dedupe_consumer.signals import install_stop_handlers, stop_on_signals


class Previous:
    """A handler that was installed before ours: it must be back, and work, afterwards."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.called = threading.Event()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        self.called.set()


class Stops:
    """A stop callback that notes the signal and the thread it ran on."""

    def __init__(self) -> None:
        self.signals: list[signal.Signals] = []
        self.threads: list[threading.Thread] = []
        self.called = threading.Event()

    def __call__(self, sig: signal.Signals) -> None:
        self.signals.append(sig)
        self.threads.append(threading.current_thread())
        self.called.set()


def _installed(sig: signal.Signals) -> object:
    """The handler Python calls for *sig* now."""
    return signal.getsignal(sig)


@pytest.fixture
def previous() -> Iterator[Previous]:
    handler = Previous()
    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield handler
    for sig, old in saved.items():
        signal.signal(sig, old)


def test_sigterm_calls_the_stop_callback_off_the_signal_frame_and_restores_after(
    previous: Previous,
) -> None:
    stops = Stops()
    with stop_on_signals(stops):
        assert _installed(signal.SIGTERM) is not previous
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.called.wait(30), "the stop callback was not called"
    assert stops.signals == [signal.SIGTERM]
    assert stops.threads[0] is not threading.main_thread()  # not inside the signal frame
    assert previous.received == []  # ours took the signal, not the old handler

    assert _installed(signal.SIGTERM) is previous
    assert _installed(signal.SIGINT) is previous
    os.kill(os.getpid(), signal.SIGTERM)  # and the old handler does its job again
    assert previous.called.wait(30)
    assert previous.received == [signal.SIGTERM]
    assert stops.signals == [signal.SIGTERM]


def test_every_signal_asks_again_until_restored(previous: Previous) -> None:
    stops = Stops()
    restore = install_stop_handlers(stops)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stops.called.wait(30)
        stops.called.clear()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.called.wait(30)
    finally:
        restore()
    assert stops.signals == [signal.SIGINT, signal.SIGTERM]
    assert previous.received == []
    assert _installed(signal.SIGINT) is previous
    restore()  # idempotent
    assert _installed(signal.SIGINT) is previous


def test_once_gives_the_second_signal_back_to_the_previous_handler(previous: Previous) -> None:
    stops = Stops()
    with stop_on_signals(stops, once=True):
        os.kill(os.getpid(), signal.SIGINT)
        assert stops.called.wait(30)
        assert _installed(signal.SIGINT) is previous  # restored by the first signal
        os.kill(os.getpid(), signal.SIGINT)
        assert previous.called.wait(30)
    assert stops.signals == [signal.SIGINT]
    assert previous.received == [signal.SIGINT]


def test_off_the_main_thread_nothing_is_installed(previous: Previous) -> None:
    seen: list[object] = []

    def worker() -> None:
        with stop_on_signals(Stops()):
            seen.append(_installed(signal.SIGTERM))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [previous]
    assert _installed(signal.SIGTERM) is previous
