"""Quix Streams: a stateful app that keeps a per-ID "seen" flag in its RocksDB state.

The way a Quix user would write "handle each event ID once": the input topic
is keyed by event ID, so Quix's key-scoped state is per ID; a stateful
``filter`` checks ``state.get("seen")``, sets it for a new ID, and lets only
new IDs through to the (no-op, counting) handler. The app runs with its real
RocksDB state store and its real changelog topics on our broker, with Quix's
defaults otherwise (at-least-once, a checkpoint every 5 s), or with
``--guarantee exactly-once`` (Kafka transactions, like our changelog).

Values are read as bytes (no JSON parsing), as the other contenders do, so the
comparison is the cost of the dedupe state, not of a deserializer.

``--emit true`` (the ``quix-eos-emit`` row, with ``--guarantee exactly-once``)
is the consume-emit pipeline: after the filter, ``sdf.to_topic(output)`` sends
each new ID's message (value and key as bytes, and the input's headers, which
Quix forwards) to an output topic this process creates before the app starts
(see :mod:`bench.contenders._outputs`); with exactly-once the outputs go out
in the transaction of Quix's checkpoint. After the run the topic is read back
with ``read_committed``, as for the dedupe_consumer emit row.

This module runs under the interpreter of the Quix virtualenv (quixstreams pins
an older confluent-kafka than this project, see ``bench/setup.sh``), so it
imports nothing from this project but :mod:`bench.child` and
:mod:`bench.contenders._outputs` (standard library and confluent-kafka only).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from quixstreams import Application  # type: ignore[import-not-found, unused-ignore]

from bench.child import Stopwatch, emit, parse_args
from bench.contenders._outputs import create_like, output_topic, read_back


def main() -> None:
    args = parse_args(__doc__ or "", "guarantee", emit="false")
    if args.emit not in ("true", "false"):
        raise SystemExit(f"--emit must be true or false, not {args.emit!r}")
    output = output_topic(args.group) if args.emit == "true" else None
    if output is not None:
        create_like(args.bootstrap, output, like=args.topic)
    app: Any = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        state_dir=str(Path(args.workdir) / "state"),
        processing_guarantee=args.guarantee,
        loglevel="WARNING",
    )
    topic = app.topic(args.topic, value_deserializer="bytes", key_deserializer="bytes")
    clock = Stopwatch()
    counts = {"consumed": 0, "handled": 0}
    stopping_at = 0.0

    def first_time(value: bytes, state: Any) -> bool:
        nonlocal stopping_at
        clock.start_once()
        counts["consumed"] += 1
        if counts["consumed"] >= args.events:
            stopping_at = time.perf_counter()
            app.stop()  # finishes this message, then commits the checkpoint and returns
        if state.get("seen"):
            return False
        state.set("seen", True)
        return True

    def handle(value: bytes) -> None:
        counts["handled"] += 1

    sdf = app.dataframe(topic)
    sdf = sdf.filter(first_time, stateful=True)
    sdf = sdf.update(handle)
    if output is not None:
        sdf.to_topic(app.topic(output, value_serializer="bytes", key_serializer="bytes"))
    app.run()
    # run() returns after the final checkpoint (state flushed, changelog flushed,
    # offsets committed) and after closing the consumer and the state store.
    clock.lap()
    print(
        f"quix: {clock.last - stopping_at:.2f}s from the last message to run() returning "
        "(final checkpoint + close), included in its time",
        file=sys.stderr,
    )
    outputs = None
    if output is not None:
        found = read_back(args.bootstrap, output)
        outputs = (found.outputs, found.ids, found.mismatched)
    emit(counts["consumed"], counts["handled"], clock.seconds, outputs=outputs)


if __name__ == "__main__":
    main()
