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

This module runs under the interpreter of the Quix virtualenv (quixstreams pins
an older confluent-kafka than this project, see ``bench/setup.sh``), so it
imports nothing from this project but :mod:`bench.child`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from quixstreams import Application  # type: ignore[import-not-found, unused-ignore]

from bench.child import Stopwatch, emit, parse_args


def main() -> None:
    args = parse_args(__doc__ or "", "guarantee")
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
    app.run()
    # run() returns after the final checkpoint (state flushed, changelog flushed,
    # offsets committed) and after closing the consumer and the state store.
    clock.lap()
    print(
        f"quix: {clock.last - stopping_at:.2f}s from the last message to run() returning "
        "(final checkpoint + close), included in its time",
        file=sys.stderr,
    )
    emit(counts["consumed"], counts["handled"], clock.seconds)


if __name__ == "__main__":
    main()
