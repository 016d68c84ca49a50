"""A periodic ``progress`` log line: totals so far and rates since the previous line.

A long-running consumer otherwise says nothing between its assignment and its
shutdown summary. ``observability.progress_interval`` sets the period (``0s``:
off). The fields are the shutdown summary's (``consumed``, ``handled``,
``duplicates``, ``replays``, ``dead_lettered``, ``conflicts``), plus
``<field>_per_s`` over ``interval_s``, the time since the previous line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import structlog

from dedupe_consumer.models import BatchStats

log = structlog.get_logger("dedupe_consumer")

FIELDS = ("consumed", "handled", "duplicates", "replays", "dead_lettered", "conflicts")
"""The counts of a progress line, as in the shutdown summary (``stopped``)."""


class ProgressLog:
    """Call :meth:`tick` from the consumer loop; it logs at most once per interval."""

    def __init__(self, interval: timedelta, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval.total_seconds()
        self.clock = clock
        self._since = clock()
        self._last = dict.fromkeys(FIELDS, 0)

    def tick(self, totals: BatchStats) -> None:
        if self.interval_s <= 0:
            return
        now = self.clock()
        elapsed = now - self._since
        if elapsed < self.interval_s:
            return
        counts = {name: int(getattr(totals, name)) for name in FIELDS}
        rates = {
            f"{name}_per_s": round((counts[name] - self._last[name]) / elapsed, 1)
            for name in FIELDS
        }
        log.info("progress", **counts, **rates, interval_s=round(elapsed, 1))
        self._since, self._last = now, counts
