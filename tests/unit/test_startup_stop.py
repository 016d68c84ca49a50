"""A stop asked for during start-up is not held up by start-up checks that wait for the
brokers (the dead-letter topic check waits up to 30 s, the group's scope check 10 s)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from structlog.testing import capture_logs

from dedupe_consumer import DedupeConsumer, Event, Handler, Settings
from dedupe_consumer.kafka.topics import ensure_dead_letter_topic


def _nowhere() -> str:
    """A loopback address where nothing listens (connection refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def _settings(tmp_path: Path) -> Settings:
    return Settings.load(
        kafka={"bootstrap_servers": _nowhere(), "group_id": "g", "topics": ["t"]},
        store={"path": str(tmp_path / "state"), "changelog": False},
        processing={"dead_letter_topic": "t.dlq", "poll_timeout": "100ms"},
        observability={"log_level": "warning"},
    )


class Never(Handler):
    def handle(self, event: Event) -> None:
        raise AssertionError("nothing can be consumed without a broker")


def test_the_dead_letter_topic_check_gives_up_when_a_stop_is_asked(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    asked = threading.Event()
    threading.Timer(1.0, asked.set).start()
    started = time.monotonic()
    with capture_logs() as logs:
        ensure_dead_letter_topic(settings, timeout_s=30.0, stopping=asked.is_set)
    waited = time.monotonic() - started
    assert waited < 10, f"waited {waited:.1f} s of the 30 s timeout after the stop"
    assert any(e["event"] == "dead_letter_topic_unchecked" for e in logs), logs


def test_a_consumer_stopped_during_start_up_returns_without_joining(tmp_path: Path) -> None:
    consumer = DedupeConsumer(Never(), _settings(tmp_path))
    returned: list[float] = []

    def run() -> None:
        consumer.run(install_signal_handlers=False)
        returned.append(time.monotonic())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(1.0)  # inside the start-up checks, which wait for the brokers
    asked = time.monotonic()
    consumer.stop()
    thread.join(30)
    assert returned, "run() did not return within 30 s of stop()"
    assert returned[0] - asked < 10, f"run() returned {returned[0] - asked:.1f} s after stop()"
    assert consumer.totals.consumed == 0
