"""dedupe_consumer itself, with a handler that does nothing, so only the framework is measured.

``--mode plain|claim`` and ``--changelog true|false`` pick the row. Everything
else is the library's defaults (RocksDB store with a synced WAL per batch,
watermarks, one Kafka transaction per batch on the changelog), as a user who
writes ``DedupeConsumer(handler, settings).run()`` gets them, except a 100 ms
poll timeout, which only shortens the wait for a short last batch.

``--profile PATH`` runs the consumer under pyinstrument and writes
``PATH.txt`` (call tree) and ``PATH.html``: the evidence for where time goes
when a target is missed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from bench._child import Stopwatch, emit
from dedupe_consumer import DedupeConsumer, Event, Handler, Settings, kafka
from dedupe_consumer.contracts import AssignmentListener, BatchResult, Edges, Source
from dedupe_consumer.models import SourceMessage, TopicPartition
from dedupe_consumer.observability import configure_logging


class CountingNoOp(Handler):
    """Counts its calls; ``handled == unique IDs`` is the correctness check."""

    def __init__(self) -> None:
        self.calls = 0

    def handle(self, event: Event) -> None:
        self.calls += 1


class _TimedSource:
    """Starts the clock when the first non-empty batch is in hand, like the raw consumer."""

    def __init__(self, inner: Source, clock: Stopwatch) -> None:
        self._inner = inner
        self._clock = clock

    def poll(self, max_messages: int, timeout_s: float) -> Sequence[SourceMessage]:
        messages = self._inner.poll(max_messages, timeout_s)
        if messages:
            self._clock.start_once()
        return messages

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._inner.commit(offsets)

    def seek(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._inner.seek(offsets)

    def close(self) -> None:
        self._inner.close()


def _timed(edges: Edges, clock: Stopwatch) -> Edges:
    """The Kafka edges with their source wrapped by :class:`_TimedSource`.

    Only the source factory is replaced, so the code path is the one a user gets
    (the changelog stays wired to the Kafka source).
    """

    def open_source(listener: AssignmentListener) -> Source:
        return _TimedSource(edges.source(listener), clock)

    return replace(edges, source=open_source)


def run(args: argparse.Namespace, store_dir: str) -> tuple[int, int, float]:
    settings = Settings.load(
        kafka={
            "bootstrap_servers": args.bootstrap,
            "group_id": args.group,
            "topics": [args.topic],
        },
        store={"path": store_dir, "changelog": args.changelog == "true"},
        processing={
            "dead_letter_topic": f"{args.topic}.dlq",
            "batch_size": args.batch,
            "mode": args.mode,
            # A short last batch waits out the poll timeout inside the measured
            # window; with a backlog every poll returns a full batch anyway.
            "poll_timeout": "100ms",
        },
        observability={"log_level": "warning"},
    )
    handler = CountingNoOp()
    clock = Stopwatch()
    edges = kafka.edges(settings)
    consumer = DedupeConsumer(handler, settings, edges=_timed(edges, clock))

    def on_batch(result: BatchResult) -> None:
        clock.lap()  # called after the batch's offsets were committed

    try:
        totals = consumer.run(
            until=lambda t: t.consumed >= args.events,
            on_batch=on_batch,
            install_signal_handlers=False,
        )
    finally:
        edges.close()
    if not clock.first:  # the wrapper above no longer hooks the loop: fail, don't mismeasure
        raise RuntimeError("no batch went through _TimedSource: the edges' source changed?")
    if totals.handled != handler.calls:
        raise RuntimeError(f"engine counted {totals.handled} handled, handler saw {handler.calls}")
    return totals.consumed, handler.calls, clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--mode", choices=["plain", "claim"], default="plain")
    parser.add_argument("--changelog", choices=["true", "false"], default="true")
    parser.add_argument("--profile", type=Path, help="write a pyinstrument profile here")
    args = parser.parse_args()
    configure_logging("warning")
    with tempfile.TemporaryDirectory(prefix="store-", dir=args.workdir) as store_dir:
        if args.profile is None:
            consumed, handled, seconds = run(args, store_dir)
        else:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.001)
            started = time.perf_counter()
            with profiler:
                consumed, handled, seconds = run(args, store_dir)
            args.profile.parent.mkdir(parents=True, exist_ok=True)
            Path(f"{args.profile}.txt").write_text(
                profiler.output_text(unicode=True, show_all=False, timeline=False)
            )
            Path(f"{args.profile}.html").write_text(profiler.output_html())
            print(f"profiled {time.perf_counter() - started:.1f}s -> {args.profile}.txt")
    emit(consumed, handled, seconds)


if __name__ == "__main__":
    main()
