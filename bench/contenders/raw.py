"""The baseline: a plain confluent-kafka batch consumer that reads and commits, no dedupe.

It touches every message's value and headers (what any handler does) and
commits once per batch, as a hand-written consumer does; it runs the same loop
as the hand-written Redis and PostgreSQL contenders.

* ``--commit sync`` (the ``raw`` row): waits for each batch's commit.
* ``--commit async`` (``raw-async``, the true ceiling): issues each batch's
  commit without waiting, then one synchronous commit at the end.
* ``--sleep-ms 2`` (``raw-io``): sleeps that long per message, one message
  after the other, like a sequential handler waiting on I/O: the baseline of
  the I/O-bound rows.
"""

from __future__ import annotations

import time
from typing import Literal

from confluent_kafka import Message

from bench.child import emit, parse_args
from bench.contenders._handwritten import batch_loop


def touch(message: Message) -> bool:
    message.value()
    message.headers()
    return True


def main() -> None:
    args = parse_args(__doc__ or "", commit="sync", sleep_ms="0")
    if args.commit not in ("sync", "async"):
        raise SystemExit(f"--commit must be sync or async, not {args.commit!r}")
    commit: Literal["sync", "async"] = "async" if args.commit == "async" else "sync"
    sleep_s = float(args.sleep_ms) / 1000

    def on_message(message: Message) -> bool:
        touch(message)
        time.sleep(sleep_s)
        return True

    consumed, handled, seconds = batch_loop(args, on_message if sleep_s else touch, commit)
    emit(consumed, handled, seconds)


if __name__ == "__main__":
    main()
