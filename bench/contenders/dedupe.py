"""dedupe_consumer itself, with a handler that does nothing, so only the framework is measured.

``--mode plain|claim`` and ``--changelog true|false`` pick the row. Everything
else is the library's defaults (RocksDB store with a synced WAL per batch,
watermarks, one Kafka transaction per batch on the changelog), as a user who
writes ``DedupeConsumer(handler, settings).run()`` gets them, except a 100 ms
poll timeout, which only shortens the wait for a short last batch.

The I/O-bound rows swap the handler:

* ``--handler sleep --sleep-ms 2``: ``time.sleep`` per call, a handler waiting
  on a database or an HTTP API;
* ``--handler async-sleep``: the same wait as ``async def handle`` with
  ``await asyncio.sleep``. An engine that cannot run it refuses it at start-up
  (ConfigError), and the row reports the refusal instead of a rate.

``--handler emit`` (the ``plain-emit`` row) is the consume-emit pipeline: per
handled event, one ``event.emit(output, event.value, key=event.key,
headers=event.headers)`` (a copy of the input, as Quix's ``to_topic`` sends
it) to an output topic this process creates before the consumer starts (named
after the group, see :mod:`bench.contenders._outputs`). The outputs go out in
the Kafka transaction that persists the batch (``store.changelog = true`` is
required). After the run the topic is read back with ``read_committed`` and
the report says how many outputs, and how many distinct IDs, a reader sees.

``--concurrency N`` and ``--ordering key|partition`` set
``processing.concurrency`` / ``processing.ordering`` when the installed
engine has them (see :mod:`bench.engine_options`); the report says what the
engine ran with.

``--profile PATH`` runs the consumer under pyinstrument and writes
``PATH.txt`` (call tree) and ``PATH.html``: the evidence for where time goes
when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.child import Stopwatch, emit, emit_refused
from bench.contenders._outputs import create_like, output_topic, read_back
from bench.engine_options import concurrency_settings, processing_fields
from dedupe_consumer import ConfigError, DedupeConsumer, Event, Handler, Settings, kafka
from dedupe_consumer.contracts import AssignmentListener, BatchResult, Edges, Source
from dedupe_consumer.models import SourceMessage, TopicPartition
from dedupe_consumer.observability import configure_logging


class CountingNoOp(Handler):
    """Counts its calls; ``handled == unique IDs`` is the correctness check.

    The count is locked: a concurrent engine calls ``handle`` from several threads.
    """

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def handle(self, event: Event) -> None:
        with self._lock:
            self.calls += 1


class CountingSleep(CountingNoOp):
    """Waits ``sleep_s`` per call with ``time.sleep``: a handler blocked on I/O."""

    def __init__(self, sleep_s: float) -> None:
        super().__init__()
        self.sleep_s = sleep_s

    def handle(self, event: Event) -> None:
        time.sleep(self.sleep_s)
        super().handle(event)


class FlakySleep(CountingSleep):
    """:class:`CountingSleep` whose first attempt fails for one event in 20 (by ID):
    a downstream that answers 503 now and then. Only successes count."""

    def handle(self, event: Event) -> None:
        time.sleep(self.sleep_s)
        if event.attempt == 1 and zlib.crc32(event.id.encode()) % 20 == 0:
            raise RuntimeError("503 from downstream: try again")
        CountingNoOp.handle(self, event)


class CountingEmit(CountingNoOp):
    """Emits a copy of each event (value, key and headers) to ``topic``, then counts.

    Counted after the emit: a call whose emit raised is not a handled event.
    """

    def __init__(self, topic: str) -> None:
        super().__init__()
        self.topic = topic

    def handle(self, event: Event) -> None:
        event.emit(self.topic, event.value, key=event.key, headers=event.headers)
        super().handle(event)


class CountingAsyncSleep(Handler):
    """Awaits ``asyncio.sleep(sleep_s)`` per call: an ``async def`` handler on I/O.

    All calls run on the engine's one event loop, so the count needs no lock.
    """

    def __init__(self, sleep_s: float) -> None:
        self.calls = 0
        self.sleep_s = sleep_s

    async def handle(self, event: Event) -> None:
        await asyncio.sleep(self.sleep_s)
        self.calls += 1


def make_handler(
    kind: str, sleep_ms: float, output: str | None = None
) -> CountingNoOp | CountingAsyncSleep:
    if kind == "noop":
        return CountingNoOp()
    if kind == "emit":
        if output is None:
            raise ValueError("the emit handler needs an output topic")
        return CountingEmit(output)
    if kind == "sleep":
        return CountingSleep(sleep_ms / 1000)
    if kind == "flaky-sleep":
        return FlakySleep(sleep_ms / 1000)
    return CountingAsyncSleep(sleep_ms / 1000)


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

    def keep_alive(self) -> None:
        self._inner.keep_alive()

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


def run(
    args: argparse.Namespace, store_dir: str, output: str | None = None
) -> tuple[int, int, float, str]:
    """Returns (consumed, handled, seconds, what the engine ran with).

    ``output``: the topic the emit handler writes to (it must exist).
    """
    knobs, engine = concurrency_settings(processing_fields(), args.concurrency, args.ordering)
    # [tracing] only when asked: an engine from before it refuses the key
    traced: dict[str, Any] = {} if args.tracing == "off" else {"tracing": _tracing(args.tracing)}
    settings = Settings.load(
        kafka={
            "bootstrap_servers": args.bootstrap,
            "group_id": args.group,
            "topics": [args.topic],
        },
        store={"path": store_dir, "changelog": args.changelog == "true"},
        dedupe={"scope": args.scope},
        processing={
            "dead_letter_topic": f"{args.topic}.dlq",
            "batch_size": args.batch,
            "mode": args.mode,
            # A short last batch waits out the poll timeout inside the measured
            # window; with a backlog every poll returns a full batch anyway.
            "poll_timeout": "100ms",
            **knobs,
        },
        observability={"log_level": "warning"},
        **traced,
    )
    handler = make_handler(args.handler, args.sleep_ms, output)
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
    return totals.consumed, handler.calls, clock.seconds, engine


class _Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that reads each export and drops it."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _tracing(kind: str) -> dict[str, object]:
    """``[tracing]`` for ``--tracing``: on without an exporter (``none``); on, exporting
    over OTLP/HTTP to a sink in this process (``otlp``: the export's cost included)."""
    if kind == "none":
        return {"enabled": True, "exporter": "none"}
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    return {"enabled": True, "exporter": "otlp", "endpoint": endpoint}


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
    parser.add_argument("--scope", choices=["partition", "topic"], default="partition")
    parser.add_argument(
        "--handler",
        choices=["noop", "sleep", "flaky-sleep", "async-sleep", "emit"],
        default="noop",
    )
    parser.add_argument("--sleep-ms", type=float, default=2.0, help="per call, sleep handlers")
    parser.add_argument(
        "--concurrency", type=int, help="processing.concurrency, if the engine has it"
    )
    parser.add_argument(
        "--ordering", choices=["key", "partition"], help="processing.ordering, ditto"
    )
    parser.add_argument(
        "--tracing", choices=["off", "none", "otlp"], default="off", help="[tracing], see _tracing"
    )
    parser.add_argument("--profile", type=Path, help="write a pyinstrument profile here")
    args = parser.parse_args()
    configure_logging("warning")
    output = None
    if args.handler == "emit":
        output = output_topic(args.group)
        create_like(args.bootstrap, output, like=args.topic)
    with tempfile.TemporaryDirectory(prefix="store-", dir=args.workdir) as store_dir:
        try:
            consumed, handled, seconds, engine = measure(args, store_dir, output)
        except ConfigError as refusal:  # e.g. `async def handle` on an engine without it
            emit_refused(str(refusal))
            return
    outputs = None
    if output is not None:  # after the clock stopped and the consumer closed
        found = read_back(args.bootstrap, output)
        outputs = (found.outputs, found.ids, found.mismatched)
    emit(consumed, handled, seconds, engine=engine, outputs=outputs)


def measure(
    args: argparse.Namespace, store_dir: str, output: str | None = None
) -> tuple[int, int, float, str]:
    """:func:`run`, under pyinstrument when ``--profile`` is given."""
    if args.profile is None:
        return run(args, store_dir, output)
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001)
    started = time.perf_counter()
    with profiler:
        result = run(args, store_dir, output)
    args.profile.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.profile}.txt").write_text(
        profiler.output_text(unicode=True, show_all=False, timeline=False)
    )
    Path(f"{args.profile}.html").write_text(profiler.output_html())
    print(f"profiled {time.perf_counter() - started:.1f}s -> {args.profile}.txt")
    return result


if __name__ == "__main__":
    main()
