"""``observability.progress_interval``: a periodic ``progress`` line (issue 11)."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

from dedupe_consumer import DedupeConsumer, Event
from dedupe_consumer.contracts import AssignmentListener, Edges
from dedupe_consumer.dead_letters import MemoryDeadLetters
from dedupe_consumer.models import BatchStats
from dedupe_consumer.observability.progress import ProgressLog
from dedupe_consumer.replay import ReplaySource
from dedupe_consumer.store import RocksStore

from ..log_capture import captured_logs
from .conftest import Recorder, make_settings, rec


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_interval_with_totals_and_rates_since_the_last() -> None:
    clock = FakeClock()
    progress = ProgressLog(timedelta(seconds=60), clock)
    totals = BatchStats(consumed=600, handled=500, duplicates=100)
    with captured_logs() as logs:
        clock.now += 59
        progress.tick(totals)  # not yet
        clock.now += 1
        progress.tick(totals)
        clock.now += 30
        totals.merge(BatchStats(consumed=300, handled=300))
        progress.tick(totals)  # not yet: 30 s since the last line
        clock.now += 30
        progress.tick(totals)
    lines = [e for e in logs if e["event"] == "progress"]
    assert len(lines) == 2
    first, second = lines
    assert (first["consumed"], first["handled"], first["duplicates"]) == (600, 500, 100)
    assert (first["consumed_per_s"], first["interval_s"]) == (10.0, 60.0)
    assert (second["consumed"], second["handled"]) == (900, 800)
    assert (second["consumed_per_s"], second["handled_per_s"]) == (5.0, 5.0)
    assert second["duplicates_per_s"] == 0.0


def test_zero_turns_it_off() -> None:
    clock = FakeClock()
    progress = ProgressLog(timedelta(0), clock)
    with captured_logs() as logs:
        clock.now += 10**6
        progress.tick(BatchStats(consumed=1))
    assert logs == []


def test_the_default_is_a_minute(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    assert settings.observability.progress_interval == timedelta(seconds=60)


def _run(tmp_path: Path, interval: str) -> list[dict[str, object]]:
    settings = make_settings(
        tmp_path / "state",
        processing={"batch_size": 2},
        observability={"progress_interval": interval},
    )

    class Slow(Recorder):
        def handle(self, event: Event) -> None:
            super().handle(event)
            time.sleep(0.02)

    holder: list[ReplaySource] = []

    def source(listener: AssignmentListener) -> ReplaySource:
        holder.append(ReplaySource([rec(i, f"id{i}") for i in range(8)], listener))
        return holder[0]

    store = RocksStore(tmp_path / "state", retention_ms=10**9)
    try:
        with captured_logs() as logs:
            DedupeConsumer(
                Slow(),
                settings,
                edges=Edges(source=source, dead_letters=MemoryDeadLetters(), store=store),
            ).run(until=lambda t: holder[0].exhausted, install_signal_handlers=False)
    finally:
        store.close()
    return [dict(e) for e in logs if e["event"] == "progress"]


def test_the_consumer_loop_logs_progress(tmp_path: Path) -> None:
    # Each batch of 2 takes 40 ms or more; a batch is counted once durable, while the
    # next one is handled.
    lines = _run(tmp_path / "on", "10ms")
    assert len(lines) >= 2
    assert all(isinstance(line["consumed"], int) for line in lines)
    assert max(int(str(line["handled"])) for line in lines) >= 4
    assert _run(tmp_path / "off", "0s") == []
