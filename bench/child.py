"""What every contender process shares: its arguments, its clock and its one-line report.

Standard library only, on purpose: the Quix Streams contender runs under a
separate interpreter (its own virtualenv, see ``bench/setup.sh``) that has
quixstreams and its pinned confluent-kafka but not this project's
dependencies, and it still has to speak the same protocol as the others.

The protocol: a contender is ``python -m bench.contenders.<name> <args>``; it
prints, as the last line of stdout, one JSON object: a :class:`Report`, or a
:class:`Refusal` when the library refused the set-up at start-up (an ``async
def`` handler today), which the table shows as "refused" rather than a crash.
The parent reads nothing else from stdout, so contenders may log to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import NotRequired, TypedDict


class Report(TypedDict):
    """One contender's result, as printed on the last line of its stdout."""

    consumed: int
    """Messages read from the topic (every offset, duplicates included)."""
    handled: int
    """Handler calls: must equal the number of unique IDs for a dedupe contender."""
    seconds: float
    """From the first message in hand to the last offset committed."""
    peak_rss_mb: float
    """VmHWM of the consumer process: its own memory, not its servers'."""
    engine: NotRequired[str]
    """What the engine ran with, e.g. "concurrency 16, ordering key", or why not."""
    redelivered: NotRequired[int]
    """Handler calls (deliveries) beyond the first per ID, where the contender can see them."""
    outputs: NotRequired[int]
    """Emit rows: messages read back from the output topic with ``read_committed``."""
    output_ids: NotRequired[int]
    """Emit rows: distinct keys (event IDs) among those outputs."""
    output_mismatched: NotRequired[int]
    """Emit rows: outputs whose value is not the event named by their key."""


class Refusal(TypedDict):
    """The library refused the contender's set-up at start-up (e.g. with ConfigError)."""

    refused: str


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``VmHWM``), 0.0 off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def parse_args(description: str, *extra: str, **optional: str) -> argparse.Namespace:
    """The arguments every contender takes, plus options of its own (strings).

    ``extra`` names required options (``"dsn"`` is ``--dsn``); ``optional``
    maps option names to their defaults (``sleep_ms="0"`` is ``--sleep-ms``).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--events", type=int, required=True, help="messages in the topic")
    parser.add_argument("--group", required=True, help="a consumer group nobody used yet")
    parser.add_argument("--batch", type=int, default=500, help="messages per poll")
    parser.add_argument("--workdir", required=True, help="a private scratch directory")
    for name in extra:
        parser.add_argument(f"--{name}", required=True)
    for name, default in optional.items():
        parser.add_argument(f"--{name.replace('_', '-')}", default=default)
    return parser.parse_args()


class Stopwatch:
    """First-message-to-last-commit clock, so group join and shutdown count for no one."""

    def __init__(self) -> None:
        self.first = 0.0
        self.last = 0.0

    def start_once(self) -> None:
        """Call when a message is in hand; only the first call counts."""
        if not self.first:
            self.first = time.perf_counter()

    def lap(self) -> None:
        """Call after each commit; the last call ends the measurement."""
        self.last = time.perf_counter()

    @property
    def seconds(self) -> float:
        return max(self.last - self.first, 1e-9)


def emit(
    consumed: int,
    handled: int,
    seconds: float,
    *,
    engine: str | None = None,
    redelivered: int | None = None,
    rss_mb: float | None = None,
    outputs: tuple[int, int, int] | None = None,
) -> None:
    """Print the report line the parent parses (always the last line of stdout).

    ``rss_mb`` replaces this process's own peak RSS when the consumer is a
    child process (the sidecar row). ``outputs`` is what an emit row read back
    from its output topic: (outputs, distinct IDs, mismatched values).
    """
    report: Report = {
        "consumed": consumed,
        "handled": handled,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb() if rss_mb is None else rss_mb,
    }
    if engine is not None:
        report["engine"] = engine
    if redelivered is not None:
        report["redelivered"] = redelivered
    if outputs is not None:
        report["outputs"], report["output_ids"], report["output_mismatched"] = outputs
    _print(report)


def emit_refused(reason: str) -> None:
    """Print a :class:`Refusal` as the report line: the library said no at start-up."""
    refusal: Refusal = {"refused": reason}
    _print(refusal)


def _print(line: Report | Refusal) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
